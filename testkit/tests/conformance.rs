//! The conformance suite against FakeBackend (the QEMU backend runs it in vmkit-qemu's
//! tests, with the fake QEMU and with the real guest).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::PathBuf;

use vmkit_core::{Backend, Instance, InstanceConfig};
use vmkit_testkit::conformance::{self, Target};
use vmkit_testkit::fake_backend::{self, FakeBackend};

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"never read").unwrap();
        std::fs::write(dir.path().join("disk.img"), b"").unwrap();
        Fake { dir }
    }
}

#[async_trait::async_trait]
impl Target for Fake {
    fn backend(&self) -> &dyn Backend {
        &FakeBackend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        let mut config = InstanceConfig::new(
            id,
            self.dir.path().join(id),
            self.dir.path().join("vmlinuz"),
        );
        config.resources.max_vcpus = 2;
        config
    }

    fn disk(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("disk.img"))
    }

    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        Some(vmkit_core::NicConfig::user(id))
    }

    async fn crash(&self, vm: &dyn Instance) -> bool {
        fake_backend::crash(&vm.vm_info().id).await
    }

    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        let mut config = self.config(id);
        config
            .backend_options
            .insert("faults".into(), "start=delay:1500".into());
        Some(config)
    }
}

#[tokio::test]
async fn the_fake_backend_passes_every_check() {
    let report = conformance::run(&Fake::new()).await;
    report.assert_complete();
}

/// A backend that breaks the contract is caught, with the check's name and what it saw:
/// here a VM whose `pause` is accepted in `New` (a mock standing in for a buggy backend).
#[cfg(feature = "mocks")]
#[tokio::test]
async fn a_backend_that_breaks_the_contract_is_named_with_what_was_seen() {
    use vmkit_core::VmState;
    use vmkit_testkit::mocks::{MockBackend, MockInstance};

    struct Buggy(MockBackend, Fake);
    #[async_trait::async_trait]
    impl Target for Buggy {
        fn backend(&self) -> &dyn Backend {
            &self.0
        }
        fn config(&self, id: &str) -> InstanceConfig {
            self.1.config(id)
        }
        async fn crash(&self, _vm: &dyn Instance) -> bool {
            false
        }
    }
    let mut backend = MockBackend::new();
    backend.expect_create().returning(|_| {
        let mut vm = MockInstance::new();
        vm.expect_pause().returning(|| Ok(())); // the bug: pause in New succeeds
        vm.expect_state().return_const(VmState::New);
        Ok(Box::new(vm))
    });
    let outcome = conformance::run_one(&Buggy(backend, Fake::new()), "wrong_state_calls")
        .await
        .unwrap();
    assert_eq!(outcome.check, "wrong_state_calls");
    assert_eq!(
        outcome.result,
        Err("pause in new: accepted, expected InvalidState".to_owned())
    );
}

/// A failure the target calls a fault of its environment is tried once more, and the
/// outcome says so; any other failure is not.
#[tokio::test]
async fn an_environment_fault_gets_one_more_try_and_is_noted() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use vmkit_testkit::fake_backend::{Fault, Op};

    /// The first VM's start fails with a marker the target knows.
    struct FirstStartFails(AtomicU32);
    impl Backend for FirstStartFails {
        fn name(&self) -> &str {
            "first-fails"
        }
        fn capabilities(&self) -> vmkit_core::Capabilities {
            FakeBackend.capabilities()
        }
        fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
            let vm = FakeBackend.create_fake(config)?;
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                vm.inject(Op::Start, Some(Fault::Error("ENV-FAULT".into())));
            }
            Ok(Box::new(vm))
        }
    }
    struct Flaky(FirstStartFails, Fake, bool);
    #[async_trait::async_trait]
    impl Target for Flaky {
        fn backend(&self) -> &dyn Backend {
            &self.0
        }
        fn config(&self, id: &str) -> InstanceConfig {
            self.1.config(id)
        }
        async fn crash(&self, _vm: &dyn Instance) -> bool {
            false
        }
        fn environment_fault(&self, failure: &str) -> bool {
            self.2 && failure.contains("ENV-FAULT")
        }
    }
    let retried = conformance::run_one(
        &Flaky(FirstStartFails(AtomicU32::new(0)), Fake::new(), true),
        "start_twice",
    )
    .await
    .unwrap();
    let note = retried.result.unwrap();
    assert!(
        note.starts_with("passed on a second try; the first met an environment fault: start conf-twice: start: injected fault: ENV-FAULT"),
        "{note}"
    );
    let not = conformance::run_one(
        &Flaky(FirstStartFails(AtomicU32::new(0)), Fake::new(), false),
        "start_twice",
    )
    .await
    .unwrap();
    assert_eq!(
        not.result,
        Err("start conf-twice: start: injected fault: ENV-FAULT".to_owned())
    );
}
