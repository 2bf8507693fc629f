//! [`FakeBackend`] (registered as `"fake"`): the whole [`Instance`] contract in this
//! process, with no VM and no QEMU, for testing a runtime's own code end to end in
//! milliseconds.
//!
//! - **The real state table**: every call is allowed exactly where the contract allows it
//!   and otherwise refused with the same `InvalidState`; `shutdown` is idempotent and
//!   concurrent callers get the same [`ExitInfo`]; the same [`VmEvent`]s are published.
//! - **Devices and resources as the config allows**: cold disks, NICs and shares before
//!   start (validated and unique; a share is listed, nothing is mounted), hot ones on
//!   `hotplug_ports` ports (backend option, default 4), all listed by `devices()`; vCPUs from `boot_vcpus` to `max_vcpus`, memory in 128 MiB multiples up to
//!   `max_memory_mib` in `memory_slots` DIMMs.
//! - **A real guest agent**: `start` serves vmkit-agent's own service (its host test
//!   mode) on Unix sockets in the state dir, so [`GuestCommunicator::client`],
//!   `dial_client_with_retry` and `start_stream` give real, working connections. The
//!   "guest" is this host: `Exec` runs host programs.
//! - **Faults on demand**: per operation a delay, an error, a hang (ended by the
//!   operation's deadline) or a crash of the VM ([`FakeInstance::inject`]); a crash at
//!   any moment ([`FakeInstance::crash`]); an agent that never answers
//!   ([`FakeInstance::silence_agent`]).
//! - **Nothing left**: the state dir is made private and locked like a real backend's;
//!   when the VM ends its agent stops, its sockets and lock go.
//!
//! ```
//! use vmkit_core::{Backend, Instance, InstanceConfig, StartOptions, VmState};
//! use vmkit_testkit::fake_backend::{FakeBackend, Fault, Op};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! // The fake boots no kernel: its path is never looked at.
//! let config = InstanceConfig::new("sandbox-1", dir.path().join("state"), "/no/kernel");
//! let vm = FakeBackend::new().create_fake(config).unwrap();
//! vm.inject(Op::Start, Some(Fault::Error("QEMU said no".into())));
//! assert!(vm.start(StartOptions::new()).await.is_err()); // the retry path of your code
//! assert_eq!(vm.state(), VmState::Shutdown);
//! # });
//! ```

mod faults;
mod resources;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, DeviceConfigurator, DeviceInfo, DeviceSpec, Error,
    ExitInfo, ExitReason, GuestAddr, GuestClient, GuestCommunicator, GuestStream, Instance,
    InstanceConfig, Lifecycle, MemoryHotplugger, ResourceManager, ShutdownStage, StartOptions,
    StateDirLock, VmEvent, VmInfo, VmState,
};

use faults::Faults;
pub use faults::{Fault, Op};
pub use resources::MEMORY_BLOCK_MIB;
use resources::{FakeCpus, FakeMemory, Resources};

/// The name the fake backend registers under.
pub const FAKE_BACKEND: &str = "fake";

/// What the fake VM offers (narrowed per instance by its config, as a real backend's).
pub const CAPABILITIES: Capabilities = Capabilities::PAUSE
    .union(Capabilities::CPU_HOTPLUG)
    .union(Capabilities::MEMORY_HOTPLUG)
    .union(Capabilities::DISK_HOTPLUG)
    .union(Capabilities::NIC_HOTPLUG)
    .union(Capabilities::FS_SHARE)
    .union(Capabilities::GUEST_AGENT)
    .union(Capabilities::GUEST_STREAMS);

vmkit_core::register_backend!(|| Arc::new(FakeBackend::new()));

/// The fake backend's own errors, wrapped in [`Error::Backend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FakeError {
    /// A fault injected with [`Fault::Error`].
    #[error("injected fault: {0}")]
    Injected(String),
    /// The VM crashed ([`Fault::Crash`] or [`FakeInstance::crash`]).
    #[error("the fake VM crashed")]
    Crashed,
    /// The guest agent could not be served.
    #[error("serve the guest agent: {0}")]
    Agent(std::io::Error),
}

