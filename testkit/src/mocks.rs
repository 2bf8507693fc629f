//! [`mockall`] mocks of vmkit-core's traits, for testing code that drives VMs through
//! them (a runtime's retry, timeout, cleanup and resize logic) with no VM at all: script
//! what each call returns, and check what your code called and how often.
//!
//! - [`MockInstance`]: the whole [`Instance`] (with [`DeviceConfigurator`],
//!   [`GuestCommunicator`] and [`ResourceManager`]), so it fits every
//!   `Box<dyn Instance>` / `&dyn Instance` your code takes.
//! - [`MockBackend`]: a [`Backend`] whose `create` hands out your `MockInstance`s; with
//!   [`vmkit_core::Registry::register`] your code's `Registry::create` reaches it.
//! - [`MockCpuHotplugger`], [`MockMemoryHotplugger`]: what `cpu_hotplugger()` and
//!   `memory_hotplugger()` return. Those give out references, so a mock returns a
//!   `&'static` one: make it with [`leak`] (a test leaks a few bytes).
//! - [`MockDeviceConfigurator`], [`MockGuestCommunicator`], [`MockResourceManager`]: for
//!   code generic over just one of those traits.
//!
//! Enabled by the `mocks` feature: `vmkit-testkit = { …, features = ["mocks"] }` in your
//! `[dev-dependencies]`.
//!
//! ```
//! use vmkit_core::{Error, Instance, StartOptions, VmState};
//! use vmkit_testkit::mocks::MockInstance;
//!
//! /// The code under test: start, and try once more after a timeout.
//! async fn start_with_retry(vm: &dyn Instance) -> vmkit_core::Result<()> {
//!     match vm.start(StartOptions::new()).await {
//!         Err(Error::Timeout { .. }) => vm.start(StartOptions::new()).await,
//!         other => other,
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut vm = MockInstance::new();
//! let mut seq = mockall::Sequence::new();
//! vm.expect_start().times(1).in_sequence(&mut seq).returning(|_| {
//!     Err(Error::Timeout { op: "start".into(), after: std::time::Duration::from_secs(30) })
//! });
//! vm.expect_start().times(1).in_sequence(&mut seq).returning(|_| Ok(()));
//! vm.expect_state().return_const(VmState::Running);
//!
//! start_with_retry(&vm).await.unwrap();
//! assert_eq!(vm.state(), VmState::Running);
//! # });
//! ```

use std::time::Duration;

use async_trait::async_trait;
use mockall::mock;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, CpuInfo, CpuTopology, DeviceConfigurator, DeviceInfo,
    DeviceSpec, ExitInfo, GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig,
    MemoryHotplugger, MemoryInfo, ResourceManager, Result, StartOptions, VcpuResize, VmEvent,
    VmInfo, VmState,
};

/// A value that lives for the rest of the test process, for the mocks' methods that
/// return references (`cpu_hotplugger`, `memory_hotplugger`):
/// `vm.expect_cpu_hotplugger().return_const(Some(leak(cpus) as &dyn CpuHotplugger))`.
pub fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

mock! {
    /// A mock [`Instance`]: every method of it and of its supertraits is an expectation
    /// (`expect_start`, `expect_add_device`, `expect_client`, `expect_cpu_hotplugger`, …).
    pub Instance {}

    #[async_trait]
    impl Instance for Instance {
        async fn start(&self, opts: StartOptions) -> Result<()>;
        async fn shutdown(&self) -> Result<ExitInfo>;
        async fn pause(&self) -> Result<()>;
        async fn resume(&self) -> Result<()>;
        async fn wait(&self) -> ExitInfo;
        fn state(&self) -> VmState;
        fn vm_info(&self) -> VmInfo;
        fn events(&self) -> broadcast::Receiver<VmEvent>;
    }

    #[async_trait]
    impl DeviceConfigurator for Instance {
        fn add_device(&self, spec: DeviceSpec) -> Result<()>;
        async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()>;
        async fn unplug(&self, id: &str) -> Result<()>;
        fn devices(&self) -> Vec<DeviceInfo>;
    }

    #[async_trait]
    impl GuestCommunicator for Instance {
        async fn client(&self) -> Result<GuestClient>;
        async fn dial_client(&self) -> Result<GuestClient>;
        async fn dial_client_with_retry(&self, timeout: Duration) -> Result<GuestClient>;
        async fn start_stream(&self, port: u32) -> Result<Box<dyn GuestStream>>;
    }

    impl ResourceManager for Instance {
        fn cpu_hotplugger(&self) -> Option<&'static dyn CpuHotplugger>;
        fn memory_hotplugger(&self) -> Option<&'static dyn MemoryHotplugger>;
    }
}

