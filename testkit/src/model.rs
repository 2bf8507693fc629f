//! The model-based test of the `Instance` contract (feature `model`,
//! proptest-state-machine): random sequences of cold devices, start, pause, resume,
//! vCPU/memory/disk hot-plug and unplug, crashes and concurrent shutdowns, run against a
//! backend and checked after every step against a reference model of the contract:
//!
//! - `state()` equals the model's state;
//! - a call succeeds exactly when the model says it may, and is refused with
//!   `InvalidState` exactly when the state table forbids it, with `BadArgument` for a
//!   count out of range, `NotFound` for an id that is not there and `Exhausted` when no
//!   slot, port or memory is left — each exactly when the model says so;
//! - the vCPUs and memory the backend reports are what the model plugged;
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

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use vmkit_core::{
    DeviceConfigurator, DiskConfig, Error, ExitReason, Instance, InstanceConfig, ResourceManager,
    StartOptions, VmState,
};

use crate::leaks::{children, open_fds, processes_mentioning};

/// vCPUs at boot.
pub const BOOT_VCPUS: u32 = 1;
/// vCPUs at most.
pub const MAX_VCPUS: u32 = 4;
/// Boot memory (MiB).
pub const MEMORY_MIB: u64 = 256;
/// Memory at most (MiB).
pub const MAX_MEMORY_MIB: u64 = 1024;
/// DIMM slots.
pub const SLOTS: usize = 2;
/// Hot-plug ports (disks at once).
pub const PORTS: usize = 2;
/// Steps in a sequence, at most.
const MAX_STEPS: usize = 24;

/// A backend under the model test.
#[async_trait::async_trait]
pub trait ModelTarget: 'static {
    /// The instance type.
    type Vm: Instance;

    /// The VM `config` describes (its resources and `hotplug_ports` are the model's;
    /// [`ModelTarget::configure`] has been applied).
    fn create(config: InstanceConfig) -> Self::Vm;

    /// Adds what this backend needs to `config` (binaries, options); `dir` is the case's
    /// scratch directory, removed after it.
    fn configure(_config: &mut InstanceConfig, _dir: &Path) {}

    /// Makes a running or paused VM crash (as its VMM dying would).
    async fn crash(vm: &Self::Vm);

    /// The runtime every case runs on (one for all: its lazily made fds are not leaks).
    fn runtime() -> &'static tokio::runtime::Runtime;
}

/// What a step's call should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Succeed.
    Ok,
    /// Be refused by the state table (`InvalidState`).
    WrongState,
    /// Be refused for a bad argument (`BadArgument`: a count out of range).
    BadArgument,
    /// Be refused for naming what is not there (`NotFound`).
    NotFound,
    /// Be refused for want of room (`Exhausted`: no slot, port or memory left).
    Exhausted,
    /// Fail any other way (never expected: a failure the contract does not name).
    Failed,
}

/// The reference model of one VM.
#[derive(Debug, Clone)]
pub struct Model {
    /// Its state.
    pub state: VmState,
    /// vCPUs present.
    pub vcpus: u32,
    /// Sizes (MiB) of the hot-plugged memory, in plug order.
    pub dimms: Vec<u64>,
    /// Hot-plugged disks.
    pub hot_disks: usize,
    /// What the last step should have done.
    pub expect: Expect,
}

/// One step of a sequence.
#[derive(Debug, Clone)]
pub enum Step {
    /// `add_disk` (a cold disk).
    AddDisk,
    /// `start`.
    Start,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `set_vcpus(n)`.
    SetVcpus(u32),
    /// `hotplug_memory(MiB)`.
    HotplugMemory(u64),
    /// `unplug_memory` of the i-th plugged memory (none there: a made-up id).
    UnplugMemory(usize),
    /// `hotplug_disk`.
    HotplugDisk,
    /// `unplug` of the i-th hot-plugged disk (none there: a made-up id).
    Unplug(usize),
    /// The VM crashes.
    Crash,
    /// `shutdown`.
    Shutdown,
    /// Two `shutdown`s at once.
    TwoShutdownsAtOnce,
}

/// The contract as a reference state machine.
#[derive(Debug)]
pub struct Contract;

impl Contract {
    fn init_state_value() -> Model {
        Model {
            state: VmState::New,
            vcpus: BOOT_VCPUS,
            dimms: Vec::new(),
            hot_disks: 0,
            expect: Expect::Ok,
        }
    }
}

