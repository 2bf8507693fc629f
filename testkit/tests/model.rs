//! The model-based test of the life cycle (`vmkit_testkit::model`) against FakeBackend:
//! random sequences of cold devices, start, pause, resume, vCPU/memory/disk hot-plug and
//! unplug, crashes and concurrent shutdowns, each step checked against the reference
//! model of the contract. The QEMU backend driving the fake QEMU runs the same model in
//! vmkit-qemu's `model` test.
//!
//! 2,000 cases by default; `PROPTEST_CASES` sets more or fewer.
#![cfg(feature = "model")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::LazyLock;

use vmkit_core::InstanceConfig;
use vmkit_testkit::fake_backend::{FakeBackend, FakeInstance};
use vmkit_testkit::model::{self, ModelTarget};

/// One runtime for every case (the fake VMs' agents run on it).
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
});

struct Fake;

#[async_trait::async_trait]
impl ModelTarget for Fake {
    type Vm = FakeInstance;

    fn create(mut config: InstanceConfig) -> FakeInstance {
        config.timeouts.command = std::time::Duration::from_millis(200);
        FakeBackend.create_fake(config).unwrap()
    }

    async fn crash(vm: &FakeInstance) {
        vm.crash().await;
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        &RUNTIME
    }
}

#[test]
fn the_fake_backend_keeps_the_contract() {
    if let Err(failure) = model::run::<Fake>(model::cases(2000)) {
        panic!("{failure}");
    }
}