/// The fake VMs of this process, by id (the latest of an id), for [`crash`].
fn live() -> &'static Mutex<std::collections::HashMap<String, std::sync::Weak<Vm>>> {
    static LIVE: std::sync::OnceLock<
        Mutex<std::collections::HashMap<String, std::sync::Weak<Vm>>>,
    > = std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// Crashes the live fake VM with this id, as [`FakeInstance::crash`] does, for code that
/// holds it only as a `dyn Instance` (a conformance-suite `Target`'s `crash`).
/// `false` when no live fake VM has that id.
pub async fn crash(id: &str) -> bool {
    let vm = {
        let mut all = lock(live());
        all.retain(|_, vm| vm.strong_count() > 0);
        all.get(id).and_then(std::sync::Weak::upgrade)
    };
    match vm {
        Some(vm) => {
            vm.end(crashed()).await;
            true
        }
        None => false,
    }
}

/// Crashes every live fake VM of this process (for a test that drives them from
/// another process: a signal handler in the process serving them calls this). Returns
/// how many it crashed.
pub async fn crash_all() -> usize {
    let vms: Vec<Arc<Vm>> = {
        let mut all = lock(live());
        all.retain(|_, vm| vm.strong_count() > 0);
        all.values().filter_map(std::sync::Weak::upgrade).collect()
    };
    let mut crashed_now = 0;
    for vm in vms {
        if matches!(vm.life.state(), VmState::Running | VmState::Paused) {
            vm.end(crashed()).await;
            crashed_now += 1;
        }
    }
    crashed_now
}

/// The in-process backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct FakeBackend;

impl FakeBackend {
    /// The backend.
    pub fn new() -> FakeBackend {
        FakeBackend
    }

    /// Creates a fake VM and returns it as its own type, with the fault controls.
    ///
    /// Backend options: `hotplug_ports` (a whole number, default 4) and `faults`, the
    /// faults it starts with as `op=fault` pairs separated by commas (`start=wedge,
    /// vm_info=block`; see [`Fault::parse`]) — for a fake served behind a boundary
    /// (a plugin library, a backend process) where [`FakeInstance::inject`] cannot be
    /// called.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] from the config's validation, or for an unknown or bad
    /// backend option.
    pub fn create_fake(&self, config: InstanceConfig) -> vmkit_core::Result<FakeInstance> {
        config.validate()?;
        let mut ports = 4u32;
        let mut faults = Faults::default();
        for (key, value) in &config.backend_options {
            match key.as_str() {
                "hotplug_ports" => {
                    ports = value.parse().map_err(|_| {
                        Error::config(
                            "backend_options.hotplug_ports",
                            format!("{value:?}: expected a whole number"),
                        )
                    })?;
                }
                "faults" => faults = Faults::parse(value)?,
                other => {
                    return Err(Error::config(
                        format!("backend_options.{other}"),
                        "unknown key; the fake backend knows hotplug_ports and faults",
                    ));
                }
            }
        }
        let resources = Resources::of(&config);
        let vm = Arc::new(Vm {
            life: Lifecycle::new(),
            faults: Mutex::new(faults),
            devices: Mutex::new(Devices::of(&config, ports)),
            resources: Mutex::new(resources),
            held: Arc::default(),
            agent: Arc::default(),
            config,
        });
        // However the VM ends (a dropped start or instance included), what it holds
        // goes: the agent (its sockets removed), its client, the state dir's lock.
        let (held, agent) = (Arc::clone(&vm.held), Arc::clone(&vm.agent));
        vm.life.on_end(move || {
            *lock(&held) = Held::default();
            agent.forget();
        });
        lock(live()).insert(vm.config.id.clone(), Arc::downgrade(&vm));
        Ok(FakeInstance {
            cpus: FakeCpus::new(Arc::clone(&vm)),
            memory: FakeMemory::new(Arc::clone(&vm)),
            vm,
        })
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &str {
        FAKE_BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        Ok(Box::new(self.create_fake(config)?))
    }
}

/// A fake VM. Implements [`Instance`]; the fault controls are its own methods.
pub struct FakeInstance {
    vm: Arc<Vm>,
    cpus: FakeCpus,
    memory: FakeMemory,
}

impl std::fmt::Debug for FakeInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeInstance")
            .field("id", &self.vm.config.id)
            .field("state", &self.vm.life.state())
            .finish_non_exhaustive()
    }
}

