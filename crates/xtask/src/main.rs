//! `cargo xtask`: the project's tasks. The README's two set-up commands are
//! `cargo xtask demo` and `cargo xtask test`; both install what is missing first.

mod apt;
mod arch;
mod containerd;
mod crun;
mod debian_rust;
mod demo;
mod image;
mod install;
mod macos;
mod oci_image;
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
            cargo deny (bans licenses sources), cargo package of the published crates,
            a check with the MSRV's Rust, semver against the last v* tag (once one
            exists), the whole test suite
  bench [--check]
            install what is missing, then run the benchmarks in benches/; each prints
            its figures against a baseline measured in the same run (--check: exit
            non-zero when a target is missed)
  check-macos
            clippy -D warnings on the host crates for x86_64- and aarch64-apple-darwin
            (std built from Debian's Rust source, unpacked under target/debian-rust/;
            nothing links or runs)
  release-check
            what a release needs: cargo package of every published crate, each built
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

/// `cargo xtask bench`: every benchmark, in release mode, one at a time.
fn bench(args: &[String]) -> Result<(), String> {
    let check = match args {
        [] => false,
        [flag] if flag == "--check" => true,
        other => return Err(format!("bench: unknown arguments {other:?}")),
    };
    install::ensure_all()?;
    let image = image::ensure_image(image::GuestArch::X86_64)?;
    // The shares bench compares 9p too, which only the generic kernel has.
    let generic = image::ensure_flavour(image::GuestArch::X86_64, image::Flavour::Generic)?;
    // The plugin bench loads the QEMU plugin's library and runs its executable.
    run::step(
        "build the QEMU plugin (release)",
        run::cargo().args(["build", "--release", "--locked", "-p", "vmkit-plugin-qemu"]),
    )?;
    // The containerd bench runs the shim (release) and, as its floor, runc.
    let containerd = containerd::ensure()?;
    install::ensure_runc()?;
    run::step(
        "build the containerd shim (release)",
        run::cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "containerd-shim-vmkit-v1",
        ]),
    )?;
    let shim_dir = run::target_dir().join("release");
    // Every bench appends its rows here; the table is made from them at the end.
    let report_dir = run::target_dir().join("bench");
    std::fs::create_dir_all(&report_dir)
        .map_err(|e| format!("create {}: {e}", report_dir.display()))?;
    let rows = report_dir.join("rows.jsonl");
    let _ = std::fs::remove_file(&rows);
    let mut failed = Vec::new();
    for bench in [
        "qmp",
        "boot",
        "guest",
        "serial",
        "hotplug",
        "plugin",
        "process",
        "shares",
        "containerd",
        "fleet",
        "soak",
    ] {
        let mut cmd = run::cargo();
        cmd.env("VMKIT_IMAGE_DIR", &image)
            .env("VMKIT_GENERIC_IMAGE_DIR", &generic)
            .env("VMKIT_CONTAINERD_DIR", &containerd.bin_dir)
            .env("VMKIT_TEST_IMAGES", &containerd.images)
            .env("VMKIT_BUSYBOX_ROOTFS", &containerd.busybox_rootfs)
            .env("VMKIT_SHIM_DIR", &shim_dir)
            .env("VMKIT_BENCH_ROWS", &rows)
            .args(["bench", "--locked", "-p", "vmkit-benches", "--bench", bench]);
        if check {
            cmd.args(["--", "--check"]);
        }
        // One bench that fails (or misses a target under --check) does not stop the
        // others: the table shows them all.
        if let Err(e) = run::step(&format!("bench {bench}"), &mut cmd) {
            eprintln!("{e}");
            failed.push(bench);
        }
    }
    run::step(
        "the benchmark table",
        run::cargo()
            .args([
                "run",
                "--release",
                "--locked",
                "-p",
                "vmkit-benches",
                "--bin",
                "bench-report",
                "--",
            ])
            .arg(&rows)
            .arg(&report_dir),
    )?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benches that failed or missed a target: {failed:?}"
        ))
    }
}

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
        Some("bench") => bench(&args[1..]),
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
