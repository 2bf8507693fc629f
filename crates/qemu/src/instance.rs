//! [`QemuInstance`]: one VM. The state lives in [`Shared`], which the instance and its
//! background tasks (process monitor, QMP event pump) share; the tasks hold it weakly,
//! so dropping the instance kills its QEMU.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};
use vmkit_core::{
    Capabilities, CpuHotplugger, DeviceConfigurator, DiskConfig, Error as CoreError, ExitInfo,
    ExitReason, GuestClient, GuestCommunicator, GuestStream, GuestTransport, Instance,
    InstanceConfig, MemoryHotplugger, NicConfig, ResourceManager, ShutdownStage, StartOptions,
    StateCell, VmEvent, VmInfo, VmState,
};
use vmkit_proto::{AgentClient, StreamHeader};
use vmkit_qmp::QmpClient;
use vmkit_vsock::{AgentStream, GuestAddr};

use crate::devices::ColdDevices;
use crate::events::to_vm_event;
use crate::guest::{self, Agent, Link};
use crate::options::QemuOptions;
use crate::process::{Process, ProcessExit, tail};
use crate::{BACKEND_NAME, shutdown, start};

/// What the backend offers in this version (an instance without a guest agent,
/// `transport: none`, reports [`Capabilities::PAUSE`] only).
pub const CAPABILITIES: Capabilities = Capabilities::PAUSE
    .union(Capabilities::CPU_HOTPLUG)
    .union(Capabilities::MEMORY_HOTPLUG)
    .union(Capabilities::DISK_HOTPLUG)
    .union(Capabilities::NIC_HOTPLUG)
    .union(Capabilities::GUEST_AGENT)
    .union(Capabilities::GUEST_STREAMS)
    .union(Capabilities::VSOCK)
    .union(Capabilities::HYBRID_VSOCK);

/// How many lines of QEMU's stderr go into an error or a crash report.
pub(crate) const STDERR_LINES: usize = 8;

/// Locks `mutex`, also when a panicking holder poisoned it. Every critical section in
/// this crate is a few field reads and writes: a panic cannot leave the data
/// half-updated, so a poisoned lock is safe to keep using.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM run by QEMU. Created by [`crate::QemuBackend`]; implements [`Instance`].
pub struct QemuInstance {
    shared: Arc<Shared>,
    cpus: crate::hotplug::Cpus,
    memory: crate::hotplug::Memory,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("id", &self.shared.config.id)
            .field("state", &self.shared.state.get())
            .finish()
    }
}

/// The state of one VM, shared with its background tasks.
pub(crate) struct Shared {
    pub(crate) config: InstanceConfig,
    pub(crate) options: QemuOptions,
    pub(crate) state: StateCell,
    pub(crate) events: broadcast::Sender<VmEvent>,
    pub(crate) devices: Mutex<ColdDevices>,
    pub(crate) life: Mutex<Life>,
    /// `Some` once the VM is gone; every `wait`/`shutdown` caller reads it.
    pub(crate) exit: watch::Sender<Option<ExitInfo>>,
    /// Set by `shutdown` to cancel a `start` in progress.
    pub(crate) cancel: watch::Sender<bool>,
    /// Held while the VM's life is being ended ([`Shared::end`]), so that nobody sees
    /// the exit before everything is released.
    ending: tokio::sync::Mutex<()>,
    /// Held while the cached agent client is re-dialled, so callers share one dial.
    dialing: tokio::sync::Mutex<()>,
    /// Held by `pause` and `resume`, so run-state changes happen one at a time.
    pub(crate) run_changes: tokio::sync::Mutex<()>,
    /// Hot-plug calls, one at a time.
    pub(crate) hotplug: crate::hotplug::Queue,
    /// Devices hot-plugged while running.
    pub(crate) hot_devices: Mutex<Vec<crate::hotplug::HotDevice>>,
    /// Memory granted through virtio-mem, one entry per hot-plug call.
    pub(crate) virtio_mem_grants: Mutex<Vec<crate::hotplug::Grant>>,
}

