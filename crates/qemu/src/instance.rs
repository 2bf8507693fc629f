//! [`QemuInstance`]: one VM run by QEMU. It owns the VM ([`Vm`]) and implements the
//! core traits, each method a short delegation to the file that does the work: the
//! life cycle to `start`, `shutdown` and `pause`, hot-plug to [`crate::hotplugger`],
//! guest calls to the VM's agent link.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    CpuHotplugger, DeviceConfigurator, DeviceInfo, DeviceSpec, Error as CoreError, ExitInfo,
    GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig, MemoryHotplugger,
    ResourceManager, StartOptions, VmEvent, VmInfo, VmState,
};
use vmkit_proto::{AgentClient, StreamHeader};
use vmkit_vsock::{AgentStream, GuestAddr};

use crate::devices::ColdDevices;
use crate::guest;
use crate::hotplug::pci;
use crate::hotplugger::{Cpus, Memory};
use crate::options::QemuOptions;
use crate::vm::Vm;
use crate::{BACKEND_NAME, pause, shutdown, start};

/// A VM run by QEMU. Created by [`crate::QemuBackend`]; implements [`Instance`].
pub struct QemuInstance {
    vm: Arc<Vm>,
    cpus: Cpus,
    memory: Memory,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("id", &self.vm.id())
            .field("state", &self.vm.life().state())
            .finish()
    }
}

impl QemuInstance {
    pub(crate) fn new(vm: Vm) -> Self {
        let vm = Arc::new(vm);
        QemuInstance {
            cpus: Cpus::new(&vm),
            memory: Memory::new(&vm),
            vm,
        }
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
        if self.vm.features().memory_hotplug.is_none() {
            return Err(CoreError::unsupported(
                "hotplug_memory_in_slot",
                BACKEND_NAME,
                "this instance has no memory hot-plug (q35, an agent, memory_slots and max_memory_mib)",
            ));
        }
        self.memory.hotplug_at(size_mib, Some(slot)).await
    }

    /// The config the instance was created with (cold devices added later are not in it).
    pub fn config(&self) -> &InstanceConfig {
        self.vm.config()
    }

    /// The disks and NICs the VM boots with: the config's, then those added with
    /// `add_disk`/`add_nic`, in order.
    pub fn cold_devices(&self) -> ColdDevices {
        self.vm.cold_devices()
    }

    /// The backend options in force.
    pub fn options(&self) -> &QemuOptions {
        self.vm.options()
    }

    /// Runs a read-only QMP command vmkit does not wrap — `query-*`, `x-query-*`,
    /// `qom-list` or `qom-get` — and returns QEMU's answer, for diagnostics. Anything
    /// else is refused: a command that changed what vmkit manages (devices it plugged,
    /// the run state) would leave its view stale.
    ///
    /// Allowed in: `Running`, `Paused`. Deadline: the config's `timeouts.command`.
    ///
    /// # Errors
    /// `BadArgument` for a command that is not read-only; `InvalidState`; `Backend`
    /// with QEMU's error.
    pub async fn qmp_query(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> vmkit_core::Result<serde_json::Value> {
        let read_only = command.starts_with("query-")
            || command.starts_with("x-query-")
            || matches!(command, "qom-list" | "qom-get");
        if !read_only {
            return Err(CoreError::bad_argument(
                format!("qmp_query {command}"),
                "command",
                "only query-*, x-query-*, qom-list and qom-get: vmkit manages the rest",
            ));
        }
        self.vm
            .life()
            .require("qmp_query", &[VmState::Running, VmState::Paused])?;
        let qmp = self.vm.qmp("qmp_query")?;
        // Not in the schema vmkit can name at compile time: the caller picks the query,
        // so it goes untyped (and read-only, checked above).
        qmp.execute_raw(command, arguments)
            .await
            .map_err(|e| CoreError::backend(format!("qmp_query {command}"), crate::Error::Qmp(e)))
    }

    /// The VM's own QMP client, unrestricted — only with the `unmanaged-qmp` feature,
    /// which exists for benchmarks that time raw QMP against vmkit on the same VM.
    /// Whatever it changes, vmkit does not know about.
    #[cfg(feature = "unmanaged-qmp")]
    pub fn unmanaged_qmp_client(&self) -> Option<vmkit_qmp::QmpClient> {
        self.vm.qmp("unmanaged_qmp_client").ok()
    }

    /// Runs a disk or NIC hot-plug or an unplug (`call`, named `op`) on the VM's
    /// hot-plug queue, once the instance can hot-plug PCIe devices and is running.
    async fn pci_job<F, Fut>(
        &self,
        call: &'static str,
        op: String,
        work: F,
    ) -> vmkit_core::Result<()>
    where
        F: FnOnce(crate::hotplug::Context) -> Fut,
        Fut: std::future::Future<Output = vmkit_core::Result<()>> + Send + 'static,
    {
        if !self.vm.features().pcie_hotplug() {
            return Err(CoreError::unsupported(
                call,
                BACKEND_NAME,
                "hot-plugging disks, NICs and shares needs q35 with hot-plug root ports (backend option hotplug_ports)",
            ));
        }
        let ctx = self.vm.hotplug_context(call, &[VmState::Running])?;
        self.vm.run_hotplug(op, work(ctx)).await
    }
}

#[async_trait]
impl Instance for QemuInstance {
    async fn start(&self, opts: StartOptions) -> vmkit_core::Result<()> {
        start::start(&self.vm, opts).await
    }