/// Locks `mutex`, also when a panicking holder poisoned it: every critical section here
/// is a few field reads and writes, which a panic cannot leave half done.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared state of one fake VM.
pub(crate) struct Vm {
    pub(crate) config: InstanceConfig,
    /// The state, events, stop and exit (vmkit-core's helper).
    pub(crate) life: Lifecycle,
    faults: Mutex<Faults>,
    devices: Mutex<Devices>,
    pub(crate) resources: Mutex<Resources>,
    held: Arc<Mutex<Held>>,
    /// The cached agent client.
    agent: Arc<vmkit_vsock::AgentCache>,
}

/// Cold and hot devices, in the order added.
#[derive(Debug, Default)]
struct Devices {
    all: Vec<DeviceInfo>,
    /// Hot-plug ports (`hotplug_ports`).
    ports: u32,
}

impl Devices {
    /// The devices of `config`, with `ports` hot-plug ports.
    fn of(config: &InstanceConfig, ports: u32) -> Self {
        let disks = config.disks.iter().cloned().map(DeviceSpec::Disk);
        let nics = config.nics.iter().cloned().map(DeviceSpec::Nic);
        Devices {
            all: disks
                .chain(nics)
                .map(|spec| DeviceInfo::attached(spec, false))
                .collect(),
            ports,
        }
    }

    /// How many ports hot-plugged devices take.
    fn hot(&self) -> usize {
        self.all.iter().filter(|d| d.hot).count()
    }
}

/// What the VM holds while it lives.
#[derive(Default)]
struct Held {
    lock: Option<StateDirLock>,
    agent: Option<vmkit_agent::Serving>,
}

impl Vm {
    /// The agent's TTRPC socket.
    fn ttrpc_socket(&self) -> PathBuf {
        vmkit_agent::Listen::ttrpc_socket(&self.config.state_dir)
    }

    /// The agent's stream socket.
    fn stream_socket(&self) -> PathBuf {
        vmkit_agent::Listen::stream_socket(&self.config.state_dir)
    }

