//! The model-based test of the life cycle (`vmkit_testkit::model`) against FakeBackend:
//! random sequences of cold devices, start (and a start made to hang), pause, resume,
//! vCPU/memory/disk/NIC hot-plug and unplug, guest calls, crashes and concurrent
//! shutdowns, each step checked against the reference model of the contract — and the
//! same model against a FakeBackend configured with nothing to hot-plug. The QEMU backend driving the fake QEMU runs the same model in
//! vmkit-qemu's `model` test.
//!
//! 2,000 cases by default; `PROPTEST_CASES` sets more or fewer.
#![cfg(feature = "model")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::LazyLock;

use vmkit_core::{InstanceConfig, NicConfig};
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

    const HANGS_START: bool = true;

    fn create(mut config: InstanceConfig) -> FakeInstance {
        config.timeouts.command = std::time::Duration::from_millis(200);
        FakeBackend.create_fake(config).unwrap()
    }

    fn configure(config: &mut InstanceConfig, _dir: &std::path::Path) {
        config
            .backend_options
            .insert("hotplug_ports".into(), Self::HOTPLUG_PORTS.to_string());
    }

    fn nic(id: &str) -> Option<NicConfig> {
        Some(NicConfig::user(id))
    }

    async fn crash(vm: &FakeInstance) {
        vm.crash().await;
    }

    fn hang_start(vm: &FakeInstance) {
        vm.silence_agent(true).unwrap();
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        &RUNTIME
    }
}

/// FakeBackend with nothing to hot-plug: one vCPU, fixed memory, no hot-plug ports.
struct FakeWithoutHotplug;

#[async_trait::async_trait]
impl ModelTarget for FakeWithoutHotplug {
    type Vm = FakeInstance;

    fn create(config: InstanceConfig) -> FakeInstance {
        Fake::create(config)
    }

    fn configure(config: &mut InstanceConfig, _dir: &std::path::Path) {
        let r = &mut config.resources;
        r.max_vcpus = r.boot_vcpus;
        r.max_memory_mib = None;
        r.memory_slots = 0;
        config
            .backend_options
            .insert("hotplug_ports".into(), "0".into());
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

#[test]
fn the_model_drives_a_backend_without_hot_plug() {
    if let Err(failure) = model::run::<FakeWithoutHotplug>(model::cases(500)) {
        panic!("{failure}");
    }
}
