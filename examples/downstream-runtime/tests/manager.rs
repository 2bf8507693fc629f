//! The sandbox manager's own logic, tested as a downstream author would: with
//! vmkit-testkit's mocks (exact calls) and FakeBackend (a whole fake VM with a real
//! agent), no VM and no QEMU. The last test runs all the others again with every QEMU
//! binary hidden from PATH, to prove they need none.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use downstream_runtime::{ManagerError, Policy, SandboxManager};
use vmkit_core::{Backend, Capabilities, Error, ExitInfo, Instance, InstanceConfig, Registry};
use vmkit_testkit::fake_backend::{FakeBackend, Fault, Op};
use vmkit_testkit::mocks::{MockBackend, MockInstance};

fn quick() -> Policy {
    Policy {
        start_attempts: 3,
        start_timeout: Duration::from_millis(300),
        retry_pause: Duration::from_millis(1),
        exec_timeout: Duration::from_secs(5),
        idle_after: Duration::from_millis(200),
    }
}

fn registry_with(backend: impl Backend + 'static) -> Registry {
    let mut registry = Registry::new();
    registry.register(Arc::new(backend)).unwrap();
    registry
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"never read").unwrap();
        Dir(dir)
    }

    fn config(&self, id: &str) -> InstanceConfig {
        let mut config =
            InstanceConfig::new(id, self.0.path().join(id), self.0.path().join("vmlinuz"));
        config.resources.max_vcpus = 4;
        config.timeouts.start = Duration::from_millis(300);
        config
    }
}

fn timeout() -> Error {
    Error::Timeout {
        op: "start: waiting for the guest agent to answer Ping".into(),
        after: Duration::from_millis(300),
    }
}

// --- with mocks: the exact calls -------------------------------------------------

#[tokio::test]
async fn a_start_that_times_out_is_cleaned_up_and_retried_on_a_fresh_instance() {
    let created = Arc::new(AtomicU32::new(0));
    let mut backend = MockBackend::new();
    backend.expect_name().return_const("mock".to_owned());
    let count = Arc::clone(&created);
    backend.expect_create().times(2).returning(move |_| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        let mut vm = MockInstance::new();
        if n == 0 {
            vm.expect_start().times(1).returning(|_| Err(timeout()));
            // The failed attempt must be shut down, exactly once.
            vm.expect_shutdown()
                .times(1)
                .returning(|| Ok(ExitInfo::never_started()));
        } else {
            vm.expect_start().times(1).returning(|_| Ok(()));
        }
        Ok(Box::new(vm))
    });
    let manager = SandboxManager::new(registry_with(backend), "mock", quick());
    let dir = Dir::new();
    manager.create(dir.config("sb")).await.unwrap();
    assert_eq!(created.load(Ordering::SeqCst), 2);
    assert_eq!(manager.names().await, ["sb"]);
}

