//! The host side: [`PluginBackend`] and [`PluginInstance`] implement vmkit-core's
//! traits over a [`Channel`] to a plugin (a loaded library or a backend process), so a
//! backend that arrives at run time looks to the [`Registry`](vmkit_core::Registry) and
//! its callers exactly like one linked in.
//!
//! The guest channel stays here: the plugin reports where the agent listens
//! (`VmInfo::guest`) and the adapter dials it with vmkit-vsock, so `client()`,
//! `dial_client_with_retry()` and `start_stream()` cost what they cost with a static
//! backend. A plugin that goes away fails every pending call at once, and its instances
//! end with `ExitReason::Crashed` and a message naming the cause.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, CpuInfo, CpuTopology, DeviceConfigurator, DeviceInfo,
    DeviceSpec, Error as CoreError, ExitInfo, GuestAddr, GuestClient, GuestCommunicator,
    GuestStream, GuestTransport, Instance, InstanceConfig, MemoryHotplugger, MemoryInfo,
    ResourceManager, StartOptions, Timeouts, VcpuResize, VmEvent, VmInfo, VmState,
};

use crate::feed::InstanceFeed;
use crate::wire::{InstanceId, Reply, Request, resize_from_wire};

/// Where a plugin came from (vmkit-core's, as the registry lists it).
pub use vmkit_core::BackendOrigin as Origin;

/// A transport to one plugin.
///
/// Every call has a deadline (only `Wait`, which lasts as long as the VM, may go
/// without); past it the call fails with `Error::Timeout` naming the operation and the
/// plugin, and the plugin is told to cancel it. Dropping a call's future cancels it in
/// the plugin too: the backend's own future is dropped, so its work stops.
#[async_trait]
pub trait Channel: Send + Sync + 'static {
    /// Sends `req` and waits for its reply; an `Err` when the plugin is gone or did not
    /// answer within `deadline`.
    async fn call(&self, req: Request, deadline: Option<Duration>) -> vmkit_core::Result<Reply>;

    /// The same for the contract's synchronous methods (`create`, `vm_info`, cold
    /// devices): blocks the calling thread for one round trip, at most `deadline`.
    fn call_blocking(&self, req: Request, deadline: Duration) -> vmkit_core::Result<Reply>;

    /// Sends `req` without waiting for its reply (`Destroy` from a `Drop`).
    fn notify(&self, req: Request);

    /// From now on, instance `id`'s events go to `feed`; when the plugin goes away, the
    /// channel calls [`InstanceFeed::lost`] with the cause.
    fn subscribe(&self, id: InstanceId, feed: Arc<InstanceFeed>);

    /// Why the plugin is gone, once it is.
    fn gone(&self) -> Option<String>;

    /// Where it came from.
    fn origin(&self) -> &Origin;
}

/// The reply's error, or an error saying the reply was not the one expected.
/// Refuses a device that cannot cross to a plugin: one holding a live fd of this
/// process (a NIC on a TAP fd), which is never serialised.
fn crossable(op: &'static str, spec: &DeviceSpec) -> vmkit_core::Result<()> {
    if let Err(e) = serde_json::to_value(spec) {
        return Err(CoreError::unsupported(
            op,
            "plugin",
            format!(
                "{} {}: cannot cross to a plugin backend ({e}); a fd is this process's \
                 (for a NIC, name the TAP instead: NicBackend::Tap)",
                spec.kind(),
                spec.id()
            ),
        ));
    }
    Ok(())
}

fn unexpected(op: &str, reply: Reply) -> CoreError {
    match reply {
        Reply::Failed { error } => error.into_core(),
        other => CoreError::backend(
            op.to_owned(),
            crate::wire::RemoteError(format!("the plugin answered {other:?}")),
        ),
    }
}

/// A backend behind a [`Channel`].
pub struct PluginBackend {
    name: String,
    capabilities: Capabilities,
    channel: Arc<dyn Channel>,
}

impl std::fmt::Debug for PluginBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBackend")
            .field("name", &self.name)
            .field("origin", self.channel.origin())
            .finish()
    }
}

