//! # vmkit-plugin-example
//!
//! A minimal backend written as a downstream author would, and exported as a plugin
//! library with one macro (see `docs/plugins.md`). Its "VMs" run nothing: they keep
//! vmkit's state table, cold disks and events, which is all the contract asks of a
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
use tokio::sync::{broadcast, watch};
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, DeviceConfigurator, DiskConfig, Error, ExitInfo,
    ExitReason, GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig,
    MemoryHotplugger, NicConfig, ResourceManager, Result, StartOptions, StateCell, VmEvent, VmInfo,
    VmState,
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
        config.validate()?;
        let (events, _) = broadcast::channel(64);
        Ok(Box::new(NullVm {
            config,
            state: StateCell::new(),
            events,
            exit: watch::channel(None).0,
            disks: Mutex::new(Vec::new()),
        }))
    }
}

vmkit_plugin::export_backend!(NullBackend);

/// A VM of [`NullBackend`].
struct NullVm {
    config: InstanceConfig,
    state: StateCell,
    events: broadcast::Sender<VmEvent>,
    exit: watch::Sender<Option<ExitInfo>>,
    disks: Mutex<Vec<DiskConfig>>,
}

impl NullVm {
    fn change(&self, op: &'static str, from: VmState, to: VmState) -> Result<()> {
        self.state.transition(op, from, to)?;
        let _ = self.events.send(VmEvent::StateChanged { from, to });
        Ok(())
    }

    /// Ends the VM once; every later call gets the first exit.
    fn end(&self, reason: ExitReason) -> ExitInfo {
        let mut first = None;
        self.exit.send_if_modified(|exit| {
            if exit.is_some() {
                return false;
            }
            let from = self.state.get();
            let reason = if from == VmState::New {
                ExitReason::NeverStarted
            } else {
                reason
            };
            if self
                .state
                .transition_from_any("shutdown", VmState::Shutdown)
                .is_ok()
            {
                let _ = self.events.send(VmEvent::StateChanged {
                    from,
                    to: VmState::Shutdown,
                });
            }
            let info = ExitInfo {
                reason,
                stage: None,
                exit_code: None,
                signal: None,
                message: None,
            };
            let _ = self.events.send(VmEvent::Exited(info.clone()));
            *exit = Some(info);
            first = exit.clone();
            true
        });
        first
            .or_else(|| self.exit.borrow().clone())
            .unwrap_or_else(ExitInfo::never_started)
    }

    fn unsupported(&self, op: &'static str, live: &[VmState]) -> Error {
        match self.state.require(op, live) {
            Err(wrong_state) => wrong_state,
            Ok(_) => {
                Error::unsupported(op, "null", "a null VM has no guest and no devices to plug")
            }
        }
    }
}

#[async_trait]
impl Instance for NullVm {
    async fn start(&self, _opts: StartOptions) -> Result<()> {
        self.change("start", VmState::New, VmState::Starting)?;
        self.change("start", VmState::Starting, VmState::Running)
    }

    async fn shutdown(&self) -> Result<ExitInfo> {
        Ok(self.end(ExitReason::HostShutdown))
    }

    async fn pause(&self) -> Result<()> {
        self.change("pause", VmState::Running, VmState::Paused)
    }

    async fn resume(&self) -> Result<()> {
        self.change("resume", VmState::Paused, VmState::Running)
    }

    async fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.subscribe();
        match exit.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_else(ExitInfo::never_started),
            Err(_) => ExitInfo::never_started(),
        }
    }

    fn state(&self) -> VmState {
        self.state.get()
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            id: self.config.id.clone(),
            backend: "null".into(),
            state: self.state.get(),
            pid: None,
            cid: None,
            sockets: Vec::new(),
            guest: None,
            capabilities: Capabilities::PAUSE,
        }
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}

#[async_trait]
impl DeviceConfigurator for NullVm {
    fn add_disk(&self, disk: DiskConfig) -> Result<()> {
        self.state.require("add_disk", &[VmState::New])?;
        disk.validate("disk")?;
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        if disks.iter().any(|d| d.id == disk.id) {
            return Err(Error::config(
                "disk.id",
                format!("duplicate disk id {:?}", disk.id),
            ));
        }
        disks.push(disk);
        Ok(())
    }

    fn add_nic(&self, _nic: NicConfig) -> Result<()> {
        Err(self.unsupported("add_nic", &[VmState::New]))
    }

    async fn hotplug_disk(&self, _disk: DiskConfig) -> Result<()> {
        Err(self.unsupported("hotplug_disk", &[VmState::Running]))
    }

    async fn hotplug_nic(&self, _nic: NicConfig) -> Result<()> {
        Err(self.unsupported("hotplug_nic", &[VmState::Running]))
    }

    async fn unplug(&self, _id: &str) -> Result<()> {
        Err(self.unsupported("unplug", &[VmState::Running]))
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