    /// Runs the fault injected for `op`, if any: `Ok` when the operation should go on.
    pub(crate) async fn fault(&self, op: Op, deadline: Duration) -> vmkit_core::Result<()> {
        let fault = lock(&self.faults).get(op);
        match fault {
            None => Ok(()),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Error(message)) => {
                Err(Error::backend(op.name(), FakeError::Injected(message)))
            }
            Some(Fault::Hang) => {
                tokio::time::sleep(deadline).await;
                Err(Error::Timeout {
                    op: format!("{}: the fake VM did not answer", op.name()),
                    after: deadline,
                })
            }
            Some(Fault::Crash) => {
                self.end(crashed()).await;
                Err(Error::backend(op.name(), FakeError::Crashed))
            }
            Some(Fault::Wedge) => std::future::pending().await,
            Some(Fault::Block) => block_forever(),
            #[allow(clippy::panic)] // the fault asked for
            Some(Fault::Panic) => panic!("the fake was told to panic in {}", op.name()),
        }
    }

    /// The state check of a disk or NIC hot-plug call, then `Unsupported` when the VM
    /// has no hot-plug ports.
    fn hotplug_allowed(&self, op: &'static str) -> vmkit_core::Result<()> {
        if lock(&self.devices).ports > 0 {
            return self.life.require(op, &[VmState::Running]);
        }
        Err(self.life.unsupported(
            op,
            FAKE_BACKEND,
            &[VmState::Running],
            "no hot-plug ports (backend option hotplug_ports is 0)",
        ))
    }

    /// The fault of a synchronous call (`state`, `vm_info`): it can only block.
    fn sync_fault(&self, op: Op) {
        match lock(&self.faults).get(op) {
            Some(Fault::Delay(d)) => std::thread::sleep(d),
            Some(Fault::Wedge | Fault::Block | Fault::Hang) => block_forever(),
            #[allow(clippy::panic)] // the fault asked for
            Some(Fault::Panic) => panic!("the fake was told to panic in {}", op.name()),
            _ => {}
        }
    }

    /// Ends the VM's life once: the lifecycle's hook stops the agent, removes its
    /// sockets and releases the state dir; then `Shutdown` and `info` are published. A
    /// later call gets the first call's exit.
    async fn end(&self, info: ExitInfo) -> ExitInfo {
        self.life.end(info, async {}).await
    }

    /// Starts serving the agent in the state dir.
    fn serve_agent(&self) -> vmkit_core::Result<()> {
        let serving = vmkit_agent::start(
            &vmkit_agent::Listen::Unix(self.config.state_dir.clone()),
            vmkit_agent::Limits::default(),
        )
        .map_err(|e| Error::backend("start", FakeError::Agent(e)))?;
        lock(&self.held).agent = Some(serving);
        Ok(())
    }

    /// Where the agent listens, if the VM may be talked to in one of `allowed`.
    fn guest(&self, op: &'static str, allowed: &[VmState]) -> vmkit_core::Result<GuestAddr> {
        self.life.require(op, allowed)?;
        Ok(GuestAddr::Unix {
            dir: self.config.state_dir.clone(),
            port: vmkit_proto::AGENT_PORT,
        })
    }
}

/// Blocks the calling thread for good: [`Fault::Block`], a plugin bug on purpose.
fn block_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// How a crash ends the fake VM.
fn crashed() -> ExitInfo {
    ExitInfo::new(ExitReason::Crashed).with_message("the fake VM crashed as told")
}

impl FakeInstance {
    /// The config it was created with.
    pub fn config(&self) -> &InstanceConfig {
        &self.vm.config
    }

    /// Sets (`Some`) or clears (`None`) the fault of `op`; it applies to every later call.
    pub fn inject(&self, op: Op, fault: Option<Fault>) {
        lock(&self.vm.faults).set(op, fault);
    }

    /// The VM dies now, as a crashed VMM's would: `wait()` resolves with
    /// [`ExitReason::Crashed`], the agent's connections end, nothing is left.
    pub async fn crash(&self) -> ExitInfo {
        self.vm.end(crashed()).await
    }

    /// Makes the guest agent stop answering (`true`; a running VM's agent goes away, a
    /// starting VM's never comes, so `start` times out) or answer again (`false`).
    pub fn silence_agent(&self, silent: bool) -> vmkit_core::Result<()> {
        lock(&self.vm.faults).agent_silent = silent;
        let running = matches!(self.vm.life.state(), VmState::Running | VmState::Paused);
        if silent {
            lock(&self.vm.held).agent = None;
        } else if running && lock(&self.vm.held).agent.is_none() {
            self.vm.serve_agent()?;
        }
        Ok(())
    }

    /// The agent's TTRPC socket (in the state dir), for tests that dial it themselves.
    pub fn agent_socket(&self) -> PathBuf {
        self.vm.ttrpc_socket()
    }
}

