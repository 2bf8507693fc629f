//! `cargo xtask`: the project's tasks. The README's two set-up commands are
//! `cargo xtask demo` and `cargo xtask test`; both install what is missing first.

mod apt;
mod arch;
mod bench;
mod containerd;
mod crun;
mod debian_rust;
mod demo;
mod fuzz;
mod image;
mod install;
mod macos;
mod manifest;
mod oci_image;
mod pvh;
mod release;
mod run;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  test [--no-lint] [-- <cargo test args>]
            install what is missing and build both test guests (x86_64, arm64), then:
            fmt check, clippy -D warnings (Linux, then both macOS targets), doc with -D warnings,
            cargo deny (bans licenses sources), cargo publish --dry-run of the published crates,
            a check with the MSRV's Rust, semver against the last v* tag (once one
            exists), the whole test suite
  bench [--check]
            install what is missing, then run the benchmarks in benches/; each prints
            its figures against a baseline measured in the same run (--check: exit
            non-zero when a target is missed); the table in target/bench/report.md
  soak      the leak soak: 50 start/stop cycles of the test guest, nothing may be left
  fuzz [TARGET] [--time S]
            build fuzz/'s targets with libFuzzer coverage (stable Rust, needs g++) and run
            each, or TARGET, for S seconds (default 60); findings in target/fuzz/artifacts/
  check-macos
            clippy -D warnings on the host crates for x86_64- and aarch64-apple-darwin
            (std built from Debian's Rust source, unpacked under target/debian-rust/;
            nothing links or runs)
  release-check
            what a release needs: cargo publish --dry-run of every published crate, each built
            from its package; a check with the MSRV's Rust; semver against the last v* tag
  install   install what is missing (system packages need root) and stop
  image [--arm64 | --generic]
            build the test guest (kernel + initramfs) into target/vmkit-image/, cached
            (--arm64: the arm64 guest for machine virt, into target/vmkit-image-arm64/;
            --generic: on Debian's generic kernel, which has 9p, into
            target/vmkit-image-generic/)
  containerd
            fetch containerd 2.x (Debian sid's package, with apt lists of its own) and lay
            out a busybox root filesystem, into target/vmkit-containerd/ (the shim's tests)
  demo [<vmkit run flags>]
            install only QEMU, build the test guest and the vmkit command, and drive it:
            run a VM detached, exec in it, hot-plug a vCPU and memory, stop, remove
";

/// `cargo xtask image [--arm64]`.
fn image_task(args: &[String]) -> Result<(), String> {
    let (arch, flavour) = match args {
        [] => (image::GuestArch::X86_64, image::Flavour::Cloud),
        [flag] if flag == "--arm64" => {
            install::ensure_arm64_tools()?;
            (image::GuestArch::Aarch64, image::Flavour::Cloud)
        }
        [flag] if flag == "--generic" => (image::GuestArch::X86_64, image::Flavour::Generic),
        other => return Err(format!("image: unknown arguments {other:?}")),
    };
    install::ensure_all()?;
    image::ensure_flavour(arch, flavour).map(drop)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("install") => install::ensure_all(),
        Some("check-macos") => macos::check(),
        Some("image") => image_task(&args[1..]),
        Some("containerd") => containerd::ensure().map(drop),
        Some("bench") => bench::run(&args[1..]),
        Some("soak") => bench::soak(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("release-check") => release::check(true),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task {other:?}\n{USAGE}")),
        None => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
