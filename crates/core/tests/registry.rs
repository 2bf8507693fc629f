//! The backend registry: static registration through `inventory`, dynamic registration,
//! creation by name, and the errors for unknown and duplicate names.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, DeviceConfigurator, DeviceInfo, DeviceSpec, DiskConfig,
    Error, ExitInfo, GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig,
    MemoryHotplugger, Registry, ResourceManager, Result, StartOptions, StateCell, VmEvent, VmInfo,
    VmState,
};

/// A backend with no VMM: enough life cycle to prove the registry hands out working
/// instances whose state machine is the core's.
struct Loopback {
    name: &'static str,
}

struct LoopbackVm {
    config: InstanceConfig,
    state: StateCell,
    events: broadcast::Sender<VmEvent>,
}

vmkit_core::register_backend!(|| Arc::new(Loopback { name: "loopback" }));
vmkit_core::register_backend!(|| Arc::new(Loopback { name: "loopback-2" }));

impl Backend for Loopback {
    fn name(&self) -> &str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::PAUSE
    }

    fn create(&self, config: InstanceConfig) -> Result<Box<dyn Instance>> {
        config.validate()?;
        Ok(Box::new(LoopbackVm {
            config,
            state: StateCell::new(),
            events: broadcast::channel(16).0,
        }))
    }
}

impl LoopbackVm {
    fn unsupported(&self, op: &str) -> Error {
        Error::unsupported(op, "loopback", "the loopback backend has no guest")
    }
}

#[async_trait]
impl Instance for LoopbackVm {
    async fn start(&self, _opts: StartOptions) -> Result<()> {
        self.state
            .transition("start", VmState::New, VmState::Starting)?;
        self.state
            .transition("start", VmState::Starting, VmState::Running)
    }

    async fn shutdown(&self) -> Result<ExitInfo> {
        match self
            .state
            .transition_from_any("shutdown", VmState::Shutdown)
        {
            Ok(_) | Err(Error::InvalidState { .. }) => Ok(ExitInfo::never_started()),
            Err(e) => Err(e),
        }
    }

    async fn pause(&self) -> Result<()> {
        self.state
            .transition("pause", VmState::Running, VmState::Paused)
    }

    async fn resume(&self) -> Result<()> {
        self.state
            .transition("resume", VmState::Paused, VmState::Running)
    }

    async fn wait(&self) -> ExitInfo {
        ExitInfo::never_started()
    }

    fn state(&self) -> VmState {
        self.state.get()
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            id: self.config.id.clone(),
            backend: "loopback".into(),
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
impl DeviceConfigurator for LoopbackVm {
    fn add_device(&self, spec: DeviceSpec) -> Result<()> {
        self.state.require("add_device", &[VmState::New])?;
        spec.validate(spec.kind())
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()> {
        Err(self.unsupported(spec.hotplug_op()))
    }

    async fn unplug(&self, _id: &str) -> Result<()> {
        Err(self.unsupported("unplug"))
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        Vec::new()
    }
}

#[async_trait]
impl GuestCommunicator for LoopbackVm {
    async fn client(&self) -> Result<GuestClient> {
        Err(self.unsupported("client"))
    }

    async fn dial_client(&self) -> Result<GuestClient> {
        Err(self.unsupported("dial_client"))
    }

    async fn dial_client_with_retry(&self, _timeout: Duration) -> Result<GuestClient> {
        Err(self.unsupported("dial_client_with_retry"))
    }

    async fn start_stream(&self, _port: u32) -> Result<Box<dyn GuestStream>> {
        Err(self.unsupported("start_stream"))
    }
}

impl ResourceManager for LoopbackVm {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        None
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        None
    }
}

fn config(dir: &tempfile::TempDir) -> InstanceConfig {
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").unwrap();
    InstanceConfig::new("vm1", dir.path().join("state"), kernel)
}

#[test]
fn inventory_registrations_are_listed_sorted() {
    let registry = Registry::from_inventory().unwrap();
    assert_eq!(registry.names(), ["loopback", "loopback-2"]);
}

#[test]
fn unknown_backend_names_the_known_ones() {
    let registry = Registry::from_inventory().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = registry.create("qemu", config(&dir)).err().unwrap();
    assert_eq!(
        err.to_string(),
        "unknown backend \"qemu\"; known backends: [loopback, loopback-2]"
    );
}

#[test]
fn dynamic_registration_refuses_a_taken_name() {
    let mut registry = Registry::from_inventory().unwrap();
    let err = registry
        .register(Arc::new(Loopback { name: "loopback" }))
        .unwrap_err();
    assert_eq!(err.to_string(), "backend \"loopback\" is registered twice");
    registry
        .register(Arc::new(Loopback { name: "plugin" }))
        .unwrap();
    assert_eq!(registry.names(), ["loopback", "loopback-2", "plugin"]);
}

#[test]
fn create_validates_the_config() {
    let registry = Registry::from_inventory().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.resources.boot_vcpus = 0;
    let err = registry.create("loopback", cfg).err().unwrap();
    assert_eq!(
        err.to_string(),
        "invalid config: resources.boot_vcpus: must be at least 1"
    );
}

#[tokio::test]
async fn created_instances_follow_the_state_machine() {
    let registry = Registry::from_inventory().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = registry.create("loopback", config(&dir)).unwrap();
    assert_eq!(vm.state(), VmState::New);
    assert_eq!(
        vm.pause().await.unwrap_err().to_string(),
        "pause: not allowed while the VM is new"
    );
    vm.start(StartOptions::new()).await.unwrap();
    assert_eq!(
        vm.start(StartOptions::new()).await.unwrap_err().to_string(),
        "start: not allowed while the VM is running"
    );
    let late_disk = DiskConfig::new("d", dir.path().join("vmlinuz"));
    assert_eq!(
        vm.add_disk(late_disk).unwrap_err().to_string(),
        "add_device: not allowed while the VM is running"
    );
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    vm.shutdown().await.unwrap();
    vm.shutdown().await.unwrap();
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(vm.vm_info().state, VmState::Shutdown);
}