#[tokio::test]
async fn a_start_that_fails_otherwise_is_not_retried() {
    let mut backend = MockBackend::new();
    backend.expect_name().return_const("mock".to_owned());
    backend.expect_create().times(1).returning(|_| {
        let mut vm = MockInstance::new();
        vm.expect_start()
            .returning(|_| Err(Error::config("kernel.path", "not a kernel")));
        vm.expect_shutdown()
            .times(1)
            .returning(|| Ok(ExitInfo::never_started()));
        Ok(Box::new(vm))
    });
    let manager = SandboxManager::new(registry_with(backend), "mock", quick());
    let err = manager.create(Dir::new().config("sb")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ManagerError::Vmkit {
                source: Error::InvalidConfig { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(manager.names().await.is_empty());
}

#[tokio::test]
async fn resize_says_so_where_the_backend_has_no_vcpu_hotplug() {
    let mut backend = MockBackend::new();
    backend.expect_name().return_const("mock".to_owned());
    backend.expect_create().returning(|_| {
        let mut vm = MockInstance::new();
        vm.expect_start().returning(|_| Ok(()));
        vm.expect_cpu_hotplugger().return_const(None);
        Ok(Box::new(vm))
    });
    let manager = SandboxManager::new(registry_with(backend), "mock", quick());
    manager.create(Dir::new().config("sb")).await.unwrap();
    let err = manager.resize("sb", 2).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "sb: vCPU hot-plug is not offered by this backend"
    );
}

// --- with FakeBackend: a whole fake VM -------------------------------------------

/// A backend whose first `flaky` VMs hang in start: the fake with a fault injected.
struct FlakyStarts {
    flaky: u32,
    made: AtomicU32,
}

impl Backend for FlakyStarts {
    fn name(&self) -> &str {
        "flaky"
    }

    fn capabilities(&self) -> Capabilities {
        FakeBackend.capabilities()
    }

    fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        let vm = FakeBackend.create_fake(config)?;
        if self.made.fetch_add(1, Ordering::SeqCst) < self.flaky {
            vm.inject(Op::Start, Some(Fault::Hang));
        }
        Ok(Box::new(vm))
    }
}

#[tokio::test]
async fn hanging_starts_are_retried_until_one_works_and_leave_nothing() {
    let dir = Dir::new();
    let manager = SandboxManager::new(
        registry_with(FlakyStarts {
            flaky: 2,
            made: AtomicU32::new(0),
        }),
        "flaky",
        quick(),
    );
    let began = Instant::now();
    manager.create(dir.config("sb")).await.unwrap();
    // Two hung starts, each ended by the 300 ms deadline, then a good one.
    assert!(
        began.elapsed() >= Duration::from_millis(600),
        "{:?}",
        began.elapsed()
    );
    let out = manager.exec("sb", &["/bin/echo", "hello"]).await.unwrap();
    assert_eq!(out.stdout, b"hello\n");
    manager.stop("sb").await.unwrap();
    let state = dir.0.path().join("sb");
    for left in ["agent.sock", "stream.sock", "vmkit.lock"] {
        assert!(!state.join(left).exists(), "{left} left behind");
    }
}

#[tokio::test]
async fn a_start_that_never_works_gives_up_after_the_policys_attempts() {
    let manager = SandboxManager::new(
        registry_with(FlakyStarts {
            flaky: u32::MAX,
            made: AtomicU32::new(0),
        }),
        "flaky",
        quick(),
    );
    let err = manager.create(Dir::new().config("sb")).await.unwrap_err();
    match err {
        ManagerError::StartGaveUp { attempts, .. } => assert_eq!(attempts, 3),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn resize_and_idle_stop_on_a_fake_vm() {
    let dir = Dir::new();
    let manager = SandboxManager::new(registry_with(FakeBackend), "fake", quick());
    manager.create(dir.config("busy")).await.unwrap();
    manager.create(dir.config("idle")).await.unwrap();
    assert_eq!(manager.resize("busy", 3).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(250)).await;
    manager.exec("busy", &["/bin/true"]).await.unwrap(); // used: not idle
    assert_eq!(manager.stop_idle().await, ["idle"]);
    assert_eq!(manager.names().await, ["busy"]);
    assert!(!dir.0.path().join("idle/agent.sock").exists());
    manager.stop("busy").await.unwrap();
    assert!(matches!(
        manager.stop("busy").await.unwrap_err(),
        ManagerError::Unknown(_)
    ));
}

// --- no QEMU needed ----------------------------------------------------------------

/// The environment variable that marks the re-run with QEMU hidden.
const HIDDEN: &str = "DOWNSTREAM_RUNTIME_QEMU_HIDDEN";

#[test]
fn every_other_test_passes_with_no_qemu_on_path_in_under_10_s() {
    if std::env::var_os(HIDDEN).is_some() {
        return; // this is the re-run itself
    }
    let began = Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--skip", "every_other_test_passes_with_no_qemu_on_path"])
        .env(HIDDEN, "1")
        .env("PATH", "/nonexistent")
        .env_remove("VMKIT_QEMU")
        .output()
        .unwrap();
    let took = began.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("test result: ok. 7 passed"), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn qemu_is_really_hidden_in_the_rerun() {
    if std::env::var_os(HIDDEN).is_none() {
        return;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").exists());
    assert!(!found, "qemu-system-x86_64 is on PATH {path}");
}
