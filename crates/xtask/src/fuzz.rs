//! `cargo xtask fuzz [TARGET] [--time S]`: builds the fuzz targets of `fuzz/` with
//! libFuzzer's coverage instrumentation on stable Rust (no sanitizer) and runs each (or
//! `TARGET`) for `S` seconds (default 60): the committed seeds in `fuzz/seeds/<target>`
//! plus the corpus it grows in `target/fuzz/corpus/<target>`; a crash, a slow unit or
//! an allocation over the limit stops it and is kept in `target/fuzz/artifacts/<target>`.

use std::path::Path;

use crate::run::{step, target_dir, workspace_root};

/// The targets of `fuzz/Cargo.toml`.
const TARGETS: [&str; 3] = ["serial_frames", "qmp_lines", "stream_header"];
/// The target triple the targets build for: named, so that `RUSTFLAGS` reach only
/// them, not build scripts and proc macros.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// What cargo-fuzz passes for libFuzzer's coverage, without a sanitizer (stable Rust).
const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebug-assertions -Coverflow-checks";

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut only = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--time" => {
                let value = rest.next().ok_or("fuzz: --time needs seconds")?;
                seconds = value
                    .parse()
                    .map_err(|_| format!("fuzz: --time {value:?} is not a number of seconds"))?;
            }
            name if TARGETS.contains(&name) => only = Some(name),
            other => {
                return Err(format!(
                    "fuzz: unknown argument {other:?} (targets: {})",
                    TARGETS.join(", ")
                ));
            }
        }
    }
    let out = target_dir().join("fuzz");
    step(
        "build the fuzz targets (release, libFuzzer coverage)",
        crate::run::cargo()
            .current_dir(workspace_root().join("fuzz"))
            .env("RUSTFLAGS", RUSTFLAGS)
            .args(["build", "--release", "--locked", "--target", TRIPLE])
            .arg("--target-dir")
            .arg(&out),
    )?;
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        run_target(&out, target, seconds)?;
    }
    Ok(())
}

/// Runs `target` for `seconds`.
fn run_target(out: &Path, target: &str, seconds: u64) -> Result<(), String> {
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let seeds = workspace_root().join("fuzz/seeds").join(target);
    let mut cmd = std::process::Command::new(out.join(TRIPLE).join("release").join(target));
    // New inputs go to the first directory: the corpus under target/, never the seeds.
    cmd.arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // A unit slower than 10 s or allocating more than 512 MiB is a finding.
        .args(["-timeout=10", "-rss_limit_mb=2048", "-malloc_limit_mb=512"])
        .arg("-print_final_stats=1");
    step(&format!("fuzz {target} for {seconds} s"), &mut cmd)
}