impl ReferenceStateMachine for Contract {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Contract::init_state_value()).boxed()
    }

    fn transitions(_state: &Model) -> BoxedStrategy<Step> {
        prop_oneof![
            1 => Just(Step::AddDisk),
            3 => Just(Step::Start),
            2 => Just(Step::Pause),
            2 => Just(Step::Resume),
            2 => (0..=MAX_VCPUS + 1).prop_map(Step::SetVcpus),
            2 => (1..=4u64).prop_map(|k| Step::HotplugMemory(k * 128)),
            1 => (0..3usize).prop_map(Step::UnplugMemory),
            2 => Just(Step::HotplugDisk),
            1 => (0..3usize).prop_map(Step::Unplug),
            1 => Just(Step::Crash),
            1 => Just(Step::Shutdown),
            1 => Just(Step::TwoShutdownsAtOnce),
        ]
        .boxed()
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        // A crash needs a VM that runs.
        !matches!(step, Step::Crash) || matches!(state.state, VmState::Running | VmState::Paused)
    }

    fn apply(mut m: Model, step: &Step) -> Model {
        m.expect = expect(&mut m, step);
        m
    }
}

/// What `step` should do from `m`, applying it to `m`.
fn expect(m: &mut Model, step: &Step) -> Expect {
    use VmState::{New, Paused, Running, Shutdown};
    let running = m.state == Running;
    match step {
        Step::AddDisk if m.state == New => Expect::Ok,
        Step::Start if m.state == New => {
            m.state = Running;
            Expect::Ok
        }
        Step::Pause if running => {
            m.state = Paused;
            Expect::Ok
        }
        Step::Resume if m.state == Paused => {
            m.state = Running;
            Expect::Ok
        }
        Step::SetVcpus(n) if running => {
            if (BOOT_VCPUS..=MAX_VCPUS).contains(n) {
                m.vcpus = *n;
                Expect::Ok
            } else {
                Expect::BadArgument
            }
        }
        Step::HotplugMemory(mib) if running => {
            let total = MEMORY_MIB + m.dimms.iter().sum::<u64>() + mib;
            if total <= MAX_MEMORY_MIB && m.dimms.len() < SLOTS {
                m.dimms.push(*mib);
                Expect::Ok
            } else {
                Expect::Exhausted
            }
        }
        Step::UnplugMemory(i) if running => {
            if *i < m.dimms.len() {
                m.dimms.remove(*i);
                Expect::Ok
            } else {
                Expect::NotFound
            }
        }
        Step::HotplugDisk if running => {
            if m.hot_disks < PORTS {
                m.hot_disks += 1;
                Expect::Ok
            } else {
                Expect::Exhausted
            }
        }
        Step::Unplug(i) if running => {
            if *i < m.hot_disks {
                m.hot_disks -= 1;
                Expect::Ok
            } else {
                Expect::NotFound
            }
        }
        Step::Crash | Step::Shutdown | Step::TwoShutdownsAtOnce => {
            m.state = Shutdown;
            Expect::Ok
        }
        _ => Expect::WrongState,
    }
}

/// The backend under test for one sequence.
pub struct Sut<T: ModelTarget> {
    dir: tempfile::TempDir,
    config: InstanceConfig,
    vm: T::Vm,
    /// The ids of the hot-plugged memory and disks, in plug order.
    dimm_ids: Vec<String>,
    disk_ids: Vec<String>,
    next_disk: u32,
    /// Every socket the VM reported while it lived.
    sockets: Vec<(String, PathBuf)>,
    /// This process's open fds before the sequence.
    fds: usize,
    /// This process's children before the sequence (a backend process serving every
    /// case is not a leak of one).
    children: Vec<u32>,
    _target: PhantomData<T>,
}

impl<T: ModelTarget> std::fmt::Debug for Sut<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sut").field("id", &self.config.id).finish()
    }
}

fn kind<V>(result: &vmkit_core::Result<V>) -> Expect {
    match result {
        Ok(_) => Expect::Ok,
        Err(Error::InvalidState { .. }) => Expect::WrongState,
        Err(Error::BadArgument { .. }) => Expect::BadArgument,
        Err(Error::NotFound { .. }) => Expect::NotFound,
        Err(Error::Exhausted { .. }) => Expect::Exhausted,
        Err(_) => Expect::Failed,
    }
}

