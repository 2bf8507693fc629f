//! The model-based test of the `Instance` contract (`vmkit_testkit::model`) against the
//! null backend, a backend with no hot-plug, no guest and no way to crash: the model
//! draws only what its capabilities offer (cold devices, start, pause, resume, shutdown)
//! and checks that everything else is refused as the contract says — the wrong state
//! first, then `Unsupported`.
#![allow(clippy::unwrap_used)] // a test file: a failed step should panic

use std::sync::LazyLock;

use vmkit_core::{Backend, Instance, InstanceConfig, NicConfig};
use vmkit_plugin_example::NullBackend;
use vmkit_testkit::model::{self, ModelTarget};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
});

struct Null;

#[async_trait::async_trait]
impl ModelTarget for Null {
    type Vm = Box<dyn Instance>;

    const CRASHES: bool = false;

    fn create(config: InstanceConfig) -> Box<dyn Instance> {
        NullBackend.create(config).unwrap()
    }

    fn nic(id: &str) -> Option<NicConfig> {
        Some(NicConfig::user(id))
    }

    async fn crash(_vm: &Box<dyn Instance>) {
        unreachable!("CRASHES is false: the model draws no crash")
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        &RUNTIME
    }
}

#[test]
fn the_null_backend_keeps_the_contract() {
    if let Err(failure) = model::run::<Null>(model::cases(500)) {
        panic!("{failure}");
    }
}