mock! {
    /// A mock [`Backend`]: script `name`, `capabilities` and what `create` returns (a
    /// `Box<dyn Instance>`, e.g. a configured [`MockInstance`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmkit_core::{InstanceConfig, Registry, VmState};
    /// use vmkit_testkit::mocks::{MockBackend, MockInstance};
    ///
    /// let mut backend = MockBackend::new();
    /// backend.expect_name().return_const("mock".to_owned());
    /// backend.expect_create().times(1).returning(|config| {
    ///     assert_eq!(config.id, "sandbox-1");
    ///     let mut vm = MockInstance::new();
    ///     vm.expect_state().return_const(VmState::New);
    ///     Ok(Box::new(vm))
    /// });
    /// let mut registry = Registry::new();
    /// registry.register(Arc::new(backend)).unwrap();
    /// // The code under test creates through the registry, by name:
    /// let config = InstanceConfig::new("sandbox-1", "/run/vmkit/sandbox-1", "/boot/vmlinuz");
    /// let vm = registry.create("mock", config).unwrap();
    /// assert_eq!(vm.state(), VmState::New);
    /// ```
    pub Backend {}

    impl Backend for Backend {
        fn name(&self) -> &str;
        fn capabilities(&self) -> Capabilities;
        fn create(&self, config: InstanceConfig) -> Result<Box<dyn Instance>>;
    }
}

mock! {
    /// A mock [`CpuHotplugger`], handed out by a [`MockInstance`] through [`leak`].
    ///
    /// ```
    /// use vmkit_core::{CpuHotplugger, Instance, VcpuResize};
    /// use vmkit_testkit::mocks::{MockCpuHotplugger, MockInstance, leak};
    ///
    /// /// The code under test: grow to `want` vCPUs where the backend can.
    /// async fn grow(vm: &dyn Instance, want: u32) -> vmkit_core::Result<u32> {
    ///     match vm.cpu_hotplugger() {
    ///         Some(cpus) => Ok(cpus.set_vcpus(want).await?.achieved),
    ///         None => Ok(0),
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let mut cpus = MockCpuHotplugger::new();
    /// cpus.expect_set_vcpus()
    ///     .withf(|n| *n == 4)
    ///     .returning(|n| Ok(VcpuResize { requested: n, before: 1, achieved: 3, failures: vec![] }));
    /// let mut vm = MockInstance::new();
    /// vm.expect_cpu_hotplugger()
    ///     .return_const(Some(leak(cpus) as &dyn CpuHotplugger));
    /// assert_eq!(grow(&vm, 4).await.unwrap(), 3);
    /// # });
    /// ```
    pub CpuHotplugger {}

    #[async_trait]
    impl CpuHotplugger for CpuHotplugger {
        async fn query_cpus(&self) -> Result<Vec<CpuInfo>>;
        async fn hotplug_cpu(&self) -> Result<CpuInfo>;
        async fn hotplug_cpu_at(&self, at: CpuTopology) -> Result<CpuInfo>;
        async fn unplug_cpu(&self, index: u32) -> Result<()>;
        async fn set_vcpus(&self, count: u32) -> Result<VcpuResize>;
    }
}