/// What exists while the VM lives.
#[derive(Default)]
pub(crate) struct Life {
    pub(crate) process: Option<Arc<Process>>,
    pub(crate) qmp: Option<QmpClient>,
    /// TAP fds vmkit opened; closed when the VM is gone (a TAP vmkit created vanishes).
    pub(crate) tap_fds: Vec<OwnedFd>,
    /// A `shutdown` has begun; the exit is its to report.
    pub(crate) shutting_down: bool,
    /// The last SHUTDOWN event: (initiated by the guest, QEMU's reason).
    pub(crate) last_shutdown: Option<(bool, String)>,
    /// A GUEST_PANICKED event arrived.
    pub(crate) panicked: bool,
    /// The vsock link (daemon, CID), when the guest is reached over vsock.
    pub(crate) link: Option<Link>,
    /// The cached agent client.
    pub(crate) agent: Option<Agent>,
    /// Set when the guest link was found dead after a resume: every guest call then
    /// fails at once with this cause instead of waiting for its deadline.
    pub(crate) link_broken: Option<String>,
    /// The accelerator QEMU runs with (resolved at start).
    pub(crate) accel: Option<vmkit_core::Accel>,
    /// This VM's hold on its state dir, from the start until the VM is gone. Files in
    /// the dir are this VM's to remove only while it is held.
    pub(crate) state_lock: Option<vmkit_core::StateDirLock>,
    /// vCPU threads QEMU has started in this VM's life: boot vCPUs plus every hot-plug.
    /// Under TCG this may not exceed `max_vcpus` (see [`crate::hotplug`]'s vCPU notes).
    pub(crate) vcpu_threads: u32,
}

impl Shared {
    pub(crate) fn new(config: InstanceConfig, options: QemuOptions, devices: ColdDevices) -> Self {
        let (events, _) = broadcast::channel(256);
        Shared {
            config,
            options,
            state: StateCell::new(),
            events,
            devices: Mutex::new(devices),
            life: Mutex::new(Life::default()),
            exit: watch::channel(None).0,
            cancel: watch::channel(false).0,
            ending: tokio::sync::Mutex::new(()),
            dialing: tokio::sync::Mutex::new(()),
            run_changes: tokio::sync::Mutex::new(()),
            hotplug: crate::hotplug::Queue::default(),
            hot_devices: Mutex::new(Vec::new()),
            virtio_mem_grants: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn life(&self) -> MutexGuard<'_, Life> {
        lock(&self.life)
    }

    pub(crate) fn devices(&self) -> MutexGuard<'_, ColdDevices> {
        lock(&self.devices)
    }

    /// A checked transition that also publishes [`VmEvent::StateChanged`].
    pub(crate) fn transition(
        &self,
        op: &'static str,
        from: VmState,
        to: VmState,
    ) -> vmkit_core::Result<()> {
        self.state.transition(op, from, to)?;
        let _ = self.events.send(VmEvent::StateChanged { from, to });
        Ok(())
    }

    /// Makes the run state what QEMU reports (`running`: its vCPUs run): `Running ↔
    /// Paused` only; any other state is left alone. The one place a STOP or RESUME
    /// event, or a `query-status` answer, changes the state.
    pub(crate) fn follow_qemu(&self, running: bool) {
        let (from, to) = if running {
            (VmState::Paused, VmState::Running)
        } else {
            (VmState::Running, VmState::Paused)
        };
        // Not `from` (already there, starting, or gone): nothing to follow.
        let _ = self.transition("follow QEMU's run state", from, to);
        if !running {
            self.open_link(false);
        }
    }

    /// Lets the host's traffic reach the guest (`true`) or holds it (`false`; see
    /// [`vmkit_vsock::LinkGate`]). Held while QEMU's vCPUs, and so the vsock device's
    /// vrings, are stopped.
    pub(crate) fn open_link(&self, open: bool) {
        if let Some(link) = self.life().link.as_ref() {
            link.set_open(open);
        }
    }

