//! `cargo xtask check-macos`: type-checks and lints (clippy, warnings denied) the
//! crates that run on a macOS host, for `x86_64-apple-darwin` and
//! `aarch64-apple-darwin`, on a Linux machine.
//!
//! rustup cannot install a macOS standard library on these machines, so `std` for
//! those targets is built from Debian's Rust source, and clippy is Debian's, the same
//! version ([`crate::debian_rust`]). Nothing is linked (there is no macOS linker or SDK
//! here) and nothing runs.

use crate::debian_rust::Toolchain;
use crate::run::step;

/// The macOS targets vmkit's host crates are checked for.
const TARGETS: [&str; 2] = ["x86_64-apple-darwin", "aarch64-apple-darwin"];
/// Host crates that never build for macOS: the Linux layer, containerd's shim (a Linux
/// container runtime: mounts, cgroups) and this task.
const LINUX_ONLY: [&str; 3] = ["vmkit-linux", "containerd-shim-vmkit-v1", "xtask"];

/// Type-checks and lints the workspace's host crates for both macOS targets.
pub(crate) fn check() -> Result<(), String> {
    let rust = Toolchain::ensure()?;
    for target in TARGETS {
        step(
            &format!("clippy for {target}"),
            rust.clippy(target)
                .args(["--workspace", "--lib", "--bins"])
                .args(LINUX_ONLY.iter().flat_map(|c| ["--exclude", c])),
        )?;
        // vmkit-macos's unit tests, with its macOS-only modules in the build.
        step(
            &format!("clippy vmkit-macos's tests for {target}"),
            rust.clippy(target).args(["--tests", "-p", "vmkit-macos"]),
        )?;
    }
    Ok(())
}
