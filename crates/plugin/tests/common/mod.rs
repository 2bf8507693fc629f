//! The custom harness both plugin test binaries share: they must be their own `main`
//! (each is also a plugin host's child or a backend process), so they run their tests
//! here, one after another, each caught on its own.
#![allow(clippy::unwrap_used, clippy::print_stdout)] // a test harness: a failed step should panic

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

/// A fake VM's config with state in `dir/<id>`: room for vCPU and memory hot-plug, and
/// a kernel file the fake never reads.
pub(crate) fn config(dir: &Path, id: &str) -> vmkit_core::InstanceConfig {
    let kernel = dir.join("vmlinuz");
    if !kernel.exists() {
        std::fs::write(&kernel, b"never read").unwrap();
    }
    let mut config = vmkit_core::InstanceConfig::new(id, dir.join(id), &kernel);
    config.resources.max_vcpus = 4;
    config.resources.max_memory_mib = Some(1024);
    config.resources.memory_slots = 2;
    config
}

/// A test: it gets the runtime every test of the binary shares.
pub(crate) type TestFn = fn(&tokio::runtime::Runtime);

/// Runs `tests` whose name contains one of the command line's non-flag arguments (all
/// of them when there is none), printing each result and a `suite` summary.
pub(crate) fn run(suite: &str, tests: &[(&str, TestFn)]) -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let began = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&runtime)));
        let took = began.elapsed().as_secs_f64();
        if result.is_ok() {
            println!("test {name} ... ok ({took:.1} s)");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            failed += 1;
        }
    }
    println!("\n{suite}: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