#[async_trait]
impl Instance for FakeInstance {
    async fn start(&self, opts: StartOptions) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        // Dropped before it finishes, the attempt ends the VM (nothing left).
        let attempt = vm.life.begin_start("start")?;
        let timeout = opts.timeout.unwrap_or(vm.config.timeouts.start);
        let work = async {
            vm.fault(Op::Start, timeout).await?;
            let layout = vm.config.layout();
            layout.prepare("start")?;
            let held = layout.lock("start", &format!("vm {:?}", vm.config.id))?;
            lock(&vm.held).lock = Some(held);
            if lock(&vm.faults).agent_silent {
                tokio::time::sleep(timeout).await;
                return Err(Error::Timeout {
                    op: "start: waiting for the guest agent to answer Ping".into(),
                    after: timeout,
                });
            }
            vm.serve_agent()?;
            vm.life.publish(VmEvent::StartProgress {
                step: "guest agent answered".into(),
                elapsed_ms: 0,
            });
            Ok(())
        };
        // A start ends by its deadline (a moment later, so that a fault that ends at the
        // deadline itself reports its own cause) — unless it is wedged on purpose: a
        // broken backend's start never answers.
        let wedged = matches!(
            lock(&vm.faults).get(Op::Start),
            Some(Fault::Wedge | Fault::Block)
        );
        let bound = timeout + Duration::from_millis(100);
        let result = if wedged {
            work.await
        } else {
            match tokio::time::timeout(bound, work).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    op: "start: the fake VM did not come up".into(),
                    after: timeout,
                }),
            }
        };
        if let Err(e) = result {
            vm.end(ExitInfo::new(ExitReason::StartFailed).with_message(e.to_string()))
                .await;
            attempt.failed();
            return Err(e);
        }
        // A shutdown or crash while starting has ended the VM: the start fails with it.
        attempt.running()
    }

    async fn shutdown(&self) -> vmkit_core::Result<ExitInfo> {
        let vm = &self.vm;
        let _stop = match vm.life.begin_shutdown().await {
            Ok(stop) => stop,
            Err(known) => return Ok(known),
        };
        // A shutdown always ends the VM: a fault only delays it (a real backend goes on
        // to its next, forced stage when one fails), or crashes it first.
        let _ = vm.fault(Op::Shutdown, vm.config.timeouts.command).await;
        // A cooperative guest powers off on the ACPI button; a paused one cannot, so the
        // VMM is quit.
        let (reason, stage) = match vm.life.state() {
            VmState::Paused => (ExitReason::HostShutdown, ShutdownStage::Quit),
            _ => (ExitReason::GuestShutdown, ShutdownStage::AcpiPowerdown),
        };
        let info = ExitInfo::new(reason).with_stage(stage).with_exit_code(0);
        Ok(vm.end(info).await)
    }

    async fn pause(&self) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        vm.life
            .pause(vm.fault(Op::Pause, vm.config.timeouts.command))
            .await
    }

    async fn resume(&self) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        vm.life
            .resume(vm.fault(Op::Resume, vm.config.timeouts.command))
            .await
    }

    async fn wait(&self) -> ExitInfo {
        self.vm.life.wait_exit().await
    }

    fn state(&self) -> VmState {
        self.vm.sync_fault(Op::State);
        self.vm.life.state()
    }

    fn vm_info(&self) -> VmInfo {
        let vm = &self.vm;
        vm.sync_fault(Op::VmInfo);
        let state = vm.life.state();
        let mut capabilities = CAPABILITIES;
        if self.cpu_hotplugger().is_none() {
            capabilities.remove(Capabilities::CPU_HOTPLUG);
        }
        if self.memory_hotplugger().is_none() {
            capabilities.remove(Capabilities::MEMORY_HOTPLUG);
        }
        if lock(&vm.devices).ports == 0 {
            capabilities.remove(Capabilities::DISK_HOTPLUG | Capabilities::NIC_HOTPLUG);
        }
        let (sockets, guest) = if lock(&vm.held).agent.is_some() {
            let sockets = vec![
                ("agent".to_owned(), vm.ttrpc_socket()),
                ("streams".to_owned(), vm.stream_socket()),
            ];
            let guest = vmkit_core::GuestAddr::Unix {
                dir: vm.config.state_dir.clone(),
                port: vmkit_proto::AGENT_PORT,
            };
            (sockets, Some(guest))
        } else {
            (Vec::new(), None)
        };
        VmInfo {
            id: vm.config.id.clone(),
            backend: FAKE_BACKEND.to_owned(),
            state,
            pid: None,
            cid: None,
            sockets,
            guest,
            capabilities,
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.vm.life.events()
    }
}

