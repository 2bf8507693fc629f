//! The system under test: one VM of a [`ModelTarget`], driven step by step and checked
//! against the [`Contract`] after each.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest_state_machine::StateMachineTest;
use tokio::sync::broadcast::{self, error::TryRecvError};
use vmkit_core::{
    Capabilities, CpuHotplugger, CpuTopology, DeviceConfigurator, DeviceState, DiskConfig, Error,
    ExitReason, GuestCommunicator, Instance, InstanceConfig, MemoryHotplugger, ResourceManager,
    StartOptions, VmEvent, VmState,
};

use super::ModelTarget;
use super::contract::{Contract, Expect, Model, Pick, Slot, Step};
use crate::leaks::{children, open_fds, processes_mentioning};

/// How long one call of a step may take before the model calls it hung.
const CALL_BOUND: Duration = Duration::from_secs(30);
/// How long a published event may take to arrive (a plugin relays them).
const EVENT_GRACE: Duration = Duration::from_secs(2);
/// The deadline of a start made to hang ([`Step::StartTimesOut`]).
const HUNG_START: Duration = Duration::from_millis(100);

/// The backend under test for one sequence.
pub struct Sut<T: ModelTarget> {
    dir: tempfile::TempDir,
    config: InstanceConfig,
    vm: T::Vm,
    events: broadcast::Receiver<VmEvent>,
    /// Where the `StateChanged` events have brought the VM, and whether `Exited` came.
    published: VmState,
    exited: bool,
    /// The ids of the hot-plugged memory, disks and NICs, in plug order.
    dimm_ids: Vec<String>,
    hot_ids: Vec<String>,
    /// Ids of the cold devices the steps added, in order.
    cold_ids: Vec<String>,
    next_id: u32,
    /// vCPU slots as the backend reported them, by index.
    slots: BTreeMap<u32, CpuTopology>,
    /// What the last failed call said.
    last_error: Option<String>,
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

/// A case's config: the model's resources, then what the target adds; `dir` gets the
/// (never read) kernel and a disk image.
pub(crate) fn case_config<T: ModelTarget>(dir: &Path) -> InstanceConfig {
    let kernel = dir.join("vmlinuz");
    std::fs::write(&kernel, b"never read")
        .and_then(|()| std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]))
        .unwrap_or_else(|e| panic!("write the case's files: {e}"));
    let mut config = InstanceConfig::new("model", dir.join("state"), &kernel);
    let r = &mut config.resources;
    r.boot_vcpus = super::BOOT_VCPUS;
    r.max_vcpus = super::MAX_VCPUS;
    r.memory_mib = super::MEMORY_MIB;
    r.max_memory_mib = Some(super::MAX_MEMORY_MIB);
    r.memory_slots = super::SLOTS;
    T::configure(&mut config, dir);
    config
}

