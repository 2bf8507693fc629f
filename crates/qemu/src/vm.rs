//! [`Vm`]: one VM's owner. It holds what the VM was made of (config, options, the
//! feature set, the cold devices), its [`Lifecycle`], its hot-plug state, its event
//! stream, and while it boots or runs the [`Running`] value of that boot. Everything
//! else reaches the VM through its methods.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use vmkit_core::{
    DeviceSpec, Error as CoreError, ExitInfo, ExitReason, GuestClient, GuestTransport,
    InstanceConfig, Lifecycle, VmEvent, VmState,
};
use vmkit_proto::AgentClient;
use vmkit_qmp::QmpClient;
use vmkit_vsock::GuestAddr;

use crate::BACKEND_NAME;
use crate::devices::{ColdDevices, DeviceTable};
use crate::error::Error;
use crate::features::Features;
use crate::guest::{self, Link};
use crate::hotplug::{AgentSource, Context, Hotplug, Limits};
use crate::locks::lock;
use crate::options::QemuOptions;
use crate::process::{Process, ProcessExit, tail};
use crate::qmp::Qmp;
use crate::running::Running;

/// How long a live agent may take to answer a probe of the virtio-serial link (it
/// answers in well under a millisecond; a slower answer only costs a fresh dial).
const SERIAL_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// How many lines of QEMU's stderr go into an error or a crash report.
pub(crate) const STDERR_LINES: usize = 8;

/// What QEMU's events said about how the VM is ending, for the exit report.
#[derive(Debug, Default, Clone)]
struct Clues {
    /// The last SHUTDOWN event: (initiated by the guest, QEMU's reason).
    last_shutdown: Option<(bool, String)>,
    /// A GUEST_PANICKED event arrived.
    panicked: bool,
}

/// One VM.
pub(crate) struct Vm {
    config: InstanceConfig,
    options: QemuOptions,
    features: Features,
    events: broadcast::Sender<VmEvent>,
    life: Lifecycle,
    devices: Arc<DeviceTable>,
    hotplug: Arc<Hotplug>,
    /// What the current boot took; `None` before a start and once the VM is gone.
    running: Mutex<Option<Running>>,
    clues: Mutex<Clues>,
    /// Held while the cached agent client is re-dialled, so callers share one dial.
    dialing: tokio::sync::Mutex<()>,
}

