//! The model-based test of the `Instance` contract (feature `model`,
//! proptest-state-machine): random sequences of cold devices, start (and a start made to
//! hang), pause, resume, vCPU (`set_vcpus`, `hotplug_cpu_at`, `unplug_cpu`), memory,
//! disk and NIC hot-plug and unplug, guest calls, crashes and concurrent shutdowns, run
//! against a backend and checked after every step against a reference model of the
//! contract.
//!
//! The model asks only for what the backend says it offers: it reads the capabilities
//! a fresh instance reports and the resources of the config, and draws each step from
//! them — a backend without hot-plug is driven through the rest, and its hot-plug calls
//! must say `Unsupported` (after the state check). After every step:
//!
//! - `state()` equals the model's state;
//! - a call succeeds exactly when the model says it may, and is refused with
//!   `InvalidState` exactly when the state table forbids it, with `BadArgument` for a
//!   count out of range, a boot vCPU or a taken slot, `NotFound` for an id or slot that
//!   is not there, `Exhausted` when no slot, port or memory is left, `Unsupported` for
//!   what the capabilities leave out, `Timeout` for a start past its deadline — each
//!   exactly when the model says so;
//! - the vCPUs and memory the backend reports are what the model plugged;
//! - the events tell the same story: each `StateChanged` goes on from the last, and
//!   `Exited` comes once, after `Shutdown`;
//! - `Shutdown` is terminal, and concurrent shutdowns report one `ExitInfo`;
//! - every socket a live VM reported, its state dir's lock, and every process naming
//!   its state dir are gone once it has ended, and by the end of each sequence this
//!   process has no child left and no more fds open than before it.
//!
//! A backend takes part through [`ModelTarget`]; [`run`] runs the cases and, on a
//! failure, returns the invariant that broke and the shrunk sequence of steps.
//!
//! ```no_run
//! use vmkit_testkit::fake_backend::{FakeBackend, FakeInstance};
//! use vmkit_testkit::model::{self, ModelTarget};
//!
//! struct Fake;
//!
//! #[async_trait::async_trait]
//! impl ModelTarget for Fake {
//!     type Vm = FakeInstance;
//!     fn create(config: vmkit_core::InstanceConfig) -> FakeInstance {
//!         FakeBackend.create_fake(config).unwrap()
//!     }
//!     async fn crash(vm: &FakeInstance) {
//!         vm.crash().await;
//!     }
//!     fn runtime() -> &'static tokio::runtime::Runtime {
//!         static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> =
//!             std::sync::LazyLock::new(|| tokio::runtime::Runtime::new().unwrap());
//!         &RUNTIME
//!     }
//! }
//!
//! model::run::<Fake>(2000).unwrap();
//! ```

mod contract;
mod sut;

use std::path::Path;

use proptest::test_runner::{Config, TestError, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use vmkit_core::{Capabilities, Instance, InstanceConfig, NicConfig, ResourceManager};

pub use contract::{Contract, Expect, Model, Pick, Profile, Slot, Step};
pub use sut::Sut;

/// vCPUs at boot (a target's `configure` may change the resources; the model reads
/// them back).
pub const BOOT_VCPUS: u32 = 1;
/// vCPUs at most.
pub const MAX_VCPUS: u32 = 4;
/// Boot memory (MiB).
pub const MEMORY_MIB: u64 = 256;
/// Memory at most (MiB).
pub const MAX_MEMORY_MIB: u64 = 1024;
/// DIMM slots.
pub const SLOTS: u32 = 2;
/// Steps in a sequence, at most.
const MAX_STEPS: usize = 24;

/// A backend under the model test.
#[async_trait::async_trait]
pub trait ModelTarget: 'static {
    /// The instance type.
    type Vm: Instance;

    /// Whether [`ModelTarget::crash`] can make a live VM crash (`false`: no crash
    /// steps).
    const CRASHES: bool = true;
    /// Whether [`ModelTarget::hang_start`] can make a start hang (`false`, the default:
    /// no start-timeout steps).
    const HANGS_START: bool = false;
    /// How many disks and NICs the backend holds hot-plugged at once (its `configure`
    /// gives it that many ports); read only when it reports disk or NIC hot-plug.
    const HOTPLUG_PORTS: usize = 2;

    /// The VM `config` describes ([`ModelTarget::configure`] has been applied).
    fn create(config: InstanceConfig) -> Self::Vm;

    /// Adds what this backend needs to `config` (binaries, options, hot-plug ports);
    /// `dir` is the case's scratch directory, removed after it.
    fn configure(_config: &mut InstanceConfig, _dir: &Path) {}

    /// A NIC named `id` the backend can cold-plug and, when it reports NIC hot-plug,
    /// hot-plug. `None` (the default): no NIC steps.
    fn nic(_id: &str) -> Option<NicConfig> {
        None
    }

    /// Makes a running or paused VM crash (as its VMM dying would).
    async fn crash(vm: &Self::Vm);

    /// Makes the next start of `vm` (a `New` VM) hang, e.g. its guest never answers, so
    /// that only the start's deadline ends it. Called only with
    /// [`ModelTarget::HANGS_START`].
    fn hang_start(_vm: &Self::Vm) {}

    /// The runtime every case runs on (one for all: its lazily made fds are not leaks).
    fn runtime() -> &'static tokio::runtime::Runtime;
}

