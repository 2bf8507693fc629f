//! The reference: the `Instance` contract as a state machine over [`Model`], with the
//! steps a sequence is made of. What a backend offers ([`Profile`]) decides which steps
//! are drawn and what each should do.

use proptest::prelude::*;
use proptest::strategy::Union;
use proptest_state_machine::ReferenceStateMachine;
use vmkit_core::{Capabilities, VmState};

/// What the model knows of the backend under test: the capabilities its instance
/// reports, the resources of the config, and what its [`super::ModelTarget`] can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// The capabilities a fresh instance reports in `vm_info()`.
    pub caps: Capabilities,
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// vCPUs at most.
    pub max_vcpus: u32,
    /// Boot memory (MiB).
    pub memory_mib: u64,
    /// Memory at most (MiB).
    pub max_memory_mib: u64,
    /// DIMM slots.
    pub slots: usize,
    /// Devices (disks and NICs) hot-plugged at once, at most.
    pub ports: usize,
    /// The target gives NICs ([`super::ModelTarget::nic`]).
    pub nics: bool,
    /// The target can crash a live VM.
    pub crashes: bool,
    /// The target can make a start hang.
    pub hangs_start: bool,
}

impl Profile {
    fn has(&self, cap: Capabilities) -> bool {
        self.caps.contains(cap)
    }
}

std::thread_local! {
    /// The profile of the target [`super::run`] is running (the reference's strategies
    /// are plain functions; `run` sets it on the thread that draws and shrinks).
    static PROFILE: std::cell::Cell<Option<Profile>> = const { std::cell::Cell::new(None) };
}

/// Makes `profile` the one the reference draws from on this thread.
pub(crate) fn use_profile(profile: Profile) {
    PROFILE.with(|p| p.set(Some(profile)));
}

/// What a step's call should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Succeed.
    Ok,
    /// Be refused by the state table (`InvalidState`).
    WrongState,
    /// Be refused for a bad argument (`BadArgument`: a count out of range, a boot vCPU,
    /// a vCPU slot taken).
    BadArgument,
    /// Be refused for naming what is not there (`NotFound`).
    NotFound,
    /// Be refused for want of room (`Exhausted`: no slot, port or memory left).
    Exhausted,
    /// Be refused as something the backend does not offer (`Unsupported`).
    Unsupported,
    /// End by its deadline (`Timeout`).
    Timeout,
    /// Fail any other way (never expected: a failure the contract does not name).
    Failed,
}

/// The reference model of one VM.
#[derive(Debug, Clone)]
pub struct Model {
    /// What the backend offers.
    pub profile: Profile,
    /// Its state.
    pub state: VmState,
    /// vCPUs present.
    pub vcpus: u32,
    /// Sizes (MiB) of the hot-plugged memory, in plug order.
    pub dimms: Vec<u64>,
    /// Hot-plugged disks and NICs.
    pub hot: usize,
    /// What the last step should have done.
    pub expect: Expect,
}

impl Model {
    /// A VM in `New` of a backend with `profile`.
    pub fn new(profile: Profile) -> Model {
        Model {
            profile,
            state: VmState::New,
            vcpus: profile.boot_vcpus,
            dimms: Vec::new(),
            hot: 0,
            expect: Expect::Ok,
        }
    }
}

/// Which vCPU slot [`Step::HotplugCpuAt`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The next free slot (as the backend reported it before); with none free,
    /// `hotplug_cpu` is called instead, which must say `Exhausted`.
    Next,
    /// The slot of vCPU 0.
    Taken,
    /// A slot the VM does not have.
    Nowhere,
}