impl Vm {
    /// A VM in `New` (the config and options already validated), with the config's
    /// own devices in its table.
    ///
    /// # Errors
    /// `InvalidConfig` for a device of the config, as `add_device` would say.
    pub(crate) fn new(config: InstanceConfig, options: QemuOptions) -> vmkit_core::Result<Self> {
        let (events, _) = broadcast::channel(256);
        let features = Features::of(&config, &options);
        let devices = DeviceTable::new(features.virtio_fs);
        let disks = config.disks.iter().cloned().map(DeviceSpec::Disk);
        let nics = config.nics.iter().cloned().map(DeviceSpec::Nic);
        for spec in disks.chain(nics) {
            devices.add_cold(spec, || Ok(()))?;
        }
        let hotplug = Arc::new(Hotplug::new(config.resources.boot_vcpus));
        Ok(Vm {
            life: Lifecycle::with_events(events.clone()),
            events,
            features,
            hotplug,
            config,
            options,
            devices: Arc::new(devices),
            running: Mutex::new(None),
            clues: Mutex::new(Clues::default()),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn config(&self) -> &InstanceConfig {
        &self.config
    }

    pub(crate) fn options(&self) -> &QemuOptions {
        &self.options
    }

    pub(crate) fn features(&self) -> &Features {
        &self.features
    }

    pub(crate) fn life(&self) -> &Lifecycle {
        &self.life
    }

    pub(crate) fn id(&self) -> &str {
        &self.config.id
    }

    /// A new receiver of the VM's events.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// Publishes `event` to subscribers.
    pub(crate) fn publish(&self, event: VmEvent) {
        let _ = self.events.send(event);
    }

    /// The devices the VM boots with.
    pub(crate) fn cold_devices(&self) -> ColdDevices {
        self.devices.cold()
    }

    /// The device table.
    pub(crate) fn devices(&self) -> &DeviceTable {
        &self.devices
    }

    /// Adds a cold device (only in `New`).
    pub(crate) fn add_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        self.devices
            .add_cold(spec, || self.life.require("add_device", &[VmState::New]))
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        lock(&self.running)
    }

    /// Runs `f` on the current boot's [`Running`], if there is one.
    pub(crate) fn with_running<T>(&self, f: impl FnOnce(&mut Running) -> T) -> Option<T> {
        self.running().as_mut().map(f)
    }

    /// Makes `running` the current boot's (a start's first step). However the VM ends
    /// — a start abandoned by its caller included — what the boot took goes: an end
    /// releases it in order, and the lifecycle's hook drops whatever is left (QEMU
    /// killed, the daemon killed, sockets removed, the lock released).
    pub(crate) fn begin_running(self: &Arc<Self>, running: Running) {
        *self.running() = Some(running);
        let weak = Arc::downgrade(self);
        self.life.on_end(move || {
            if let Some(vm) = weak.upgrade() {
                let left = vm.running().take();
                drop(left);
                drop(vm.devices.take_daemons());
            }
        });
    }

    /// QEMU's process, while a boot has one.
    pub(crate) fn process(&self) -> Option<Arc<Process>> {
        self.with_running(|r| r.process().cloned()).flatten()
    }

    /// The QMP client while the VM has one; `InvalidState` for `op` otherwise.
    pub(crate) fn qmp(&self, op: &'static str) -> vmkit_core::Result<QmpClient> {
        self.with_running(|r| r.qmp().cloned())
            .flatten()
            .ok_or_else(|| CoreError::InvalidState {
                op,
                state: self.life.state(),
            })
    }

    /// The link's CID (none over virtio-serial) and agent address, once the VM has one.
    pub(crate) fn link_info(&self) -> Option<(Option<u32>, GuestAddr)> {
        self.with_running(|r| r.link().map(|l| (l.cid, l.agent.clone())))
            .flatten()
    }

    /// Runs `f` on the guest link, if there is one.
    pub(crate) fn with_link<T>(&self, f: impl FnOnce(&mut Link) -> T) -> Option<T> {
        self.with_running(|r| r.link_mut().map(f)).flatten()
    }

    /// Lets the host's traffic reach the guest (`true`) or holds it (`false`; see
    /// [`vmkit_vsock::LinkGate`]). Held while QEMU's vCPUs, and so the vsock device's
    /// vrings, are stopped.
    pub(crate) fn open_link(&self, open: bool) {
        self.with_link(|link| link.set_open(open));
    }

    /// Marks the guest link broken: guest calls fail at once with `cause`.
    pub(crate) fn break_link(&self, cause: String) {
        self.with_running(|r| r.break_link(cause));
    }

    /// Makes the run state what QEMU reports (see [`Lifecycle::follow_vmm`]); a
    /// paused QEMU also holds the guest link.
    pub(crate) fn follow_qemu(&self, running: bool) {
        self.life.follow_vmm(running);
        if !running {
            self.open_link(false);
        }
    }

    /// Remembers what an event of QEMU says about the VM's end.
    pub(crate) fn note(&self, event: &VmEvent) {
        let mut clues = lock(&self.clues);
        match event {
            VmEvent::ShutdownRequested { guest, reason } => {
                clues.last_shutdown = Some((*guest, reason.clone()));
            }
            VmEvent::GuestPanicked => clues.panicked = true,
            _ => {}
        }
    }

    /// Whether the last SHUTDOWN event was the guest's own.
    pub(crate) fn guest_initiated(&self) -> bool {
        matches!(lock(&self.clues).last_shutdown, Some((true, _)))
    }

    /// Whether the guest reset itself (QEMU's SHUTDOWN said `guest-reset`).
    pub(crate) fn guest_reset(&self) -> bool {
        lock(&self.clues)
            .last_shutdown
            .as_ref()
            .is_some_and(|(guest, reason)| *guest && reason == "guest-reset")
    }

    /// The exit of a VM that stopped on its own (no `shutdown` under way).
    pub(crate) async fn unrequested_exit(&self, exit: ProcessExit) -> ExitInfo {
        let clues = lock(&self.clues).clone();
        let stderr = tail(&self.config.layout().vmm_log(), STDERR_LINES).await;
        let (reason, message) = match (clues.panicked, clues.last_shutdown) {
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

    /// Ends the VM's life: releases what its boot took, moves to `Shutdown` and
    /// publishes `info`. The first call wins; a later one gets the exit in force.
    pub(crate) async fn end(&self, info: ExitInfo) -> ExitInfo {
        let exit = self
            .life
            .end(info, async {
                let running = self.running().take();
                if let Some(running) = running {
                    running.release().await;
                }
                // After QEMU: the share daemons it used.
                for daemon in self.devices.take_daemons() {
                    daemon.stop().await;
                }
            })
            .await;
        tracing::info!(vm = %self.config.id, reason = ?exit.reason, stage = ?exit.stage, "VM gone");
        exit
    }

    /// The context a hot-plug operation named `op` runs on, once the VM is in one of
    /// `allowed`: the VM's QMP, agent, limits, events and hot-plug state.
    /// `InvalidState` in another state, or when the VM has no QMP.
    pub(crate) fn hotplug_context(
        self: &Arc<Self>,
        op: &'static str,
        allowed: &[VmState],
    ) -> vmkit_core::Result<Context> {
        self.life.require(op, allowed)?;
        let (qmp, accel) = self
            .with_running(|r| r.qmp().cloned().map(|q| (q, r.accel())))
            .flatten()
            .ok_or_else(|| CoreError::InvalidState {
                op,
                state: self.life.state(),
            })?;
        let limits = Limits {
            vm_id: self.config.id.clone(),
            resources: self.config.resources.clone(),
            machine: self.options.machine,
            hotplug_ports: self.features.hotplug_ports,
            shares_ram: self.features.shares_ram(),
            accel,
            deadline: self.config.timeouts.hotplug,
            unplug_ask_again: crate::hotplug::context::UNPLUG_ASK_AGAIN,
            state_dir: self.config.state_dir.clone(),
            log_dir: self.config.layout().log_dir().to_owned(),
            virtiofsd: self.options.virtiofsd_binary.clone(),
        };
        let agent: Arc<dyn AgentSource> = Arc::clone(self) as Arc<dyn AgentSource>;
        Ok(Context::new(
            Qmp::new(qmp),
            agent,
            limits,
            self.events.clone(),
            Arc::clone(&self.hotplug),
            Arc::clone(&self.devices),
        ))
    }

    /// Runs hot-plug `work` (named `op`) on the VM's queue, after the calls queued
    /// before it; a shutdown that begins first ends it with "shutting down".
    pub(crate) async fn run_hotplug<T: Send + 'static>(
        &self,
        op: String,
        work: impl std::future::Future<Output = vmkit_core::Result<T>> + Send + 'static,
    ) -> vmkit_core::Result<T> {
        self.hotplug
            .queue()
            .run(op, self.life.cancelled(), work)
            .await
    }

    /// The agent's address, once the VM has a vsock link.
    pub(crate) fn agent_addr(&self, op: &'static str) -> vmkit_core::Result<GuestAddr> {
        self.life
            .require(op, &[VmState::Running, VmState::Paused])?;
        match self.with_running(|r| r.agent_addr()).flatten() {
            Some(Ok(addr)) => Ok(addr),
            Some(Err(cause)) => Err(CoreError::backend(op, Error::GuestLinkBroken { cause })),
            None if self.config.transport == GuestTransport::None => Err(CoreError::unsupported(
                op,
                BACKEND_NAME,
                "the instance has no guest agent (transport: none)",
            )),
            None => Err(CoreError::InvalidState {
                op,
                state: self.life.state(),
            }),
        }
    }

    /// Whether the agent's end of the link is there. Over virtio-serial an agent that
    /// died leaves no trace on the link (QEMU's `VSERPORT_CHANGE` says it, but QEMU sends
    /// at most one a second per port): while the guest runs, the link is probed. Over
    /// vsock the guest's kernel resets the connection of a dead agent, which the cached
    /// client's health already shows. A paused guest is not probed: it cannot answer,
    /// and its calls are answered on resume.
    async fn agent_side_answers(&self) -> bool {
        let Some(mux) = self.with_link(|l| l.serial_mux()).flatten() else {
            return true;
        };
        self.life.state() != VmState::Running || mux.peer_answers(SERIAL_PROBE).await
    }

    fn cached_agent(&self) -> Option<guest::Agent> {
        self.with_running(|r| r.live_agent().cloned()).flatten()
    }

    /// The VM's cached agent client, re-dialled (and verified with a `Ping`) when its
    /// connection is seen closed.
    pub(crate) async fn agent_client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self.agent_addr("client")?;
        if let Some(agent) = self.cached_agent() {
            if self.agent_side_answers().await {
                return Ok(agent.client);
            }
            // Its connection looks open but nobody is at the other end.
            self.with_running(Running::forget_agent);
        }
        // One re-dial for all callers that found the connection dead.
        let _dialing = self.dialing.lock().await;
        if let Some(agent) = self.cached_agent() {
            return Ok(agent.client);
        }
        // A fresh connection counts once the agent answers on it: one accepted and then
        // dropped (an agent restarting) is dialled again, within the dial deadline.
        let deadline = tokio::time::Instant::now() + self.config.timeouts.dial;
        let agent = guest::wait_for_agent(&addr, deadline)
            .await
            .map_err(|e| guest::dial_error("client: re-dial the agent", e))?;
        let client = agent.client.clone();
        let kept = self.with_running(|r| {
            // The VM ended while we dialled when the link is gone.
            let alive = r.link().is_some();
            if alive {
                r.set_agent(agent);
            }
            alive
        });
        if kept != Some(true) {
            return Err(CoreError::InvalidState {
                op: "client",
                state: self.life.state(),
            });
        }
        tracing::debug!(vm = %self.config.id, %addr, "agent client re-dialled");
        Ok(client)
    }
}

#[async_trait::async_trait]
impl AgentSource for Vm {
    fn guest_runs(&self) -> bool {
        self.life.state() == VmState::Running
    }

    async fn agent(&self) -> vmkit_core::Result<AgentClient> {
        Ok(AgentClient::new(self.agent_client().await?))
    }
}