    pub(crate) fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Waits until the VM is gone.
    pub(crate) async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_else(ExitInfo::never_started),
            // The sender lives in `self`: it cannot be dropped while we borrow it.
            Err(_) => ExitInfo::never_started(),
        }
    }

    /// Ends the VM's life: releases what it held (the vsock daemon and CID, QMP, the
    /// agent client, TAP fds, the control socket), moves to `Shutdown` and publishes
    /// `info`. The first call wins; a later call waits for it and changes nothing.
    /// Returns the exit in force (the first call's).
    pub(crate) async fn end(&self, info: ExitInfo) -> ExitInfo {
        let _ending = self.ending.lock().await;
        if let Some(first) = self.exit_info() {
            return first;
        }
        let (link, agent, qmp, taps, state_lock) = {
            let mut life = self.life();
            (
                life.link.take(),
                life.agent.take(),
                life.qmp.take(),
                std::mem::take(&mut life.tap_fds),
                life.state_lock.take(),
            )
        };
        drop(agent);
        if let Some(link) = link {
            link.release().await;
        }
        drop(qmp);
        drop(taps);
        // A start refused because another instance holds the dir never had it: the
        // sockets there are the other instance's.
        if state_lock.is_some() {
            // Plain unlinks, on the blocking pool (Drop does them inline).
            let config = self.config.clone();
            let _ = tokio::task::spawn_blocking(move || remove_control_socket(&config)).await;
        }
        drop(state_lock);
        if let Ok(from) = self
            .state
            .transition_from_any("shutdown", VmState::Shutdown)
        {
            let _ = self.events.send(VmEvent::StateChanged {
                from,
                to: VmState::Shutdown,
            });
        }
        tracing::info!(vm = %self.config.id, reason = ?info.reason, stage = ?info.stage, "VM gone");
        let _ = self.events.send(VmEvent::Exited(info.clone()));
        self.exit.send_replace(Some(info.clone()));
        info
    }

    /// The exit of a VM that stopped on its own (no `shutdown` under way).
    pub(crate) async fn unrequested_exit(&self, exit: ProcessExit) -> ExitInfo {
        let (last_shutdown, panicked) = {
            let life = self.life();
            (life.last_shutdown.clone(), life.panicked)
        };
        let stderr = tail(&self.config.layout().vmm_log(), STDERR_LINES).await;
        let (reason, message) = match (panicked, last_shutdown) {
            (true, _) => (
                ExitReason::GuestPanic,
                "the guest kernel panicked".to_owned(),
            ),
            (false, Some((true, reason))) if reason == "guest-reset" => (
                ExitReason::GuestShutdown,
                "the guest reset (rebooted or panicked); vmkit runs QEMU with -no-reboot"
                    .to_owned(),
            ),
            (false, Some((true, reason))) => (
                ExitReason::GuestShutdown,
                format!("the guest shut down ({reason})"),
            ),
            (false, Some((false, reason))) => (
                ExitReason::HostShutdown,
                format!("QEMU was stopped from outside vmkit ({reason})"),
            ),
            (false, None) => (
                ExitReason::Crashed,
                if stderr.is_empty() {
                    format!("QEMU died ({exit}) with no output on stderr")
                } else {
                    format!("QEMU died ({exit}): {stderr}")
                },
            ),
        };
        ExitInfo {
            reason,
            stage: None,
            exit_code: exit.code,
            signal: exit.signal,
            message: Some(message),
        }
    }

    /// The agent's address, once the VM has a vsock link.
    pub(crate) fn agent_addr(&self, op: &'static str) -> vmkit_core::Result<GuestAddr> {
        self.state
            .require(op, &[VmState::Running, VmState::Paused])?;
        let life = self.life();
        if let Some(cause) = &life.link_broken {
            return Err(CoreError::backend(
                op,
                crate::Error::GuestLinkBroken {
                    cause: cause.clone(),
                },
            ));
        }
        match &life.link {
            Some(link) => Ok(link.agent.clone()),
            None if self.config.transport == GuestTransport::None => Err(CoreError::unsupported(
                op,
                BACKEND_NAME,
                "the instance has no guest agent (transport: none)",
            )),
            None => Err(CoreError::InvalidState {
                op,
                state: self.state.get(),
            }),
        }
    }

    /// Whether guest RAM is shared with a vhost-user daemon (hybrid vsock), so that
    /// hot-added RAM must be shared too.
    pub(crate) fn shares_ram(&self) -> bool {
        matches!(
            self.life().link.as_ref().map(|l| &l.agent),
            Some(GuestAddr::HybridVsock { .. })
        )
    }

    pub(crate) fn qmp(&self, op: &'static str) -> vmkit_core::Result<QmpClient> {
        self.life()
            .qmp
            .clone()
            .ok_or_else(|| CoreError::InvalidState {
                op,
                state: self.state.get(),
            })
    }
}

