//! A model-based test of the life cycle (proptest-state-machine): random sequences of
//! cold devices, start, pause, resume, vCPU/memory/disk hot-plug and unplug, crashes and
//! concurrent shutdowns, run against FakeBackend and checked after every step against a
//! reference model of the contract:
//! - `state()` equals the model's state;
//! - a call succeeds exactly when the model says it may, and is refused with
//!   `InvalidState` exactly when the state table forbids it;
//! - `Shutdown` is terminal;
//! - a VM that is gone has released what it took (agent sockets, the state dir's lock),
//!   and concurrent shutdowns report one `ExitInfo`.
//!
//! 2,000 cases by default; `PROPTEST_CASES` sets more or fewer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::LazyLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use vmkit_core::{
    DeviceConfigurator, DiskConfig, Error, ExitReason, Instance, InstanceConfig, ResourceManager,
    StartOptions, VmState,
};
use vmkit_testkit::fake_backend::{FakeBackend, FakeInstance};

const BOOT_VCPUS: u32 = 1;
const MAX_VCPUS: u32 = 4;
const MEMORY_MIB: u64 = 256;
const MAX_MEMORY_MIB: u64 = 1024;
const SLOTS: usize = 2;
const PORTS: usize = 2;

/// What a step's call should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    /// Refused by the state table.
    WrongState,
    /// Refused for another reason (a bad size, no such device, no room).
    Refused,
}

#[derive(Debug, Clone)]
struct Model {
    state: VmState,
    vcpus: u32,
    dimms: Vec<u64>,
    hot_disks: usize,
    expect: Expect,
}

#[derive(Debug, Clone)]
enum Step {
    AddDisk,
    Start,
    Pause,
    Resume,
    SetVcpus(u32),
    HotplugMemory(u64),
    UnplugMemory(usize),
    HotplugDisk,
    Unplug(usize),
    Crash,
    Shutdown,
    TwoShutdownsAtOnce,
}

struct Contract;

impl ReferenceStateMachine for Contract {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            state: VmState::New,
            vcpus: BOOT_VCPUS,
            dimms: Vec::new(),
            hot_disks: 0,
            expect: Expect::Ok,
        })
        .boxed()
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
        use VmState::{New, Paused, Running, Shutdown};
        let running = m.state == Running;
        m.expect = match step {
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
                    Expect::Refused
                }
            }
            Step::HotplugMemory(mib) if running => {
                let total = MEMORY_MIB + m.dimms.iter().sum::<u64>() + mib;
                if total <= MAX_MEMORY_MIB && m.dimms.len() < SLOTS {
                    m.dimms.push(*mib);
                    Expect::Ok
                } else {
                    Expect::Refused
                }
            }
            Step::UnplugMemory(i) if running => {
                if *i < m.dimms.len() {
                    m.dimms.remove(*i);
                    Expect::Ok
                } else {
                    Expect::Refused
                }
            }
            Step::HotplugDisk if running => {
                if m.hot_disks < PORTS {
                    m.hot_disks += 1;
                    Expect::Ok
                } else {
                    Expect::Refused
                }
            }
            Step::Unplug(i) if running => {
                if *i < m.hot_disks {
                    m.hot_disks -= 1;
                    Expect::Ok
                } else {
                    Expect::Refused
                }
            }
            Step::Crash | Step::Shutdown | Step::TwoShutdownsAtOnce => {
                m.state = Shutdown;
                Expect::Ok
            }
            _ => Expect::WrongState,
        };
        m
    }
}

/// One runtime for every case (the fake VMs' agents run on it).
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
});

struct Sut {
    dir: tempfile::TempDir,
    vm: FakeInstance,
    /// The ids of the hot-plugged memory and disks, in plug order.
    dimm_ids: Vec<String>,
    disk_ids: Vec<String>,
    next_disk: u32,
}

impl Sut {
    fn disk(&mut self) -> DiskConfig {
        self.next_disk += 1;
        DiskConfig::new(
            format!("d{}", self.next_disk),
            self.dir.path().join("vmlinuz"),
        )
    }

    /// Nothing of a gone VM is left; a live one serves its agent.
    fn check_released(&self) {
        let state = &self.vm.config().state_dir;
        let gone = self.vm.state() == VmState::Shutdown;
        for name in ["agent.sock", "stream.sock", "vmkit.lock"] {
            let exists = state.join(name).exists();
            if gone {
                assert!(!exists, "{name} left behind after the VM ended");
            }
        }
        let live = matches!(self.vm.state(), VmState::Running | VmState::Paused);
        assert_eq!(
            state.join("agent.sock").exists(),
            live,
            "the agent socket exists exactly while the VM lives"
        );
    }
}