/// Which vCPU [`Step::UnplugCpu`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The last one present (a boot vCPU when none was added).
    Last,
    /// vCPU 0, a boot vCPU.
    Boot,
    /// An index past `max_vcpus`.
    Beyond,
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `add_disk` (a cold disk).
    AddDisk,
    /// `add_nic` (a cold NIC).
    AddNic,
    /// `start`.
    Start,
    /// `start` made to hang: its deadline must end it, the VM ended, nothing left.
    StartTimesOut,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `set_vcpus(n)`.
    SetVcpus(u32),
    /// `hotplug_cpu_at` (or `hotplug_cpu`, see [`Slot::Next`]).
    HotplugCpuAt(Slot),
    /// `unplug_cpu`.
    UnplugCpu(Pick),
    /// `hotplug_memory(MiB)`.
    HotplugMemory(u64),
    /// `unplug_memory` of the i-th plugged memory (none there: a made-up id).
    UnplugMemory(usize),
    /// `hotplug_disk`.
    HotplugDisk,
    /// `hotplug_nic`.
    HotplugNic,
    /// `unplug` of the i-th hot-plugged disk or NIC (none there: a made-up id).
    Unplug(usize),
    /// `client()` and a `Ping` on it, then `start_stream` of the agent's stream port.
    GuestCall,
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

impl ReferenceStateMachine for Contract {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        #[allow(clippy::panic)] // a harness bug, not a backend's
        let profile = PROFILE
            .with(std::cell::Cell::get)
            .unwrap_or_else(|| panic!("the model runs through model::run, which sets the profile"));
        Just(Model::new(profile)).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let p = state.profile;
        let mut steps: Vec<(u32, BoxedStrategy<Step>)> = vec![
            (1, Just(Step::AddDisk).boxed()),
            (3, Just(Step::Start).boxed()),
            (2, Just(Step::Pause).boxed()),
            (2, Just(Step::Resume).boxed()),
            (2, Just(Step::HotplugDisk).boxed()),
            (1, (0..3usize).prop_map(Step::Unplug).boxed()),
            (2, Just(Step::GuestCall).boxed()),
            (1, Just(Step::Shutdown).boxed()),
            (1, Just(Step::TwoShutdownsAtOnce).boxed()),
        ];
        if p.nics {
            steps.push((1, Just(Step::AddNic).boxed()));
            steps.push((2, Just(Step::HotplugNic).boxed()));
        }
        if p.crashes {
            steps.push((1, Just(Step::Crash).boxed()));
        }
        if p.hangs_start {
            steps.push((1, Just(Step::StartTimesOut).boxed()));
        }
        if p.has(Capabilities::CPU_HOTPLUG) {
            let slot = prop_oneof![Just(Slot::Next), Just(Slot::Taken), Just(Slot::Nowhere)];
            let pick = prop_oneof![Just(Pick::Last), Just(Pick::Boot), Just(Pick::Beyond)];
            steps.push((2, (0..=p.max_vcpus + 1).prop_map(Step::SetVcpus).boxed()));
            steps.push((2, slot.prop_map(Step::HotplugCpuAt).boxed()));
            steps.push((1, pick.prop_map(Step::UnplugCpu).boxed()));
        }
        if p.has(Capabilities::MEMORY_HOTPLUG) {
            let sizes = (1..=4u64).prop_map(|k| Step::HotplugMemory(k * 128));
            steps.push((2, sizes.boxed()));
            steps.push((1, (0..3usize).prop_map(Step::UnplugMemory).boxed()));
        }
        Union::new_weighted(steps).boxed()
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        let live = matches!(state.state, VmState::Running | VmState::Paused);
        match step {
            // A crash needs a VM that runs.
            Step::Crash => live,
            // A paused guest cannot answer; its calls are not the model's.
            Step::GuestCall => state.state != VmState::Paused,
            // Only a fresh VM's start is made to hang.
            Step::StartTimesOut => state.state == VmState::New,
            _ => true,
        }
    }

    fn apply(mut m: Model, step: &Step) -> Model {
        m.expect = expect(&mut m, step);
        m
    }
}

