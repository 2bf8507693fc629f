//! Release readiness: every publishable crate packages (`cargo package`: the manifest
//! has what crates.io needs and the files are there; verified, it also builds each
//! package as crates.io would see it, its vmkit dependencies from the packages beside
//! it), the workspace builds with the Rust version its `rust-version` promises, and —
//! once a release is tagged — the public API keeps semver against it
//! (`cargo-semver-checks`).
//!
//! `cargo xtask test` runs them with an unverified `cargo package` (verifying builds
//! every crate and its dependencies again: five minutes of CI's budget here);
//! `cargo xtask release-check` runs them verified, before a release.

use std::process::Command;

use crate::run::{cargo, output, step, workspace_root};

/// The crates not for crates.io (each says `publish = false`).
const UNPUBLISHED: [&str; 7] = [
    "xtask",
    "vmkit-benches",
    "vmkit-plugin-example",
    "vmkit-plugin-qemu",
    "vmkit-plugin-testing",
    "containerd-shim-vmkit-v1",
    "downstream-runtime",
];

/// All three checks; `verify`: each package built from its tarball too.
pub(crate) fn check(verify: bool) -> Result<(), String> {
    package(verify)?;
    msrv()?;
    semver()
}

/// `cargo package` of every publishable crate.
fn package(verify: bool) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["package", "--workspace", "--locked", "--allow-dirty"])
        .args(UNPUBLISHED.iter().flat_map(|c| ["--exclude", c]));
    if !verify {
        cmd.arg("--no-verify");
    }
    step(
        if verify {
            "package (verified)"
        } else {
            "package"
        },
        &mut cmd,
    )
}

/// The workspace's `rust-version`, from its manifest.
fn rust_version() -> Result<String, String> {
    let path = workspace_root().join("Cargo.toml");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("rust-version")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| format!("{}: no rust-version", path.display()))
}

/// The library crates and binaries checked with the oldest Rust the manifest promises
/// (rustup fetches that toolchain once).
fn msrv() -> Result<(), String> {
    let version = rust_version()?;
    let toolchain = format!("+{version}");
    let have = output(Command::new("rustup").args(["run", &version, "rustc", "--version"]));
    if have.is_none() {
        step(
            &format!("install Rust {version} (the MSRV)"),
            Command::new("rustup").args(["toolchain", "install", &version, "--profile", "minimal"]),
        )?;
    }
    step(
        &format!("build with Rust {version} (the MSRV)"),
        Command::new("cargo")
            .current_dir(workspace_root())
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env("CARGO_TARGET_DIR", crate::run::target_dir().join("msrv"))
            .args([
                &toolchain,
                "check",
                "--workspace",
                "--lib",
                "--bins",
                "--locked",
            ])
            .args(UNPUBLISHED.iter().flat_map(|c| ["--exclude", c])),
    )
}

/// `cargo semver-checks` against the newest `v*` tag, when there is one.
fn semver() -> Result<(), String> {
    let tags = output(Command::new("git").current_dir(workspace_root()).args([
        "tag",
        "--list",
        "v*",
        "--sort=-v:refname",
    ]))
    .unwrap_or_default();
    let Some(last) = tags.lines().next().map(str::trim).filter(|t| !t.is_empty()) else {
        println!("==> semver: no release tagged yet (v*): nothing to compare against");
        return Ok(());
    };
    crate::install::ensure_cargo_tool("cargo-semver-checks", "semver-checks")?;
    step(
        &format!("semver against {last}"),
        cargo()
            .args(["semver-checks", "--workspace", "--baseline-rev", last])
            .args(UNPUBLISHED.iter().flat_map(|c| ["--exclude", c])),
    )
}