/// Removes the QMP control socket (QEMU made it; nothing else removes it). The vsock
/// sockets are the link's: it removes them when it is released or dropped, so each
/// socket has one owner. Plain unlinks, also needed from `Drop`.
fn remove_control_socket(config: &InstanceConfig) {
    let socket = config.layout().control_socket();
    if let Err(e) = std::fs::remove_file(&socket)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the control socket");
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The instance is gone: its QEMU must not outlive it. Dropping the process
        // handle kills it (the supervisor reaps it), dropping the link kills the vsock
        // daemon; the sockets they served go too, then the state dir's lock.
        let life = self.life.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(process) = life.process.take()
            && process.exited().is_none()
        {
            tracing::warn!(
                pid = process.pid(),
                "instance dropped while QEMU runs: killing it"
            );
            process.signal(libc::SIGKILL);
        }
        drop(life.link.take());
        if let Some(lock) = life.state_lock.take() {
            remove_control_socket(&self.config);
            drop(lock);
        }
    }
}

/// Watches the process: when it exits while no `start` or `shutdown` is handling it
/// (a crash, or a guest that powered off by itself), ends the VM's life.
pub(crate) fn spawn_monitor(shared: &Arc<Shared>, process: Arc<Process>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    tokio::spawn(async move {
        let exit = process.wait().await;
        let Some(shared) = weak.upgrade() else { return };
        let handle = {
            let life = shared.life();
            !life.shutting_down && shared.state.get() != VmState::Starting
        };
        if handle {
            let info = shared.unrequested_exit(exit).await;
            shared.end(info).await;
        }
    });
}

/// Pumps QMP events into the VM's event stream and remembers what the exit report
/// needs. Ends with the QMP connection.
pub(crate) fn spawn_event_pump(shared: &Arc<Shared>, qmp: &QmpClient) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let mut rx = qmp.events();
    tokio::spawn(async move {
        loop {
            let event = match rx.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "QMP events dropped (slow event pump)");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some(vm_event) = to_vm_event(&event) else {
                return;
            };
            let Some(shared) = weak.upgrade() else { return };
            {
                let mut life = shared.life();
                match &vm_event {
                    VmEvent::ShutdownRequested { guest, reason } => {
                        life.last_shutdown = Some((*guest, reason.clone()));
                    }
                    VmEvent::GuestPanicked => life.panicked = true,
                    _ => {}
                }
            }
            match &vm_event {
                VmEvent::Stopped => shared.follow_qemu(false),
                VmEvent::Resumed => {
                    shared.follow_qemu(true);
                    // QEMU announces RESUME before it restarts the vsock device's
                    // vrings: the link opens a little later (a resume of ours opens it
                    // itself; this covers a `cont` from someone else).
                    let weak = Arc::downgrade(&shared);
                    tokio::spawn(async move {
                        tokio::time::sleep(crate::pause::LINK_SETTLE).await;
                        if let Some(shared) = weak.upgrade()
                            && shared.state.get() == VmState::Running
                        {
                            shared.open_link(true);
                        }
                    });
                }
                _ => {}
            }
            let _ = shared.events.send(vm_event);
        }
    });
}

impl QemuInstance {
    pub(crate) fn new(shared: Shared) -> Self {
        let shared = Arc::new(shared);
        QemuInstance {
            cpus: crate::hotplug::Cpus {
                shared: Arc::downgrade(&shared),
            },
            memory: crate::hotplug::Memory {
                shared: Arc::downgrade(&shared),
            },
            shared,
        }
    }

    /// Whether this instance can hot-plug memory: q35, an agent to online it, room above
    /// boot memory, and DIMM slots or virtio-mem.
    fn has_memory_hotplug(&self) -> bool {
        let config = &self.shared.config;
        let res = &config.resources;
        self.shared.options.machine == crate::options::Machine::Q35
            && config.transport != GuestTransport::None
            && (res.memory_slots > 0 || res.memory_hotplug == vmkit_core::MemoryHotplug::VirtioMem)
            && res.max_memory() > res.memory_mib
    }