/// Waits up to `within` for `done`.
fn settles(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

impl<T: ModelTarget> Sut<T> {
    fn disk_path(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// Remembers the sockets a live VM reports, to check they go when it ends.
    fn note_sockets(&mut self) {
        if matches!(self.vm.state(), VmState::Running | VmState::Paused) {
            for (role, socket) in self.vm.vm_info().sockets {
                if !self.sockets.iter().any(|(_, s)| s == &socket) {
                    self.sockets.push((role, socket));
                }
            }
        }
    }

    /// A live VM's sockets exist; a gone VM's sockets, lock and processes do not.
    fn check_released(&self) {
        let state = self.vm.state();
        if matches!(state, VmState::Running | VmState::Paused) {
            for (role, socket) in self.vm.vm_info().sockets {
                assert!(
                    socket.exists(),
                    "the live VM's {role} socket {} is missing",
                    socket.display()
                );
            }
        }
        if state != VmState::Shutdown {
            return;
        }
        for (role, socket) in &self.sockets {
            assert!(
                !socket.exists(),
                "the {role} socket {} is left after the VM ended",
                socket.display()
            );
        }
        let lock = self.config.layout().lock_file();
        assert!(!lock.exists(), "the lock {} is left", lock.display());
        let state_dir = self.config.state_dir.clone();
        assert!(
            settles(Duration::from_secs(2), || processes_mentioning(&state_dir)
                .is_empty()),
            "processes of the ended VM are left: {:?}",
            processes_mentioning(&state_dir)
        );
    }

    fn step(&mut self, step: &Step) -> Expect {
        let runtime = T::runtime();
        match step {
            Step::AddDisk => {
                self.next_disk += 1;
                let disk = DiskConfig::new(format!("c{}", self.next_disk), self.disk_path());
                kind(&self.vm.add_disk(disk))
            }
            Step::Start => kind(&runtime.block_on(self.vm.start(StartOptions::new()))),
            Step::Pause => kind(&runtime.block_on(self.vm.pause())),
            Step::Resume => kind(&runtime.block_on(self.vm.resume())),
            Step::Crash => runtime.block_on(async {
                T::crash(&self.vm).await;
                let exit = tokio::time::timeout(Duration::from_secs(10), self.vm.wait())
                    .await
                    .unwrap_or_else(|_| panic!("wait() did not end within 10 s of a crash"));
                assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
                Expect::Ok
            }),
            Step::Shutdown => kind(&runtime.block_on(self.vm.shutdown())),
            Step::TwoShutdownsAtOnce => runtime.block_on(async {
                let (a, b) = tokio::join!(self.vm.shutdown(), self.vm.shutdown());
                let (a, b) = (
                    a.unwrap_or_else(|e| panic!("the first shutdown failed: {e}")),
                    b.unwrap_or_else(|e| panic!("the second shutdown failed: {e}")),
                );
                assert_eq!(a, b, "concurrent shutdowns disagree");
                Expect::Ok
            }),
            hotplug => self.hotplug_step(hotplug),
        }
    }

    /// The hot-plug steps.
    fn hotplug_step(&mut self, step: &Step) -> Expect {
        let runtime = T::runtime();
        match step {
            Step::SetVcpus(n) => {
                let cpus = self
                    .vm
                    .cpu_hotplugger()
                    .unwrap_or_else(|| panic!("max_vcpus {MAX_VCPUS} > 1 but no CpuHotplugger"));
                let r = runtime.block_on(cpus.set_vcpus(*n));
                if let Ok(resized) = &r {
                    assert_eq!(resized.achieved, *n, "set_vcpus({n}): {resized:?}");
                }
                kind(&r)
            }
            Step::HotplugMemory(mib) => {
                let r = runtime.block_on(self.memory().hotplug_memory(*mib));
                if let Ok(id) = &r {
                    self.dimm_ids.push(id.clone());
                }
                kind(&r)
            }
            Step::UnplugMemory(i) => {
                let id = self
                    .dimm_ids
                    .get(*i)
                    .cloned()
                    .unwrap_or_else(|| "none".into());
                let r = runtime.block_on(self.memory().unplug_memory(&id));
                if r.is_ok() {
                    self.dimm_ids.remove(*i);
                }
                kind(&r)
            }
            Step::HotplugDisk => {
                self.next_disk += 1;
                let id = format!("h{}", self.next_disk);
                let disk = DiskConfig::new(&id, self.disk_path());
                let r = runtime.block_on(self.vm.hotplug_disk(disk));
                if r.is_ok() {
                    self.disk_ids.push(id);
                }
                kind(&r)
            }
            Step::Unplug(i) => {
                let id = self
                    .disk_ids
                    .get(*i)
                    .cloned()
                    .unwrap_or_else(|| "none".into());
                let r = runtime.block_on(self.vm.unplug(&id));
                if r.is_ok() {
                    self.disk_ids.remove(*i);
                }
                kind(&r)
            }
            other => panic!("{other:?} is not a hot-plug step"),
        }
    }

    fn memory(&self) -> &dyn vmkit_core::MemoryHotplugger {
        self.vm
            .memory_hotplugger()
            .unwrap_or_else(|| panic!("memory_slots {SLOTS} but no MemoryHotplugger"))
    }
}

impl<T: ModelTarget> StateMachineTest for Sut<T> {
    type SystemUnderTest = Sut<T>;
    type Reference = Contract;

    fn init_test(_model: &Model) -> Sut<T> {
        let fds = open_fds();
        let children = children();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temp dir: {e}"));
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"never read")
            .and_then(|()| std::fs::write(dir.path().join("disk.img"), vec![0u8; 1 << 20]))
            .unwrap_or_else(|e| panic!("write the case's files: {e}"));
        let mut config = InstanceConfig::new("model", dir.path().join("state"), &kernel);
        config.resources.boot_vcpus = BOOT_VCPUS;
        config.resources.max_vcpus = MAX_VCPUS;
        config.resources.memory_mib = MEMORY_MIB;
        config.resources.max_memory_mib = Some(MAX_MEMORY_MIB);
        config.resources.memory_slots = SLOTS as u32;
        config
            .backend_options
            .insert("hotplug_ports".into(), PORTS.to_string());
        T::configure(&mut config, dir.path());
        let vm = T::create(config.clone());
        Sut {
            dir,
            config,
            vm,
            dimm_ids: Vec::new(),
            disk_ids: Vec::new(),
            next_disk: 0,
            sockets: Vec::new(),
            fds,
            children,
            _target: PhantomData,
        }
    }

    fn apply(mut sut: Sut<T>, model: &Model, step: Step) -> Sut<T> {
        let before = sut.vm.state();
        let got = sut.step(&step);
        sut.note_sockets();
        assert_eq!(
            got, model.expect,
            "{step:?} in {before}: got {got:?}, the contract says {:?}",
            model.expect
        );
        sut
    }

    fn check_invariants(sut: &Sut<T>, model: &Model) {
        assert_eq!(
            sut.vm.state(),
            model.state,
            "state() disagrees with the model"
        );
        if matches!(model.state, VmState::Running | VmState::Paused) {
            let runtime = T::runtime();
            let memory = runtime
                .block_on(sut.memory().query_memory())
                .unwrap_or_else(|e| panic!("query_memory: {e}"));
            assert_eq!(
                memory.plugged_mib,
                model.dimms.iter().sum::<u64>(),
                "plugged memory disagrees with the model"
            );
            let cpus = sut
                .vm
                .cpu_hotplugger()
                .map(|c| runtime.block_on(c.query_cpus()))
                .unwrap_or_else(|| panic!("no CpuHotplugger"))
                .unwrap_or_else(|e| panic!("query_cpus: {e}"));
            assert_eq!(
                cpus.len(),
                model.vcpus as usize,
                "vCPUs disagree with the model"
            );
        }
    }

    fn teardown(sut: Sut<T>) {
        let runtime = T::runtime();
        let exit = runtime
            .block_on(sut.vm.shutdown())
            .unwrap_or_else(|e| panic!("the last shutdown failed: {e}"));
        let again = runtime
            .block_on(sut.vm.shutdown())
            .unwrap_or_else(|e| panic!("a shutdown after the end failed: {e}"));
        assert_eq!(again, exit, "Shutdown is terminal");
        assert_eq!(sut.vm.state(), VmState::Shutdown);
        sut.check_released();
        let Sut {
            vm,
            fds,
            dir,
            children: before,
            ..
        } = sut;
        drop(vm);
        drop(dir);
        let new_children = || {
            children()
                .into_iter()
                .filter(|c| !before.contains(c))
                .collect::<Vec<_>>()
        };
        assert!(
            settles(Duration::from_secs(2), || new_children().is_empty()),
            "child processes left: {:?}",
            new_children()
        );
        assert!(
            settles(Duration::from_secs(2), || open_fds() <= fds),
            "fds leaked: {fds} open before the sequence, {} after",
            open_fds()
        );
    }
}

/// One life of a VM, so that what the runtime and the backend make once (their fds,
/// threads) is there before the cases count.
fn warm_up<T: ModelTarget>() {
    let mut sut = Sut::<T>::init_test(&Contract::init_state_value());
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
    warm_up::<T>();
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