/// What `step` should do from `m`, applying it to `m`.
fn expect(m: &mut Model, step: &Step) -> Expect {
    use VmState::{New, Paused, Running, Shutdown};
    let p = m.profile;
    let running = m.state == Running;
    match step {
        Step::AddDisk | Step::AddNic if m.state == New => Expect::Ok,
        Step::Start if m.state == New => {
            m.state = Running;
            Expect::Ok
        }
        Step::StartTimesOut if m.state == New => {
            m.state = Shutdown;
            Expect::Timeout
        }
        Step::Pause if running && !p.has(Capabilities::PAUSE) => Expect::Unsupported,
        Step::Pause if running => {
            m.state = Paused;
            Expect::Ok
        }
        Step::Resume if m.state == Paused => {
            m.state = Running;
            Expect::Ok
        }
        Step::HotplugDisk if running => hot_device(m, Capabilities::DISK_HOTPLUG),
        Step::HotplugNic if running => hot_device(m, Capabilities::NIC_HOTPLUG),
        Step::Unplug(_)
            if running && !p.has(Capabilities::DISK_HOTPLUG | Capabilities::NIC_HOTPLUG) =>
        {
            Expect::Unsupported
        }
        Step::Unplug(i) if running => {
            if *i < m.hot {
                m.hot -= 1;
                Expect::Ok
            } else {
                Expect::NotFound
            }
        }
        Step::GuestCall if running && !p.has(Capabilities::GUEST_AGENT) => Expect::Unsupported,
        Step::GuestCall if running => Expect::Ok,
        Step::Crash | Step::Shutdown | Step::TwoShutdownsAtOnce => {
            m.state = Shutdown;
            Expect::Ok
        }
        Step::SetVcpus(_) | Step::HotplugCpuAt(_) | Step::UnplugCpu(_) if running => {
            vcpu_step(m, step)
        }
        Step::HotplugMemory(_) | Step::UnplugMemory(_) if running => memory_step(m, step),
        _ => Expect::WrongState,
    }
}

/// A disk or NIC hot-plug of a running VM.
fn hot_device(m: &mut Model, cap: Capabilities) -> Expect {
    if !m.profile.has(cap) {
        Expect::Unsupported
    } else if m.hot < m.profile.ports {
        m.hot += 1;
        Expect::Ok
    } else {
        Expect::Exhausted
    }
}

/// A vCPU step of a running VM.
fn vcpu_step(m: &mut Model, step: &Step) -> Expect {
    let p = m.profile;
    match step {
        Step::SetVcpus(n) if (p.boot_vcpus..=p.max_vcpus).contains(n) => {
            m.vcpus = *n;
            Expect::Ok
        }
        Step::SetVcpus(_) => Expect::BadArgument,
        Step::HotplugCpuAt(Slot::Next) if m.vcpus < p.max_vcpus => {
            m.vcpus += 1;
            Expect::Ok
        }
        Step::HotplugCpuAt(Slot::Next) => Expect::Exhausted,
        Step::HotplugCpuAt(Slot::Taken) => Expect::BadArgument,
        Step::HotplugCpuAt(Slot::Nowhere) | Step::UnplugCpu(Pick::Beyond) => Expect::NotFound,
        Step::UnplugCpu(Pick::Last) if m.vcpus > p.boot_vcpus => {
            m.vcpus -= 1;
            Expect::Ok
        }
        Step::UnplugCpu(_) => Expect::BadArgument,
        _ => Expect::Failed,
    }
}

/// A memory step of a running VM.
fn memory_step(m: &mut Model, step: &Step) -> Expect {
    let p = m.profile;
    match step {
        Step::HotplugMemory(mib) => {
            let total = p.memory_mib + m.dimms.iter().sum::<u64>() + mib;
            if total <= p.max_memory_mib && m.dimms.len() < p.slots {
                m.dimms.push(*mib);
                Expect::Ok
            } else {
                Expect::Exhausted
            }
        }
        Step::UnplugMemory(i) if *i < m.dimms.len() => {
            m.dimms.remove(*i);
            Expect::Ok
        }
        Step::UnplugMemory(_) => Expect::NotFound,
        _ => Expect::Failed,
    }
}