    /// [`MemoryHotplugger::hotplug_memory`] into a chosen DIMM slot: QEMU's refusal
    /// of the slot comes back in the error, and nothing created for it is left.
    ///
    /// # Errors
    /// As [`MemoryHotplugger::hotplug_memory`]; `Unsupported` without memory hot-plug.
    pub async fn hotplug_memory_in_slot(
        &self,
        size_mib: u64,
        slot: u32,
    ) -> vmkit_core::Result<String> {
        if !self.has_memory_hotplug() {
            return Err(Self::not_yet(
                "hotplug_memory_in_slot",
                "this instance has no memory hot-plug (q35, an agent, memory_slots and max_memory_mib)",
            ));
        }
        self.memory.hotplug_at(size_mib, Some(slot)).await
    }

    /// Runs a disk or NIC hot-plug (`work`, named `op`) on the VM's hot-plug queue, once
    /// the instance can hot-plug PCIe devices and is running.
    async fn pcie_hotplug(
        &self,
        call: &'static str,
        kind: &str,
        op: String,
        work: impl std::future::Future<Output = vmkit_core::Result<()>> + Send + 'static,
    ) -> vmkit_core::Result<()> {
        if !self.has_pcie_hotplug() {
            return Err(Self::not_yet(
                call,
                &format!(
                    "{kind} hot-plug needs q35 with hot-plug root ports (backend option hotplug_ports)"
                ),
            ));
        }
        self.shared.state.require(call, &[VmState::Running])?;
        self.shared.hotplug.run(&self.shared, op, work).await
    }

    /// Whether this instance can hot-plug PCIe devices (disks, NICs): q35 with reserved
    /// root ports.
    fn has_pcie_hotplug(&self) -> bool {
        self.shared.options.machine == crate::options::Machine::Q35
            && self.shared.options.hotplug_ports > 0
    }

    /// Whether this instance can hot-plug vCPUs: q35, an agent to online them, and room
    /// above the boot vCPUs.
    fn has_cpu_hotplug(&self) -> bool {
        let config = &self.shared.config;
        self.shared.options.machine == crate::options::Machine::Q35
            && config.transport != GuestTransport::None
            && config.resources.max_vcpus > config.resources.boot_vcpus
    }

    /// The config the instance was created with (cold devices added later are not in it).
    pub fn config(&self) -> &InstanceConfig {
        &self.shared.config
    }

    /// The disks and NICs the VM boots with: the config's, then those added with
    /// `add_disk`/`add_nic`, in order.
    pub fn cold_devices(&self) -> crate::devices::ColdDevices {
        self.shared.devices().clone()
    }

    /// The backend options in force.
    pub fn options(&self) -> &QemuOptions {
        &self.shared.options
    }

    /// The VM's QMP client while it runs, for commands vmkit does not wrap (queries,
    /// diagnostics). Do not change what vmkit manages behind its back (devices it
    /// plugged, the run state): its view would go stale.
    pub fn qmp_client(&self) -> Option<QmpClient> {
        self.shared.life().qmp.clone()
    }

    fn not_yet(op: &str, reason: &str) -> CoreError {
        CoreError::unsupported(op, BACKEND_NAME, reason)
    }
}

#[async_trait]
impl Instance for QemuInstance {
    async fn start(&self, opts: StartOptions) -> vmkit_core::Result<()> {
        start::start(&self.shared, opts).await
    }

    async fn shutdown(&self) -> vmkit_core::Result<ExitInfo> {
        shutdown::shutdown(&self.shared).await
    }

    async fn pause(&self) -> vmkit_core::Result<()> {
        crate::pause::change(&self.shared, "pause", VmState::Paused).await
    }

    async fn resume(&self) -> vmkit_core::Result<()> {
        crate::pause::change(&self.shared, "resume", VmState::Running).await
    }

    async fn wait(&self) -> ExitInfo {
        self.shared.wait_exit().await
    }

    fn state(&self) -> VmState {
        self.shared.state.get()
    }