#[async_trait]
impl DeviceConfigurator for FakeInstance {
    fn add_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        let mut devices = lock(&self.vm.devices);
        self.vm.life.require("add_device", &[VmState::New])?;
        spec.validate(spec.kind())?;
        let id = spec.id();
        if devices.all.iter().any(|d| d.id() == id) {
            return Err(Error::config(
                format!("{}.id", spec.kind()),
                format!("add_device: duplicate device id {id:?}"),
            ));
        }
        devices.all.push(DeviceInfo::attached(spec, false));
        Ok(())
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        let call = format!("{} {}", spec.hotplug_op(), spec.id());
        vm.hotplug_allowed(spec.hotplug_op())?;
        spec.validate(spec.kind())
            .map_err(|e| Error::bad_argument(&call, spec.kind(), e.to_string()))?;
        {
            let devices = lock(&vm.devices);
            let id = spec.id();
            if devices.all.iter().any(|d| d.id() == id) {
                return Err(Error::bad_argument(
                    &call,
                    "id",
                    format!("duplicate device id {id:?}"),
                ));
            }
            if devices.hot() >= devices.ports as usize {
                return Err(Error::exhausted(
                    &call,
                    "hot-plug port",
                    format!("all {} hot-plug ports are in use", devices.ports),
                ));
            }
        }
        vm.fault(Op::of(&spec), vm.config.timeouts.command).await?;
        vm.life.require(spec.hotplug_op(), &[VmState::Running])?;
        lock(&vm.devices).all.push(DeviceInfo::attached(spec, true));
        Ok(())
    }

    async fn unplug(&self, id: &str) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        vm.hotplug_allowed("unplug")?;
        if !lock(&vm.devices).all.iter().any(|d| d.hot && d.id() == id) {
            return Err(Error::not_found(
                format!("unplug {id}"),
                "no hot-plugged device with that id (cold-plugged devices stay for the VM's life)",
            ));
        }
        vm.fault(Op::Unplug, vm.config.timeouts.command).await?;
        lock(&vm.devices).all.retain(|d| !(d.hot && d.id() == id));
        vm.life.publish(VmEvent::DeviceDeleted {
            id: Some(id.to_owned()),
            path: format!("/machine/peripheral/{id}"),
        });
        Ok(())
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        lock(&self.vm.devices).all.clone()
    }
}

/// The states in which the agent may be called.
const LIVE: &[VmState] = &[VmState::Running, VmState::Paused];

#[async_trait]
impl GuestCommunicator for FakeInstance {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self.vm.guest("client", LIVE)?;
        let dial = self.vm.config.timeouts.dial;
        let client = self.vm.agent.client(&addr, dial, false).await;
        client.map_err(|e| e.into_core("client"))
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        // One attempt, as the contract says: no retry.
        let addr = self.vm.guest("dial_client", LIVE)?;
        let client = vmkit_vsock::connect_ttrpc(&addr, self.vm.config.timeouts.dial).await;
        client.map_err(|e| e.into_core("dial_client"))
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        let addr = self.vm.guest("dial_client_with_retry", LIVE)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let agent = vmkit_vsock::connect_agent(&addr, deadline).await;
        agent
            .map(|(client, _)| client)
            .map_err(|e| e.into_core("dial_client_with_retry"))
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        let addr = self.vm.guest("start_stream", &[VmState::Running])?;
        let conn = vmkit_vsock::dial(&addr.with_port(port), self.vm.config.timeouts.dial).await;
        Ok(Box::new(conn.map_err(|e| e.into_core("start_stream"))?))
    }
}

impl ResourceManager for FakeInstance {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        lock(&self.vm.resources)
            .cpu_hotplug()
            .then_some(&self.cpus as &dyn CpuHotplugger)
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        lock(&self.vm.resources)
            .memory_hotplug()
            .then_some(&self.memory as &dyn MemoryHotplugger)
    }
}