/// How long a description or a create may take.
const SETUP_DEADLINE: Duration = Duration::from_secs(10);
/// How long past an operation's own deadline the host waits for the plugin's answer
/// (which names what timed out better than the host can) before giving up on it.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

impl PluginBackend {
    /// Asks the plugin behind `channel` what it is.
    ///
    /// # Errors
    /// The plugin does not answer, or answers with another schema version.
    pub fn describe(channel: Arc<dyn Channel>) -> vmkit_core::Result<PluginBackend> {
        match channel.call_blocking(Request::Describe, SETUP_DEADLINE)? {
            Reply::Described {
                name,
                capabilities,
                schema,
            } => {
                if schema != crate::wire::SCHEMA_VERSION {
                    return Err(CoreError::backend(
                        "describe",
                        crate::wire::RemoteError(format!(
                            "{}: schema version {schema}, this host speaks {}",
                            channel.origin(),
                            crate::wire::SCHEMA_VERSION
                        )),
                    ));
                }
                Ok(PluginBackend {
                    name,
                    capabilities,
                    channel,
                })
            }
            other => Err(unexpected("describe", other)),
        }
    }

    /// Where the backend came from.
    pub fn origin(&self) -> &Origin {
        self.channel.origin()
    }

    /// Adds this backend to `registry`, with where it came from.
    ///
    /// # Errors
    /// `Error::DuplicateBackend` when the name is taken.
    pub fn register_into(self, registry: &mut vmkit_core::Registry) -> vmkit_core::Result<()> {
        let origin = self.channel.origin().clone();
        registry.register_from(std::sync::Arc::new(self), origin)
    }

    /// [`Backend::create`], typed.
    ///
    /// # Errors
    /// As `Backend::create`; or the plugin is gone.
    pub fn create_plugin(&self, config: InstanceConfig) -> vmkit_core::Result<PluginInstance> {
        for nic in &config.nics {
            crossable("create", &DeviceSpec::Nic(nic.clone()))?;
        }
        let deadline = config.timeouts.command.max(SETUP_DEADLINE);
        let id = match self.channel.call_blocking(
            Request::Create {
                config: Box::new(config.clone()),
            },
            deadline,
        )? {
            Reply::Created { instance } => instance,
            other => return Err(unexpected("create", other)),
        };
        let (cpu, memory) = match self
            .channel
            .call_blocking(Request::Hotpluggers { instance: id }, deadline)?
        {
            Reply::Hotpluggers { cpu, memory } => (cpu, memory),
            other => return Err(unexpected("create", other)),
        };
        let feed = Arc::new(InstanceFeed::new(&self.name));
        self.channel.subscribe(id, Arc::clone(&feed));
        let remote = Remote {
            id,
            channel: Arc::clone(&self.channel),
            timeouts: config.timeouts.clone(),
            max_vcpus: config.resources.max_vcpus,
        };
        Ok(PluginInstance {
            cpus: cpu.then(|| RemoteCpus(remote.clone())),
            memory: memory.then(|| RemoteMemory(remote.clone())),
            remote,
            backend: self.name.clone(),
            config,
            feed,
            agent: vmkit_vsock::AgentCache::new(),
        })
    }
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        Ok(Box::new(self.create_plugin(config)?))
    }
}

/// One instance in a plugin: its id, the channel, and the deadlines of its calls.
#[derive(Clone)]
struct Remote {
    id: InstanceId,
    channel: Arc<dyn Channel>,
    timeouts: Timeouts,
    max_vcpus: u32,
}

impl Remote {
    /// How long the host waits for `req`'s answer: the operation's own deadline (from
    /// the instance's timeouts, as the backend applies them) and a margin for the
    /// backend's own timeout error to arrive first. `None` for `Wait` only.
    fn deadline(&self, req: &Request) -> Option<Duration> {
        let t = &self.timeouts;
        let hotplug = t.hotplug.saturating_add(t.command);
        let own = match req {
            Request::Wait { .. } => return None,
            Request::Start { timeout_ms, .. } => timeout_ms.map_or(t.start, Duration::from_millis),
            Request::Shutdown { .. } => t.shutdown_bound(),
            Request::HotplugDevice { .. }
            | Request::Unplug { .. }
            | Request::HotplugCpu { .. }
            | Request::HotplugCpuAt { .. }
            | Request::UnplugCpu { .. }
            | Request::HotplugMemory { .. }
            | Request::UnplugMemory { .. } => hotplug,
            // One vCPU at a time, each a hot-plug.
            Request::SetVcpus { .. } => hotplug.saturating_mul(self.max_vcpus.max(1)),
            _ => t.command,
        };
        Some(own.saturating_add(ANSWER_MARGIN))
    }