    fn vm_info(&self) -> VmInfo {
        let pid = self
            .shared
            .life()
            .process
            .as_ref()
            .filter(|p| p.exited().is_none())
            .map(|p| p.pid());
        let layout = self.shared.config.layout();
        let mut sockets = vec![("control".to_owned(), layout.control_socket())];
        let (cid, guest) = {
            let life = self.shared.life();
            match life.link.as_ref() {
                Some(link) => (Some(link.cid), Some(link.agent.clone())),
                None => (None, None),
            }
        };
        let hybrid = match &guest {
            Some(GuestAddr::HybridVsock { uds, .. }) => Some(uds.clone()),
            _ => None,
        };
        // What this instance offers: no guest parts without an agent, and once its link
        // exists, only the vsock flavour it uses.
        let capabilities = match (&self.shared.config.transport, cid, &hybrid) {
            (GuestTransport::None, _, _) => Capabilities::PAUSE,
            (_, Some(_), Some(_)) => CAPABILITIES.difference(Capabilities::VSOCK),
            (_, Some(_), None) => CAPABILITIES.difference(Capabilities::HYBRID_VSOCK),
            (_, None, _) => CAPABILITIES,
        };
        let mut capabilities = capabilities;
        if !self.has_cpu_hotplug() {
            capabilities.remove(Capabilities::CPU_HOTPLUG);
        }
        if !self.has_memory_hotplug() {
            capabilities.remove(Capabilities::MEMORY_HOTPLUG);
        }
        if !self.has_pcie_hotplug() {
            capabilities.remove(Capabilities::DISK_HOTPLUG | Capabilities::NIC_HOTPLUG);
        }
        if let Some(uds) = hybrid {
            sockets.push(("vsock".to_owned(), uds));
        }
        VmInfo {
            id: self.shared.config.id.clone(),
            backend: BACKEND_NAME.to_owned(),
            state: self.shared.state.get(),
            pid,
            cid,
            sockets,
            guest,
            capabilities,
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.shared.events.subscribe()
    }
}

#[async_trait]
impl DeviceConfigurator for QemuInstance {
    fn add_disk(&self, disk: DiskConfig) -> vmkit_core::Result<()> {
        let mut devices = self.shared.devices();
        self.shared.state.require("add_disk", &[VmState::New])?;
        devices.add_disk(disk)
    }

    fn add_nic(&self, nic: NicConfig) -> vmkit_core::Result<()> {
        let mut devices = self.shared.devices();
        self.shared.state.require("add_nic", &[VmState::New])?;
        devices.add_nic(nic)
    }

    async fn hotplug_disk(&self, disk: DiskConfig) -> vmkit_core::Result<()> {
        let op = format!("hotplug_disk {}", disk.id);
        let work = crate::hotplug::add_disk(Arc::clone(&self.shared), disk);
        self.pcie_hotplug("hotplug_disk", "disk", op, work).await
    }

    async fn hotplug_nic(&self, nic: NicConfig) -> vmkit_core::Result<()> {
        let op = format!("hotplug_nic {}", nic.id);
        let work = crate::hotplug::add_nic(Arc::clone(&self.shared), nic);
        self.pcie_hotplug("hotplug_nic", "NIC", op, work).await
    }

    async fn unplug(&self, id: &str) -> vmkit_core::Result<()> {
        self.shared.state.require("unplug", &[VmState::Running])?;
        let shared = Arc::clone(&self.shared);
        self.shared
            .hotplug
            .run(
                &self.shared,
                format!("unplug {id}"),
                crate::hotplug::remove_device(shared, id.to_owned()),
            )
            .await
    }
}

impl QemuInstance {
    /// The typed agent client (the cached connection; see [`GuestCommunicator::client`]).
    ///
    /// # Errors
    /// As [`GuestCommunicator::client`].
    pub async fn agent(&self) -> vmkit_core::Result<AgentClient> {
        Ok(AgentClient::new(self.client().await?))
    }

