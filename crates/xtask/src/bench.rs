//! `cargo xtask bench`: every benchmark in `benches/`, in release mode, one at a time,
//! each appending its rows to one file; then the table of them all
//! (`target/bench/report.md`, `report.json`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{containerd, image, install, run};

/// The benchmarks, in the order they run.
const BENCHES: [&str; 10] = [
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
];

/// The packages every cargo run of the benches names: the benches, and what the plugin
/// and containerd benches run (the QEMU plugin's library and executable, the shim). The
/// same set each time, so each dependency is built once, with one set of features.
const PACKAGES: [&str; 6] = [
    "-p",
    "vmkit-benches",
    "-p",
    "vmkit-plugin-qemu",
    "-p",
    "containerd-shim-vmkit-v1",
];

/// The leak soak (`benches/benches/soak.rs`): a check that runs for minutes, not a
/// figure against a baseline, so `cargo xtask soak` runs it on its own.
const SOAK: &str = "soak";

/// What the benchmarks need, as environment variables for them.
struct Parts {
    env: Vec<(&'static str, PathBuf)>,
}

/// `cargo xtask soak`: the leak soak, with its target checked.
pub(crate) fn soak(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!("soak: unknown arguments {args:?}"));
    }
    install::ensure_all()?;
    let image = image::ensure_image(image::GuestArch::X86_64)?;
    run::step(
        "soak",
        run::cargo()
            .env("VMKIT_IMAGE_DIR", image)
            .args(["bench", "--locked"])
            .args(PACKAGES)
            .args(["--bench", SOAK, "--", "--check"]),
    )
}

/// `cargo xtask bench [--check]`.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let check = match args {
        [] => false,
        [flag] if flag == "--check" => true,
        other => return Err(format!("bench: unknown arguments {other:?}")),
    };
    let parts = prepare()?;
    // Every bench appends its rows here; the table is made from them at the end.
    let report_dir = run::target_dir().join("bench");
    std::fs::create_dir_all(&report_dir)
        .map_err(|e| format!("create {}: {e}", report_dir.display()))?;
    let rows = report_dir.join("rows.jsonl");
    let _ = std::fs::remove_file(&rows);
    let failed = run_all(&parts, &rows, check);
    table(&rows, &report_dir)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benches that failed or missed a target: {failed:?}"
        ))
    }
}

/// Installs and builds what the benchmarks use: the guests, the QEMU plugin, containerd,
/// runc and the shim.
fn prepare() -> Result<Parts, String> {
    install::ensure_all()?;
    let image = image::ensure_image(image::GuestArch::X86_64)?;
    // The shares bench compares 9p too, which only the generic kernel has.
    let generic = image::ensure_flavour(image::GuestArch::X86_64, image::Flavour::Generic)?;
    // The containerd bench runs the shim and, as its floor, runc.
    let containerd = containerd::ensure()?;
    install::ensure_runc()?;
    // Everything in release, in one cargo run before the first bench runs (both cores
    // busy throughout): the plugin's library and executable, the shim, the table's
    // tool and the benches the table runs (not the soak: `cargo xtask soak` builds it).
    // Benches by name, not `--benches`: that would also build each library and binary
    // as a test harness, with its dev-dependencies.
    run::step(
        "build the benches, the QEMU plugin and the shim (release)",
        run::cargo()
            .args(["build", "--release", "--locked"])
            .args(PACKAGES)
            .args(["--lib", "--bins"])
            .args(BENCHES.iter().flat_map(|bench| ["--bench", bench])),
    )?;
    Ok(Parts {
        env: vec![
            ("VMKIT_IMAGE_DIR", image),
            ("VMKIT_GENERIC_IMAGE_DIR", generic),
            ("VMKIT_CONTAINERD_DIR", containerd.bin_dir),
            ("VMKIT_TEST_IMAGES", containerd.images),
            ("VMKIT_BUSYBOX_ROOTFS", containerd.busybox_rootfs),
            ("VMKIT_SHIM_DIR", run::target_dir().join("release")),
        ],
    })
}

/// Runs every benchmark; returns those that failed (or missed a target under
/// `check`). One that fails does not stop the others: the table shows them all.
fn run_all(parts: &Parts, rows: &Path, check: bool) -> Vec<&'static str> {
    let mut failed = Vec::new();
    for bench in BENCHES {
        let mut cmd = run::cargo();
        cmd.envs(parts.env.iter().map(|(k, v)| (k, v)))
            .env("VMKIT_BENCH_ROWS", rows)
            .args(["bench", "--locked"])
            .args(PACKAGES)
            .args(["--bench", bench]);
        if check {
            cmd.args(["--", "--check"]);
        }
        if let Err(e) = run::step(&format!("bench {bench}"), &mut cmd) {
            eprintln!("{e}");
            failed.push(bench);
        }
    }
    failed
}

/// `bench-report` (built with the benches): the rows into `report.md` and
/// `report.json` in `dir`.
fn table(rows: &Path, dir: &Path) -> Result<(), String> {
    run::step(
        "the benchmark table",
        Command::new(run::target_dir().join("release/bench-report"))
            .arg(rows)
            .arg(dir),
    )
}