    async fn call(&self, req: Request) -> vmkit_core::Result<Reply> {
        let deadline = self.deadline(&req);
        self.channel.call(req, deadline).await
    }

    fn call_now(&self, req: Request) -> vmkit_core::Result<Reply> {
        let deadline = self.deadline(&req).unwrap_or(SETUP_DEADLINE);
        self.channel.call_blocking(req, deadline)
    }

    async fn done(&self, op: &str, req: Request) -> vmkit_core::Result<()> {
        match self.call(req).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(op, other)),
        }
    }
}

/// An instance in a plugin, driven through its channel.
///
/// Its state is what the plugin's events said (they arrive before the reply of the
/// operation that caused them), so [`Instance::state`] costs no round trip and is
/// never a value the plugin did not give; when the plugin goes away the instance ends
/// at once as crashed, with `Exited` published and no call needed.
pub struct PluginInstance {
    remote: Remote,
    backend: String,
    config: InstanceConfig,
    feed: Arc<InstanceFeed>,
    cpus: Option<RemoteCpus>,
    memory: Option<RemoteMemory>,
    /// The cached agent client.
    agent: vmkit_vsock::AgentCache,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance")
            .field("backend", &self.backend)
            .field("id", &self.config.id)
            .finish()
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        self.remote.channel.notify(Request::Destroy {
            instance: self.remote.id,
        });
    }
}

impl PluginInstance {
    /// The config it was created with.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// An exit from `reply`, or the plugin's loss.
    fn exit_of(&self, op: &str, reply: vmkit_core::Result<Reply>) -> vmkit_core::Result<ExitInfo> {
        match reply {
            Ok(Reply::Exit { exit }) => {
                self.feed.ended(&exit);
                Ok(exit)
            }
            Ok(other) => Err(unexpected(op, other)),
            Err(e) => match self.remote.channel.gone() {
                Some(cause) => Ok(self.feed.lost(&cause)),
                None => Err(e),
            },
        }
    }

    /// Where the agent listens, or why `op` cannot reach it now.
    async fn guest(&self, op: &'static str, states: &[VmState]) -> vmkit_core::Result<GuestAddr> {
        let info = match self
            .remote
            .call(Request::VmInfo {
                instance: self.remote.id,
            })
            .await?
        {
            Reply::VmInfo { info } => *info,
            other => return Err(unexpected(op, other)),
        };
        let state = self.state();
        if !states.contains(&state) {
            return Err(CoreError::InvalidState { op, state });
        }
        if !info.capabilities.contains(Capabilities::GUEST_AGENT) {
            return Err(CoreError::unsupported(
                op,
                &self.backend,
                "the instance has no guest agent",
            ));
        }
        info.guest.ok_or_else(|| {
            CoreError::backend(
                op,
                crate::wire::RemoteError("the plugin reports no guest address".into()),
            )
        })
    }
}

#[async_trait]
impl Instance for PluginInstance {
    async fn start(&self, opts: StartOptions) -> vmkit_core::Result<()> {
        let timeout_ms = opts
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        self.remote
            .done(
                "start",
                Request::Start {
                    instance: self.remote.id,
                    timeout_ms,
                },
            )
            .await
    }

    async fn shutdown(&self) -> vmkit_core::Result<ExitInfo> {
        if let Some(exit) = self.feed.exit() {
            return Ok(exit);
        }
        let reply = self
            .remote
            .call(Request::Shutdown {
                instance: self.remote.id,
            })
            .await;
        self.exit_of("shutdown", reply)
    }

    async fn pause(&self) -> vmkit_core::Result<()> {
        self.remote
            .done(
                "pause",
                Request::Pause {
                    instance: self.remote.id,
                },
            )
            .await
    }