/// The kind of a call's outcome, as the model names them.
fn kind<V>(result: &vmkit_core::Result<V>) -> Expect {
    match result {
        Ok(_) => Expect::Ok,
        Err(Error::InvalidState { .. }) => Expect::WrongState,
        Err(Error::BadArgument { .. }) => Expect::BadArgument,
        Err(Error::NotFound { .. }) => Expect::NotFound,
        Err(Error::Exhausted { .. }) => Expect::Exhausted,
        Err(Error::Unsupported { .. }) => Expect::Unsupported,
        Err(Error::Timeout { .. }) => Expect::Timeout,
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

/// The i-th id of `ids`, or one no device has ("none").
fn nth_or_made_up(ids: &[String], i: usize) -> String {
    ids.get(i).cloned().unwrap_or_else(|| "none".into())
}

/// A vCPU slot no VM has.
const NOWHERE: CpuTopology = CpuTopology {
    socket: 1000,
    core: 1000,
    thread: 1000,
};

impl<T: ModelTarget> Sut<T> {
    /// Runs `call` on the target's runtime, bounded by [`CALL_BOUND`].
    fn call<F: std::future::Future>(&self, what: &str, call: F) -> F::Output {
        T::runtime()
            .block_on(async { tokio::time::timeout(CALL_BOUND, call).await })
            .unwrap_or_else(|_| panic!("{what} did not return within {CALL_BOUND:?}"))
    }

    /// The outcome's kind, remembering an error's text for the failure message.
    fn outcome<V>(&mut self, result: &vmkit_core::Result<V>) -> Expect {
        self.last_error = result.as_ref().err().map(ToString::to_string);
        kind(result)
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    fn disk(&mut self, prefix: &str) -> DiskConfig {
        DiskConfig::new(self.new_id(prefix), self.dir.path().join("disk.img"))
    }

    fn nic(&mut self, prefix: &str) -> vmkit_core::NicConfig {
        let id = self.new_id(prefix);
        T::nic(&id).unwrap_or_else(|| panic!("the profile has NICs but the target gave none"))
    }

    fn cpus(&self) -> &dyn CpuHotplugger {
        self.vm
            .cpu_hotplugger()
            .unwrap_or_else(|| panic!("CPU_HOTPLUG is reported but there is no CpuHotplugger"))
    }

    fn memory(&self) -> &dyn MemoryHotplugger {
        self.vm.memory_hotplugger().unwrap_or_else(|| {
            panic!("MEMORY_HOTPLUG is reported but there is no MemoryHotplugger")
        })
    }

    /// The vCPUs present, remembering their slots.
    fn present_vcpus(&mut self) -> u32 {
        let cpus = self
            .call("query_cpus", self.cpus().query_cpus())
            .unwrap_or_else(|e| panic!("query_cpus: {e}"));
        for cpu in &cpus {
            self.slots.insert(cpu.index, cpu.topology);
        }
        u32::try_from(cpus.len()).unwrap_or(u32::MAX)
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

    /// Reads the events published so far: each `StateChanged` must go on from where the
    /// last one left the VM, `Exited` come once and only after `Shutdown`. Waits (up to
    /// [`EVENT_GRACE`]) until they have caught up with `state`.
    fn follow_events(&mut self, state: VmState) {
        let deadline = Instant::now() + EVENT_GRACE;
        loop {
            match self.events.try_recv() {
                Ok(VmEvent::StateChanged { from, to }) => {
                    assert_eq!(
                        from, self.published,
                        "StateChanged {from} → {to} after the events had reached {}",
                        self.published
                    );
                    self.published = to;
                }
                Ok(VmEvent::Exited(exit)) => {
                    assert!(!self.exited, "a second Exited: {exit:?}");
                    assert_eq!(
                        self.published,
                        VmState::Shutdown,
                        "Exited before StateChanged to Shutdown"
                    );
                    self.exited = true;
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(n)) => panic!("{n} events lost (Lagged)"),
                Err(TryRecvError::Empty | TryRecvError::Closed) => {
                    let caught_up =
                        self.published == state && (state != VmState::Shutdown || self.exited);
                    if caught_up {
                        return;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the events reached {} (Exited: {}) but the VM is {state}",
                        self.published,
                        self.exited
                    );
                    std::thread::sleep(Duration::from_millis(5));
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

    pub(crate) fn step(&mut self, step: &Step) -> Expect {
        match step {
            Step::AddDisk => {
                let disk = self.disk("c");
                let id = disk.id.clone();
                let r = self.vm.add_disk(disk);
                self.cold_step(r, id)
            }
            Step::AddNic => {
                let nic = self.nic("cn");
                let id = nic.id.clone();
                let r = self.vm.add_nic(nic);
                self.cold_step(r, id)
            }
            Step::Start => {
                let r = self.call("start", self.vm.start(StartOptions::new()));
                self.outcome(&r)
            }
            Step::StartTimesOut => {
                T::hang_start(&self.vm);
                let began = Instant::now();
                let r = self.call(
                    "a hung start",
                    self.vm.start(StartOptions::with_timeout(HUNG_START)),
                );
                let took = began.elapsed();
                assert!(
                    took < HUNG_START + Duration::from_secs(5),
                    "a start with a {HUNG_START:?} deadline took {took:?}"
                );
                self.outcome(&r)
            }
            Step::Pause => {
                let r = self.call("pause", self.vm.pause());
                self.outcome(&r)
            }
            Step::Resume => {
                let r = self.call("resume", self.vm.resume());
                self.outcome(&r)
            }
            Step::GuestCall => self.guest_call(),
            Step::Crash => {
                self.call("crash", async {
                    T::crash(&self.vm).await;
                    let exit = tokio::time::timeout(Duration::from_secs(10), self.vm.wait())
                        .await
                        .unwrap_or_else(|_| panic!("wait() did not end within 10 s of a crash"));
                    assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
                });
                Expect::Ok
            }
            Step::Shutdown => {
                let r = self.call("shutdown", self.vm.shutdown());
                self.outcome(&r)
            }
            Step::TwoShutdownsAtOnce => {
                let (a, b) = self.call("two shutdowns", async {
                    tokio::join!(self.vm.shutdown(), self.vm.shutdown())
                });
                let (a, b) = (
                    a.unwrap_or_else(|e| panic!("the first shutdown failed: {e}")),
                    b.unwrap_or_else(|e| panic!("the second shutdown failed: {e}")),
                );
                assert_eq!(a, b, "concurrent shutdowns disagree");
                Expect::Ok
            }
            Step::HotplugDisk | Step::HotplugNic | Step::Unplug(_) => self.device_step(step),
            Step::SetVcpus(_) | Step::HotplugCpuAt(_) | Step::UnplugCpu(_) => self.vcpu_step(step),
            Step::HotplugMemory(_) | Step::UnplugMemory(_) => self.memory_step(step),
        }
    }

    /// `client()` + `Ping`; then the stream port opens exactly when `GUEST_STREAMS` is
    /// reported.
    fn guest_call(&mut self) -> Expect {
        let client = self.call("client", self.vm.client());
        let Ok(client) = client else {
            return self.outcome(&client);
        };
        if let Err(e) = self.call("Ping", crate::conformance::agent_ping(client)) {
            self.last_error = Some(format!("Ping on client(): {e}"));
            return Expect::Failed;
        }
        let streams = self
            .vm
            .vm_info()
            .capabilities
            .contains(Capabilities::GUEST_STREAMS);
        let stream = self.call(
            "start_stream",
            self.vm.start_stream(vmkit_proto::STREAM_PORT),
        );
        match (streams, &stream) {
            (true, Ok(_)) | (false, Err(Error::Unsupported { .. })) => Expect::Ok,
            (true, Err(e)) => {
                self.last_error = Some(format!("start_stream with GUEST_STREAMS: {e}"));
                Expect::Failed
            }
            (false, _) => {
                self.last_error =
                    Some("start_stream without GUEST_STREAMS did not say Unsupported".into());
                Expect::Failed
            }
        }
    }

    fn device_step(&mut self, step: &Step) -> Expect {
        let (r, id) = match step {
            Step::HotplugDisk => {
                let disk = self.disk("h");
                let id = disk.id.clone();
                (
                    self.call("hotplug_disk", self.vm.hotplug_disk(disk)),
                    Some(id),
                )
            }
            Step::HotplugNic => {
                let nic = self.nic("hn");
                let id = nic.id.clone();
                (self.call("hotplug_nic", self.vm.hotplug_nic(nic)), Some(id))
            }
            Step::Unplug(i) => {
                let id = nth_or_made_up(&self.hot_ids, *i);
                let r = self.call("unplug", self.vm.unplug(&id));
                if r.is_ok() {
                    self.hot_ids.remove(*i);
                }
                (r, None)
            }
            other => panic!("{other:?} is not a device step"),
        };
        if let (Ok(()), Some(id)) = (&r, id) {
            self.hot_ids.push(id);
        }
        let outcome = self.outcome(&r);
        self.checked_listing(outcome)
    }

    /// A cold device added (`id`, when `r` is `Ok`), then the listing checked.
    fn cold_step(&mut self, r: vmkit_core::Result<()>, id: String) -> Expect {
        if r.is_ok() {
            self.cold_ids.push(id);
        }
        let outcome = self.outcome(&r);
        self.checked_listing(outcome)
    }

    /// `outcome`, or `Failed` (saying why) when `devices()` disagrees with the calls.
    fn checked_listing(&mut self, outcome: Expect) -> Expect {
        match self.devices_disagree() {
            None => outcome,
            Some(why) => {
                self.last_error = Some(why);
                Expect::Failed
            }
        }
    }

    /// How `devices()` differs from the devices the calls added and removed: the cold
    /// ones (after the config's own) in order, then the hot ones, all attached.
    fn devices_disagree(&self) -> Option<String> {
        let listed = self.vm.devices();
        let cold: Vec<&str> = listed.iter().filter(|d| !d.hot).map(|d| d.id()).collect();
        let hot: Vec<&str> = listed.iter().filter(|d| d.hot).map(|d| d.id()).collect();
        let cold_ok = cold.ends_with(&self.cold_ids.iter().map(String::as_str).collect::<Vec<_>>());
        let attached = listed.iter().all(|d| d.state == DeviceState::Attached);
        if cold_ok && hot == self.hot_ids && attached {
            return None;
        }
        Some(format!(
            "devices() lists {listed:?}; the calls added cold {:?} and hot {:?}",
            self.cold_ids, self.hot_ids
        ))
    }

    fn vcpu_step(&mut self, step: &Step) -> Expect {
        // In another state the call must be refused before its argument is looked at.
        let present = if self.vm.state() == VmState::Running {
            self.present_vcpus()
        } else {
            0
        };
        let r = match step {
            Step::SetVcpus(n) => {
                let r = self.call("set_vcpus", self.cpus().set_vcpus(*n));
                if let Ok(resized) = &r {
                    assert_eq!(resized.achieved, *n, "set_vcpus({n}): {resized:?}");
                }
                r.map(drop)
            }
            Step::HotplugCpuAt(slot) => {
                let at = match slot {
                    Slot::Next => self.slots.get(&present).copied(),
                    Slot::Taken => Some(self.slots.get(&0).copied().unwrap_or(NOWHERE)),
                    Slot::Nowhere => Some(NOWHERE),
                };
                let cpus = self.cpus();
                let r = match at {
                    Some(at) => self.call("hotplug_cpu_at", cpus.hotplug_cpu_at(at)),
                    None => self.call("hotplug_cpu", cpus.hotplug_cpu()),
                };
                if let Ok(cpu) = &r {
                    self.slots.insert(cpu.index, cpu.topology);
                }
                r.map(drop)
            }
            Step::UnplugCpu(pick) => {
                let index = match pick {
                    Pick::Last => present.saturating_sub(1),
                    Pick::Boot => 0,
                    Pick::Beyond => self.config.resources.max_vcpus + 1,
                };
                self.call("unplug_cpu", self.cpus().unplug_cpu(index))
            }
            other => panic!("{other:?} is not a vCPU step"),
        };
        self.outcome(&r)
    }

    fn memory_step(&mut self, step: &Step) -> Expect {
        let r = match step {
            Step::HotplugMemory(mib) => {
                let r = self.call("hotplug_memory", self.memory().hotplug_memory(*mib));
                if let Ok(id) = &r {
                    self.dimm_ids.push(id.clone());
                }
                r.map(drop)
            }
            Step::UnplugMemory(i) => {
                let id = nth_or_made_up(&self.dimm_ids, *i);
                let r = self.call("unplug_memory", self.memory().unplug_memory(&id));
                if r.is_ok() {
                    self.dimm_ids.remove(*i);
                }
                r
            }
            other => panic!("{other:?} is not a memory step"),
        };
        self.outcome(&r)
    }
}

impl<T: ModelTarget> StateMachineTest for Sut<T> {
    type SystemUnderTest = Sut<T>;
    type Reference = Contract;

    fn init_test(_model: &Model) -> Sut<T> {
        let fds = open_fds();
        let children = children();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temp dir: {e}"));
        let config = case_config::<T>(dir.path());
        let vm = T::create(config.clone());
        let events = vm.events();
        Sut {
            dir,
            config,
            vm,
            events,
            published: VmState::New,
            exited: false,
            dimm_ids: Vec::new(),
            hot_ids: Vec::new(),
            cold_ids: Vec::new(),
            next_id: 0,
            slots: BTreeMap::new(),
            last_error: None,
            sockets: Vec::new(),
            fds,
            children,
            _target: PhantomData,
        }
    }

    fn apply(mut sut: Sut<T>, model: &Model, step: Step) -> Sut<T> {
        let before = sut.vm.state();
        sut.last_error = None;
        let got = sut.step(&step);
        sut.note_sockets();
        assert_eq!(
            got,
            model.expect,
            "{step:?} in {before}: got {got:?}, the contract says {:?}{}",
            model.expect,
            sut.last_error
                .as_deref()
                .map(|e| format!(" (the error: {e})"))
                .unwrap_or_default()
        );
        sut.follow_events(model.state);
        if model.state == VmState::Shutdown {
            sut.check_released();
        }
        sut
    }

    fn check_invariants(sut: &Sut<T>, model: &Model) {
        assert_eq!(
            sut.vm.state(),
            model.state,
            "state() disagrees with the model"
        );
        if !matches!(model.state, VmState::Running | VmState::Paused) {
            return;
        }
        let caps = model.profile.caps;
        if caps.contains(Capabilities::MEMORY_HOTPLUG) {
            let memory = sut
                .call("query_memory", sut.memory().query_memory())
                .unwrap_or_else(|e| panic!("query_memory: {e}"));
            assert_eq!(
                memory.plugged_mib,
                model.dimms.iter().sum::<u64>(),
                "plugged memory disagrees with the model"
            );
        }
        if caps.contains(Capabilities::CPU_HOTPLUG) {
            let cpus = sut
                .call("query_cpus", sut.cpus().query_cpus())
                .unwrap_or_else(|e| panic!("query_cpus: {e}"));
            assert_eq!(
                cpus.len(),
                model.vcpus as usize,
                "vCPUs disagree with the model"
            );
        }
    }

    fn teardown(mut sut: Sut<T>) {
        let exit = sut
            .call("the last shutdown", sut.vm.shutdown())
            .unwrap_or_else(|e| panic!("the last shutdown failed: {e}"));
        let again = sut
            .call("a shutdown after the end", sut.vm.shutdown())
            .unwrap_or_else(|e| panic!("a shutdown after the end failed: {e}"));
        assert_eq!(again, exit, "Shutdown is terminal");
        assert_eq!(sut.vm.state(), VmState::Shutdown);
        sut.follow_events(VmState::Shutdown);
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