    async fn shutdown(&self) -> vmkit_core::Result<ExitInfo> {
        shutdown::shutdown(&self.vm).await
    }

    async fn pause(&self) -> vmkit_core::Result<()> {
        pause::change(&self.vm, "pause", VmState::Paused).await
    }

    async fn resume(&self) -> vmkit_core::Result<()> {
        pause::change(&self.vm, "resume", VmState::Running).await
    }

    async fn wait(&self) -> ExitInfo {
        self.vm.life().wait_exit().await
    }

    fn state(&self) -> VmState {
        self.vm.life().state()
    }

    fn vm_info(&self) -> VmInfo {
        let pid = self
            .vm
            .process()
            .filter(|p| p.exited().is_none())
            .map(|p| p.pid());
        let (cid, guest) = match self.vm.link_info() {
            Some((cid, addr)) => (cid, Some(addr)),
            None => (None, None),
        };
        let mut sockets = vec![(
            "control".to_owned(),
            self.vm.config().layout().control_socket(),
        )];
        if let Some(GuestAddr::HybridVsock { uds, .. }) = &guest {
            sockets.push(("vsock".to_owned(), uds.clone()));
        }
        VmInfo {
            id: self.vm.id().to_owned(),
            backend: BACKEND_NAME.to_owned(),
            state: self.vm.life().state(),
            pid,
            cid,
            sockets,
            guest,
            capabilities: self.vm.features().capabilities(),
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.vm.subscribe()
    }
}

#[async_trait]
impl DeviceConfigurator for QemuInstance {
    fn add_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        self.vm.add_device(spec)
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        let call = spec.hotplug_op();
        let op = format!("{call} {}", spec.id());
        match spec {
            DeviceSpec::Disk(disk) => {
                self.pci_job(
                    call,
                    op,
                    |ctx| async move { pci::add_disk(&ctx, disk).await },
                )
                .await
            }
            DeviceSpec::Nic(nic) => {
                self.pci_job(call, op, |ctx| async move { pci::add_nic(&ctx, nic).await })
                    .await
            }
            DeviceSpec::Share(share) => {
                self.pci_job(
                    call,
                    op,
                    |ctx| async move { pci::add_share(&ctx, share).await },
                )
                .await
            }
            other => Err(self.vm.life().unsupported(
                call,
                BACKEND_NAME,
                &[VmState::Running],
                &format!("a {} cannot be hot-plugged by this backend", other.kind()),
            )),
        }
    }

    async fn unplug(&self, id: &str) -> vmkit_core::Result<()> {
        let ctx = self.vm.hotplug_context("unplug", &[VmState::Running])?;
        let id = id.to_owned();
        self.vm
            .run_hotplug(format!("unplug {id}"), async move {
                pci::remove_device(&ctx, &id).await
            })
            .await
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.vm.devices().list()
    }
}

impl QemuInstance {
    /// The pid of the virtiofsd serving share `id`, while it runs.
    pub fn share_daemon_pid(&self, id: &str) -> Option<u32> {
        self.vm.devices().daemon_pid(id)
    }

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
        let addr = self.vm.agent_addr("open_stream")?;
        self.vm.life().require("open_stream", &[VmState::Running])?;
        vmkit_vsock::open_stream(
            &addr.with_port(vmkit_proto::STREAM_PORT),
            header,
            self.vm.config().timeouts.dial,
        )
        .await
        .map_err(|e| guest::core_error("open_stream", e))
    }
}

#[async_trait]
impl GuestCommunicator for QemuInstance {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        self.vm.agent_client().await
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        let addr = self.vm.agent_addr("dial_client")?;
        vmkit_vsock::connect_ttrpc(&addr, self.vm.config().timeouts.dial)
            .await
            .map_err(|e| guest::core_error("dial_client", e))
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        let addr = self.vm.agent_addr("dial_client_with_retry")?;
        // Counted as connected once the agent answers a Ping on it: through
        // vhost-device-vsock a connection can be accepted and reset right after.
        let deadline = tokio::time::Instant::now() + timeout;
        guest::wait_for_agent(&addr, deadline)
            .await
            .map(|agent| agent.client)
            .map_err(|e| guest::dial_error("dial_client_with_retry", e))
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        let addr = self.vm.agent_addr("start_stream")?;
        self.vm
            .life()
            .require("start_stream", &[VmState::Running])?;
        let conn = vmkit_vsock::dial(&addr.with_port(port), self.vm.config().timeouts.dial)
            .await
            .map_err(|e| guest::core_error("start_stream", e))?;
        Ok(Box::new(conn))
    }
}

impl ResourceManager for QemuInstance {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        self.vm
            .features()
            .cpu_hotplug
            .then_some(&self.cpus as &dyn CpuHotplugger)
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        self.vm
            .features()
            .memory_hotplug
            .is_some()
            .then_some(&self.memory as &dyn MemoryHotplugger)
    }
}