    async fn resume(&self) -> vmkit_core::Result<()> {
        self.remote
            .done(
                "resume",
                Request::Resume {
                    instance: self.remote.id,
                },
            )
            .await
    }

    async fn wait(&self) -> ExitInfo {
        if let Some(exit) = self.feed.exit() {
            return exit;
        }
        // The backend's `Exited` event, or its answer to `Wait` (for a backend whose
        // events do not say it), whichever comes first; the other is dropped (a
        // dropped call is cancelled in the plugin).
        let asked = self.remote.call(Request::Wait {
            instance: self.remote.id,
        });
        tokio::select! {
            exit = self.feed.wait_exit() => exit,
            reply = asked => match self.exit_of("wait", reply) {
                Ok(exit) => exit,
                Err(e) => self.feed.lost(&e.to_string()),
            },
        }
    }

    fn state(&self) -> VmState {
        if self.feed.exit().is_none()
            && let Some(cause) = self.remote.channel.gone()
        {
            self.feed.lost(&cause);
        }
        self.feed.state()
    }

    fn vm_info(&self) -> VmInfo {
        if self.feed.exit().is_none()
            && let Ok(Reply::VmInfo { info }) = self.remote.call_now(Request::VmInfo {
                instance: self.remote.id,
            })
        {
            // The state is the events' (a snapshot may trail or lead them).
            return VmInfo {
                state: self.state(),
                ..*info
            };
        }
        VmInfo {
            id: self.config.id.clone(),
            backend: self.backend.clone(),
            state: self.state(),
            pid: None,
            cid: None,
            sockets: Vec::new(),
            guest: None,
            capabilities: Capabilities::empty(),
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.feed.subscribe()
    }
}

#[async_trait]
impl DeviceConfigurator for PluginInstance {
    fn add_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        crossable("add_device", &spec)?;
        match self.remote.call_now(Request::AddDevice {
            instance: self.remote.id,
            spec,
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected("add_device", other)),
        }
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        // Errors name the kind's hot-plug (`hotplug_disk …`), as a linked-in backend's.
        let op = spec.hotplug_op();
        crossable(op, &spec)?;
        self.remote
            .done(
                op,
                Request::HotplugDevice {
                    instance: self.remote.id,
                    spec,
                },
            )
            .await
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        match self.remote.call_now(Request::Devices {
            instance: self.remote.id,
        }) {
            Ok(Reply::Devices { devices }) => devices,
            // An instance whose plugin is gone (or answers nonsense) lists nothing;
            // every other call on it says why.
            Ok(other) => {
                tracing::warn!(reply = ?other, "devices: unexpected answer from the plugin");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "devices: the plugin did not answer");
                Vec::new()
            }
        }
    }

    async fn unplug(&self, id: &str) -> vmkit_core::Result<()> {
        self.remote
            .done(
                "unplug",
                Request::Unplug {
                    instance: self.remote.id,
                    id: id.to_owned(),
                },
            )
            .await
    }
}

#[async_trait]
impl GuestCommunicator for PluginInstance {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self
            .guest("client", &[VmState::Running, VmState::Paused])
            .await?;
        // Over virtio-serial the plugin's relay keeps the host's connection open while
        // the guest's agent restarts: a cached client must answer before it is handed
        // out (a paused guest cannot, and its client is kept).
        let verify = matches!(self.config.transport, GuestTransport::VirtioSerial)
            && self.state() == VmState::Running;
        self.agent
            .client(&addr, self.config.timeouts.dial, verify)
            .await
            .map_err(|e| e.into_core("client"))
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self
            .guest("dial_client", &[VmState::Running, VmState::Paused])
            .await?;
        vmkit_vsock::connect_ttrpc(&addr, self.config.timeouts.dial)
            .await
            .map_err(|e| e.into_core("dial_client"))
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        let addr = self
            .guest(
                "dial_client_with_retry",
                &[VmState::Running, VmState::Paused],
            )
            .await?;
        vmkit_vsock::connect_ttrpc_with_retry(&addr, timeout)
            .await
            .map_err(|e| e.into_core("dial_client_with_retry"))
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        let addr = self.guest("start_stream", &[VmState::Running]).await?;
        let conn = vmkit_vsock::dial(&addr.with_port(port), self.config.timeouts.dial)
            .await
            .map_err(|e| e.into_core("start_stream"))?;
        Ok(Box::new(conn))
    }
}

