//! # vmkit-plugin-example
//!
//! A minimal backend written as a downstream author would, and exported as a plugin
//! library with one macro (see `docs/plugins.md`). Its "VMs" run nothing: they keep
//! vmkit's state table, cold devices and events, which is all the contract asks of a
//! backend without a guest. Build it with `cargo build -p vmkit-plugin-example` and
//! load `target/debug/libvmkit_plugin_example.so` with `vmkit_plugin::loader::load`.
//!
//! ```
//! use vmkit_core::Backend;
//! assert_eq!(vmkit_plugin_example::NullBackend.name(), "null");
//! ```

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, DeviceConfigurator, DeviceInfo, DeviceSpec, Error,
    ExitInfo, ExitReason, GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig,
    Lifecycle, MemoryHotplugger, ResourceManager, Result, StartOptions, VmEvent, VmInfo, VmState,
};

/// The backend: `"null"`, VMs that run nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullBackend;

impl Backend for NullBackend {
    fn name(&self) -> &str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::PAUSE
    }

    fn create(&self, config: InstanceConfig) -> Result<Box<dyn Instance>> {
        // A null VM boots no kernel: the config's kernel is not checked.
        config.validate()?;
        Ok(Box::new(NullVm {
            config,
            life: Lifecycle::new(),
            devices: Mutex::new(Vec::new()),
        }))
    }
}

vmkit_plugin::export_backend!(NullBackend);

/// A VM of [`NullBackend`]: vmkit-core's [`Lifecycle`] keeps its state, events and exit.
struct NullVm {
    config: InstanceConfig,
    life: Lifecycle,
    /// Its cold-plugged disks and NICs.
    devices: Mutex<Vec<DeviceInfo>>,
}

/// What a null VM cannot do.
const NOTHING: &str = "a null VM has no guest and no devices to plug";

impl NullVm {
    fn unsupported(&self, op: &'static str, live: &[VmState]) -> Error {
        self.life.unsupported(op, "null", live, NOTHING)
    }

    /// Keeps a cold disk or NIC: before start only, validated, once per id. A kind it
    /// has nothing for (a share) is `Unsupported`.
    fn add_cold(&self, spec: DeviceSpec) -> Result<()> {
        const OP: &str = "add_device";
        self.life.require(OP, &[VmState::New])?;
        if !matches!(spec, DeviceSpec::Disk(_) | DeviceSpec::Nic(_)) {
            return Err(Error::unsupported(
                OP,
                "null",
                format!("a null VM keeps disks and NICs, not a {}", spec.kind()),
            ));
        }
        spec.validate(spec.kind())?;
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let id = spec.id();
        if devices.iter().any(|d| d.id() == id) {
            return Err(Error::config(
                format!("{}.id", spec.kind()),
                format!("{OP}: duplicate device id {id:?}"),
            ));
        }
        devices.push(DeviceInfo::attached(spec, false));
        Ok(())
    }

    /// Its devices, in the order added.
    fn devices(&self) -> Vec<DeviceInfo> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Instance for NullVm {
    async fn start(&self, _opts: StartOptions) -> Result<()> {
        self.life.begin_start("start")?.running()
    }

    async fn shutdown(&self) -> Result<ExitInfo> {
        // Ended, being stopped, never started: the answer is known. Else stop it.
        let _stop = match self.life.begin_shutdown().await {
            Ok(stop) => stop,
            Err(known) => return Ok(known),
        };
        let exit = ExitInfo::new(ExitReason::HostShutdown);
        Ok(self.life.end(exit, async {}).await)
    }

    async fn pause(&self) -> Result<()> {
        self.life.pause(async { Ok(()) }).await
    }

    async fn resume(&self) -> Result<()> {
        self.life.resume(async { Ok(()) }).await
    }

    async fn wait(&self) -> ExitInfo {
        self.life.wait_exit().await
    }

    fn state(&self) -> VmState {
        self.life.state()
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            id: self.config.id.clone(),
            backend: "null".into(),
            state: self.life.state(),
            pid: None,
            cid: None,
            sockets: Vec::new(),
            guest: None,
            capabilities: Capabilities::PAUSE,
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.life.events()
    }
}

#[async_trait]
impl DeviceConfigurator for NullVm {
    fn add_device(&self, spec: DeviceSpec) -> Result<()> {
        self.add_cold(spec)
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()> {
        Err(self.unsupported(spec.hotplug_op(), &[VmState::Running]))
    }

    async fn unplug(&self, _id: &str) -> Result<()> {
        Err(self.unsupported("unplug", &[VmState::Running]))
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        NullVm::devices(self)
    }
}

#[async_trait]
impl GuestCommunicator for NullVm {
    async fn client(&self) -> Result<GuestClient> {
        Err(self.unsupported("client", &[VmState::Running, VmState::Paused]))
    }

    async fn dial_client(&self) -> Result<GuestClient> {
        Err(self.unsupported("dial_client", &[VmState::Running, VmState::Paused]))
    }

    async fn dial_client_with_retry(&self, _timeout: Duration) -> Result<GuestClient> {
        Err(self.unsupported(
            "dial_client_with_retry",
            &[VmState::Running, VmState::Paused],
        ))
    }

    async fn start_stream(&self, _port: u32) -> Result<Box<dyn GuestStream>> {
        Err(self.unsupported("start_stream", &[VmState::Running]))
    }
}

impl ResourceManager for NullVm {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        None
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        None
    }
}