fn kind<T>(result: &vmkit_core::Result<T>) -> Expect {
    match result {
        Ok(_) => Expect::Ok,
        Err(Error::InvalidState { .. }) => Expect::WrongState,
        Err(_) => Expect::Refused,
    }
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = Contract;

    fn init_test(_model: &Model) -> Sut {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"never read").unwrap();
        let mut config = InstanceConfig::new(
            "model",
            dir.path().join("state"),
            dir.path().join("vmlinuz"),
        );
        config.resources.boot_vcpus = BOOT_VCPUS;
        config.resources.max_vcpus = MAX_VCPUS;
        config.resources.memory_mib = MEMORY_MIB;
        config.resources.max_memory_mib = Some(MAX_MEMORY_MIB);
        config.resources.memory_slots = u32::try_from(SLOTS).unwrap();
        config.timeouts.command = Duration::from_millis(200);
        config
            .backend_options
            .insert("hotplug_ports".into(), PORTS.to_string());
        let vm = FakeBackend.create_fake(config).unwrap();
        Sut {
            dir,
            vm,
            dimm_ids: Vec::new(),
            disk_ids: Vec::new(),
            next_disk: 0,
        }
    }

    fn apply(mut sut: Sut, model: &Model, step: Step) -> Sut {
        let before = sut.vm.state();
        let got = RUNTIME.block_on(async {
            let vm = &sut.vm;
            match &step {
                Step::AddDisk => {
                    let disk = sut.disk();
                    kind(&sut.vm.add_disk(disk))
                }
                Step::Start => kind(&vm.start(StartOptions::new()).await),
                Step::Pause => kind(&vm.pause().await),
                Step::Resume => kind(&vm.resume().await),
                Step::SetVcpus(n) => match vm.cpu_hotplugger() {
                    Some(cpus) => {
                        let r = cpus.set_vcpus(*n).await;
                        if let Ok(resized) = &r {
                            assert_eq!(resized.achieved, *n, "{resized:?}");
                        }
                        kind(&r)
                    }
                    None => panic!("max_vcpus 4 > 1 but no CpuHotplugger"),
                },
                Step::HotplugMemory(mib) => {
                    let r = vm.memory_hotplugger().unwrap().hotplug_memory(*mib).await;
                    if let Ok(id) = &r {
                        sut.dimm_ids.push(id.clone());
                    }
                    kind(&r)
                }
                Step::UnplugMemory(i) => {
                    let id = sut
                        .dimm_ids
                        .get(*i)
                        .cloned()
                        .unwrap_or_else(|| "none".into());
                    let r = vm.memory_hotplugger().unwrap().unplug_memory(&id).await;
                    if r.is_ok() {
                        sut.dimm_ids.remove(*i);
                    }
                    kind(&r)
                }
                Step::HotplugDisk => {
                    sut.next_disk += 1;
                    let id = format!("h{}", sut.next_disk);
                    let r = vm
                        .hotplug_disk(DiskConfig::new(&id, sut.dir.path().join("vmlinuz")))
                        .await;
                    if r.is_ok() {
                        sut.disk_ids.push(id);
                    }
                    kind(&r)
                }
                Step::Unplug(i) => {
                    let id = sut
                        .disk_ids
                        .get(*i)
                        .cloned()
                        .unwrap_or_else(|| "none".into());
                    let r = vm.unplug(&id).await;
                    if r.is_ok() {
                        sut.disk_ids.remove(*i);
                    }
                    kind(&r)
                }
                Step::Crash => {
                    let exit = vm.crash().await;
                    assert_eq!(exit.reason, ExitReason::Crashed);
                    Expect::Ok
                }
                Step::Shutdown => kind(&vm.shutdown().await),
                Step::TwoShutdownsAtOnce => {
                    let (a, b) = tokio::join!(vm.shutdown(), vm.shutdown());
                    let (a, b) = (a.unwrap(), b.unwrap());
                    assert_eq!(a, b, "concurrent shutdowns disagree");
                    Expect::Ok
                }
            }
        });
        assert_eq!(
            got, model.expect,
            "{step:?} in {before}: got {got:?}, the contract says {:?}",
            model.expect
        );
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        assert_eq!(
            sut.vm.state(),
            model.state,
            "state() disagrees with the model"
        );
        sut.check_released();
        if matches!(model.state, VmState::Running | VmState::Paused) {
            let memory = RUNTIME
                .block_on(sut.vm.memory_hotplugger().unwrap().query_memory())
                .unwrap();
            assert_eq!(memory.plugged_mib, model.dimms.iter().sum::<u64>());
            let cpus = RUNTIME
                .block_on(sut.vm.cpu_hotplugger().unwrap().query_cpus())
                .unwrap();
            assert_eq!(cpus.len(), model.vcpus as usize);
        }
    }

    fn teardown(sut: Sut) {
        let exit = RUNTIME.block_on(sut.vm.shutdown()).unwrap();
        assert_eq!(
            RUNTIME.block_on(sut.vm.shutdown()).unwrap(),
            exit,
            "Shutdown is terminal"
        );
        assert_eq!(sut.vm.state(), VmState::Shutdown);
        sut.check_released();
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn the_fake_backend_keeps_the_contract(sequential 1..24 => Sut);
}