mock! {
    /// A mock [`MemoryHotplugger`], handed out by a [`MockInstance`] through [`leak`].
    ///
    /// ```
    /// use vmkit_core::{Error, MemoryHotplugger};
    /// use vmkit_testkit::mocks::MockMemoryHotplugger;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let mut memory = MockMemoryHotplugger::new();
    /// // The backend refuses: does the code under test pass the reason on?
    /// memory.expect_hotplug_memory().returning(|mib| {
    ///     Err(Error::config("size_mib", format!("{mib} MiB exceeds max_memory_mib")))
    /// });
    /// let err = memory.hotplug_memory(4096).await.unwrap_err();
    /// assert!(err.to_string().contains("exceeds max_memory_mib"));
    /// # });
    /// ```
    pub MemoryHotplugger {}

    #[async_trait]
    impl MemoryHotplugger for MemoryHotplugger {
        async fn query_memory(&self) -> Result<MemoryInfo>;
        async fn hotplug_memory(&self, size_mib: u64) -> Result<String>;
        async fn unplug_memory(&self, id: &str) -> Result<()>;
    }
}

mock! {
    /// A mock [`DeviceConfigurator`] alone.
    ///
    /// ```
    /// use vmkit_core::{DeviceConfigurator, DeviceSpec, DiskConfig};
    /// use vmkit_testkit::mocks::MockDeviceConfigurator;
    ///
    /// let mut devices = MockDeviceConfigurator::new();
    /// // `add_disk` is a provided wrapper: it reaches the mock as `add_device`.
    /// devices
    ///     .expect_add_device()
    ///     .withf(|spec| matches!(spec, DeviceSpec::Disk(d) if d.id == "data"))
    ///     .times(1)
    ///     .returning(|_| Ok(()));
    /// devices.add_disk(DiskConfig::new("data", "/var/lib/data.img")).unwrap();
    /// ```
    pub DeviceConfigurator {}

    #[async_trait]
    impl DeviceConfigurator for DeviceConfigurator {
        fn add_device(&self, spec: DeviceSpec) -> Result<()>;
        async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()>;
        async fn unplug(&self, id: &str) -> Result<()>;
        fn devices(&self) -> Vec<DeviceInfo>;
    }
}

mock! {
    /// A mock [`GuestCommunicator`] alone.
    ///
    /// ```
    /// use vmkit_core::{Error, GuestCommunicator};
    /// use vmkit_testkit::mocks::MockGuestCommunicator;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let mut guest = MockGuestCommunicator::new();
    /// // A guest whose agent never answers: the code under test must give up cleanly.
    /// guest.expect_dial_client_with_retry().returning(|after| {
    ///     Err(Error::Timeout { op: "dial_client_with_retry".into(), after })
    /// });
    /// let err = guest
    ///     .dial_client_with_retry(std::time::Duration::from_secs(1))
    ///     .await
    ///     .err()
    ///     .unwrap();
    /// assert!(matches!(err, Error::Timeout { .. }));
    /// # });
    /// ```
    pub GuestCommunicator {}

    #[async_trait]
    impl GuestCommunicator for GuestCommunicator {
        async fn client(&self) -> Result<GuestClient>;
        async fn dial_client(&self) -> Result<GuestClient>;
        async fn dial_client_with_retry(&self, timeout: Duration) -> Result<GuestClient>;
        async fn start_stream(&self, port: u32) -> Result<Box<dyn GuestStream>>;
    }
}

mock! {
    /// A mock [`ResourceManager`] alone.
    ///
    /// ```
    /// use vmkit_core::ResourceManager;
    /// use vmkit_testkit::mocks::MockResourceManager;
    ///
    /// // A backend without memory hot-plug: the code under test must not try.
    /// let mut resources = MockResourceManager::new();
    /// resources.expect_memory_hotplugger().return_const(None);
    /// assert!(resources.memory_hotplugger().is_none());
    /// ```
    pub ResourceManager {}

    impl ResourceManager for ResourceManager {
        fn cpu_hotplugger(&self) -> Option<&'static dyn CpuHotplugger>;
        fn memory_hotplugger(&self) -> Option<&'static dyn MemoryHotplugger>;
    }
}