    /// Opens a raw stream on the agent's stream port (`vmkit_proto::STREAM_PORT`): an
    /// echo, or a program's stdio. Its bytes travel in frames; `shutdown()` ends your
    /// side, EOF on read is the agent's end.
    ///
    /// Allowed in: `Running`. Deadline: the config's `timeouts.dial`.
    ///
    /// # Errors
    /// `InvalidState`, `Unsupported` (no agent), `Backend` with the agent's refusal.
    pub async fn open_stream(&self, header: &StreamHeader) -> vmkit_core::Result<AgentStream> {
        let addr = self.shared.agent_addr("open_stream")?;
        self.shared
            .state
            .require("open_stream", &[VmState::Running])?;
        vmkit_vsock::open_stream(
            &addr.with_port(vmkit_proto::STREAM_PORT),
            header,
            self.shared.config.timeouts.dial,
        )
        .await
        .map_err(|e| guest::core_error("open_stream", e))
    }
}

#[async_trait]
impl GuestCommunicator for QemuInstance {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        cached_client(&self.shared).await
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self.shared.agent_addr("dial_client")?;
        vmkit_vsock::connect_ttrpc(&addr, self.shared.config.timeouts.dial)
            .await
            .map_err(|e| guest::core_error("dial_client", e))
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        let addr = self.shared.agent_addr("dial_client_with_retry")?;
        // Counted as connected once the agent answers a Ping on it: through
        // vhost-device-vsock a connection can be accepted and reset right after.
        let deadline = tokio::time::Instant::now() + timeout;
        guest::wait_for_agent(&addr, deadline)
            .await
            .map(|agent| agent.client)
            .map_err(|e| match e {
                crate::Error::Vsock(v) => guest::core_error("dial_client_with_retry", v),
                other => CoreError::backend("dial_client_with_retry", other),
            })
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        let addr = self.shared.agent_addr("start_stream")?;
        self.shared
            .state
            .require("start_stream", &[VmState::Running])?;
        let conn = vmkit_vsock::dial(&addr.with_port(port), self.shared.config.timeouts.dial)
            .await
            .map_err(|e| guest::core_error("start_stream", e))?;
        Ok(Box::new(conn))
    }
}

impl ResourceManager for QemuInstance {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        self.has_cpu_hotplug()
            .then_some(&self.cpus as &dyn CpuHotplugger)
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        self.has_memory_hotplug()
            .then_some(&self.memory as &dyn MemoryHotplugger)
    }
}

/// The VM's cached agent client, re-dialled (and verified with a `Ping`) when its
/// connection is seen closed.
pub(crate) async fn cached_client(shared: &Arc<Shared>) -> vmkit_core::Result<GuestClient> {
    let addr = shared.agent_addr("client")?;
    let cached = |shared: &Shared| {
        shared
            .life()
            .agent
            .as_ref()
            .filter(|a| a.is_alive())
            .map(|a| a.client.clone())
    };
    if let Some(client) = cached(shared) {
        return Ok(client);
    }
    // One re-dial for all callers that found the connection dead.
    let _dialing = shared.dialing.lock().await;
    if let Some(client) = cached(shared) {
        return Ok(client);
    }
    // A fresh connection counts once the agent answers on it: one accepted and then
    // dropped (an agent restarting) is dialled again, within the dial deadline.
    let deadline = tokio::time::Instant::now() + shared.config.timeouts.dial;
    let agent = guest::wait_for_agent(&addr, deadline)
        .await
        .map_err(|e| match e {
            crate::Error::Vsock(v) => guest::core_error("client: re-dial the agent", v),
            other => CoreError::backend("client: re-dial the agent", other),
        })?;
    let client = agent.client.clone();
    let mut life = shared.life();
    if life.link.is_none() {
        // The VM ended while we dialled.
        return Err(CoreError::InvalidState {
            op: "client",
            state: shared.state.get(),
        });
    }
    life.agent = Some(agent);
    tracing::debug!(vm = %shared.config.id, %addr, "agent client re-dialled");
    Ok(client)
}

/// The stage's [`ExitInfo`] once QEMU is gone during a `shutdown`.
pub(crate) fn requested_exit(shared: &Shared, stage: ShutdownStage, exit: ProcessExit) -> ExitInfo {
    let guest_initiated = matches!(shared.life().last_shutdown, Some((true, _)));
    // The graceful stages ask the guest, which then shuts itself down.
    let graceful = matches!(
        stage,
        ShutdownStage::GuestPowerOff | ShutdownStage::AcpiPowerdown
    );
    let reason = if graceful && guest_initiated {
        ExitReason::GuestShutdown
    } else {
        ExitReason::HostShutdown
    };
    ExitInfo {
        reason,
        stage: Some(stage),
        exit_code: exit.code,
        signal: exit.signal,
        message: None,
    }
}
