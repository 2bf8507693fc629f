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

/// [`config`] with a start that takes 1.5 s (the fake's start delay), for the
/// conformance suite's `cancelled_start`.
pub(crate) fn slow_config(dir: &Path, id: &str) -> vmkit_core::InstanceConfig {
    let mut config = config(dir, id);
    config
        .backend_options
        .insert("faults".into(), "start=delay:1500".into());
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

/// Polls `check` until it holds, at most `within`; panics with `what` otherwise.
pub(crate) fn eventually(within: std::time::Duration, what: &str, check: impl Fn() -> bool) {
    let began = Instant::now();
    while !check() {
        assert!(began.elapsed() < within, "{what} after {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Asserts `result` is a typed timeout of `op` that names the plugin, reached within
/// `deadline` and a second after `began`.
pub(crate) fn timed_out<T: std::fmt::Debug>(
    op: &str,
    result: vmkit_core::Result<T>,
    began: Instant,
    deadline: std::time::Duration,
) {
    let took = began.elapsed();
    match result {
        Err(vmkit_core::Error::Timeout { op: said, .. }) => {
            assert!(
                said.starts_with(&format!("{op}: no answer from the")),
                "the timeout names {op} and the plugin: {said}"
            );
        }
        other => panic!("{op}: expected a typed Timeout, got {other:?}"),
    }
    assert!(
        took <= deadline + std::time::Duration::from_secs(1),
        "{op}: timed out after {took:?}, its deadline is {deadline:?}"
    );
}

/// Whether the fake VM of `config` left nothing: its agent's socket is gone and its
/// state dir's lock is free (or it never made the dir).
pub(crate) fn nothing_left(config: &vmkit_core::InstanceConfig) -> bool {
    let socket = config.state_dir.join("agent.sock");
    let free = !config.state_dir.exists() || config.layout().lock("test", "the test").is_ok();
    !socket.exists() && free
}

/// A plugin whose start, shutdown, hot-plug and synchronous calls never answer (the
/// fake's wedge faults, set through the config): each call ends with a typed timeout
/// within its deadline and a second, `state()` stays the truth without asking the
/// plugin, and a dropped call or instance leaves nothing.
pub(crate) fn hung_plugin(rt: &tokio::runtime::Runtime, backend: &dyn vmkit_core::Backend) {
    use std::time::Duration;
    use vmkit_core::{DiskConfig, StartOptions, VmState};

    let dir = tempfile::tempdir().unwrap();
    let quick = |id: &str, faults: &str| {
        let mut c = config(dir.path(), id);
        c.timeouts.start = Duration::from_secs(1);
        c.timeouts.command = Duration::from_millis(300);
        c.timeouts.hotplug = Duration::from_millis(500);
        c.timeouts.shutdown_grace = Duration::from_millis(200);
        c.backend_options.insert("faults".into(), faults.into());
        c
    };
    // A start that never answers: a timeout, and the start cancelled in the plugin ends
    // its VM there (its events say so).
    let config = quick("hung-start", "start=wedge");
    let vm = backend.create(config.clone()).unwrap();
    let began = Instant::now();
    let started = rt.block_on(vm.start(StartOptions::new()));
    timed_out("start", started, began, Duration::from_secs(1));
    eventually(
        Duration::from_secs(2),
        "the cancelled start ended the VM",
        || vm.state() == VmState::Shutdown,
    );
    assert!(nothing_left(&config));

    // A VM whose shutdown, disk hot-plug, state and vm_info never answer (or are slow).
    let config = quick(
        "hung-ops",
        "shutdown=wedge,hotplug_disk=wedge,state=wedge,vm_info=delay:3000",
    );
    let vm = backend.create(config.clone()).unwrap();
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    let began = Instant::now();
    assert_eq!(vm.state(), VmState::Running, "state() is the events'");
    assert!(
        began.elapsed() < Duration::from_millis(50),
        "state() asks nothing"
    );

    let image = dir.path().join("hot.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let began = Instant::now();
    let plugged = rt.block_on(vm.hotplug_disk(DiskConfig::new("hot", &image)));
    timed_out("hotplug_disk", plugged, began, Duration::from_millis(800));
    assert_eq!(vm.state(), VmState::Running);

    let began = Instant::now();
    let info = vm.vm_info();
    assert!(
        began.elapsed() < Duration::from_millis(300 + 500 + 250 + 1000),
        "vm_info() gave up after {:?}",
        began.elapsed()
    );
    assert_eq!(info.state, VmState::Running, "no state it was not given");

    let began = Instant::now();
    let stopped = rt.block_on(vm.shutdown());
    timed_out("shutdown", stopped, began, config.timeouts.shutdown_bound());
    assert_eq!(vm.state(), VmState::Running, "the VM still runs");
    // Dropping the instance ends its VM in the plugin.
    drop(vm);
    eventually(
        Duration::from_secs(5),
        "the dropped VM left something",
        || nothing_left(&config),
    );
}