/// What `T` offers: a fresh instance's capabilities (whose hot-pluggers must be there
/// exactly when they are reported), its config's resources and `T`'s own abilities.
fn profile<T: ModelTarget>() -> Profile {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temp dir: {e}"));
    let config = sut::case_config::<T>(dir.path());
    let vm = T::create(config.clone());
    let caps = vm.vm_info().capabilities;
    assert_eq!(
        vm.cpu_hotplugger().is_some(),
        caps.contains(Capabilities::CPU_HOTPLUG),
        "a CpuHotplugger exactly when CPU_HOTPLUG is reported ({caps:?})"
    );
    assert_eq!(
        vm.memory_hotplugger().is_some(),
        caps.contains(Capabilities::MEMORY_HOTPLUG),
        "a MemoryHotplugger exactly when MEMORY_HOTPLUG is reported ({caps:?})"
    );
    drop(vm);
    let r = &config.resources;
    Profile {
        caps,
        boot_vcpus: r.boot_vcpus,
        max_vcpus: r.max_vcpus,
        memory_mib: r.memory_mib,
        max_memory_mib: r.max_memory_mib.unwrap_or(r.memory_mib),
        slots: r.memory_slots as usize,
        ports: T::HOTPLUG_PORTS,
        nics: T::nic("probe").is_some(),
        crashes: T::CRASHES,
        hangs_start: T::HANGS_START,
    }
}

/// One life of a VM, so that what the runtime and the backend make once (their fds,
/// threads) is there before the cases count.
fn warm_up<T: ModelTarget>(profile: Profile) {
    let mut sut = Sut::<T>::init_test(&Model::new(profile));
    sut.step(&Step::Start);
    sut.step(&Step::Shutdown);
}

/// Runs `cases` random sequences against `T`. On a failure: the broken invariant and the
/// shrunk sequence of steps.
///
/// # Errors
/// The failing case, shrunk, with the panic message that names the invariant.
pub fn run<T: ModelTarget>(cases: u32) -> Result<(), String> {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let profile = profile::<T>();
    contract::use_profile(profile);
    warm_up::<T>(profile);
    let mut runner = TestRunner::new(config.clone());
    let strategy = Contract::sequential_strategy(1..MAX_STEPS);
    let result = runner.run(&strategy, |(initial, transitions, seen)| {
        Sut::<T>::test_sequential(config.clone(), initial, transitions, seen);
        Ok(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, (_, steps, _))) => {
            let steps: Vec<String> = steps.iter().map(|s| format!("{s:?}")).collect();
            Err(format!(
                "{reason}\nshrunk sequence ({} steps): [{}]",
                steps.len(),
                steps.join(", ")
            ))
        }
        Err(TestError::Abort(reason)) => Err(format!("aborted: {reason}")),
    }
}

/// `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}