impl ResourceManager for PluginInstance {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        self.cpus.as_ref().map(|c| c as &dyn CpuHotplugger)
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        self.memory.as_ref().map(|m| m as &dyn MemoryHotplugger)
    }
}

/// vCPU hot-plug in a plugin.
struct RemoteCpus(Remote);

#[async_trait]
impl CpuHotplugger for RemoteCpus {
    async fn query_cpus(&self) -> vmkit_core::Result<Vec<CpuInfo>> {
        match self
            .0
            .call(Request::QueryCpus {
                instance: self.0.id,
            })
            .await?
        {
            Reply::Cpus { cpus } => Ok(cpus),
            other => Err(unexpected("query_cpus", other)),
        }
    }

    async fn hotplug_cpu(&self) -> vmkit_core::Result<CpuInfo> {
        match self
            .0
            .call(Request::HotplugCpu {
                instance: self.0.id,
            })
            .await?
        {
            Reply::Cpu { cpu } => Ok(cpu),
            other => Err(unexpected("hotplug_cpu", other)),
        }
    }

    async fn hotplug_cpu_at(&self, at: CpuTopology) -> vmkit_core::Result<CpuInfo> {
        match self
            .0
            .call(Request::HotplugCpuAt {
                instance: self.0.id,
                at,
            })
            .await?
        {
            Reply::Cpu { cpu } => Ok(cpu),
            other => Err(unexpected("hotplug_cpu_at", other)),
        }
    }

    async fn unplug_cpu(&self, index: u32) -> vmkit_core::Result<()> {
        self.0
            .done(
                "unplug_cpu",
                Request::UnplugCpu {
                    instance: self.0.id,
                    index,
                },
            )
            .await
    }

    async fn set_vcpus(&self, count: u32) -> vmkit_core::Result<VcpuResize> {
        match self
            .0
            .call(Request::SetVcpus {
                instance: self.0.id,
                count,
            })
            .await?
        {
            Reply::Resize {
                requested,
                before,
                achieved,
                failures,
            } => Ok(resize_from_wire(requested, before, achieved, failures)),
            other => Err(unexpected("set_vcpus", other)),
        }
    }
}

/// Memory hot-plug in a plugin.
struct RemoteMemory(Remote);

#[async_trait]
impl MemoryHotplugger for RemoteMemory {
    async fn query_memory(&self) -> vmkit_core::Result<MemoryInfo> {
        match self
            .0
            .call(Request::QueryMemory {
                instance: self.0.id,
            })
            .await?
        {
            Reply::Memory { memory } => Ok(memory),
            other => Err(unexpected("query_memory", other)),
        }
    }

    async fn hotplug_memory(&self, size_mib: u64) -> vmkit_core::Result<String> {
        match self
            .0
            .call(Request::HotplugMemory {
                instance: self.0.id,
                size_mib,
            })
            .await?
        {
            Reply::Id { id } => Ok(id),
            other => Err(unexpected("hotplug_memory", other)),
        }
    }

    async fn unplug_memory(&self, id: &str) -> vmkit_core::Result<()> {
        self.0
            .done(
                "unplug_memory",
                Request::UnplugMemory {
                    instance: self.0.id,
                    id: id.to_owned(),
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_fd_never_crosses_to_a_plugin() {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let nic = vmkit_core::NicConfig {
            id: "net0".into(),
            backend: vmkit_core::NicBackend::TapFd { fd: fd.into() },
            mac: None,
        };
        let err = crossable("hotplug_device", &DeviceSpec::Nic(nic)).unwrap_err();
        assert!(matches!(err, CoreError::Unsupported { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("nic net0: cannot cross"), "{message}");
        assert!(message.contains("name the TAP instead"), "{message}");
        let named = vmkit_core::NicConfig::tap("net1", "tap1", None);
        assert!(crossable("add_device", &DeviceSpec::Nic(named)).is_ok());
    }
}
