//! # vmkit-core
//!
//! The backend-neutral heart of vmkit: the traits every VMM backend implements
//! ([`Instance`], [`DeviceConfigurator`], [`GuestCommunicator`], [`ResourceManager`],
//! [`CpuHotplugger`], [`MemoryHotplugger`], [`Backend`]), the VM state machine
//! ([`VmState`], [`StateCell`]) and the [`Lifecycle`] helper every backend builds its
//! instances on, the plain-data configuration ([`InstanceConfig`]) with
//! its validation, the reported types ([`VmInfo`], [`Capabilities`], [`VmEvent`],
//! [`ExitInfo`]), the crate's [`Error`], and the backend [`Registry`].
//!
//! It knows nothing of QEMU: backends such as `vmkit-qemu` implement these traits and
//! register themselves; runtimes program against the traits.
//!
//! ```no_run
//! use vmkit_core::{InstanceConfig, Registry, StartOptions};
//!
//! # async fn run() -> vmkit_core::Result<()> {
//! // Every backend linked into the binary (e.g. `use vmkit_qemu as _;`).
//! let registry = Registry::from_inventory()?;
//!
//! let mut config = InstanceConfig::new("sandbox-1", "/run/vmkit/sandbox-1", "/var/lib/vmkit/vmlinux");
//! config.resources.max_vcpus = 4;
//! config.validate()?; // backends validate again in `create`; errors name the field
//!
//! let vm = registry.create("qemu", config)?;
//! vm.start(StartOptions::new()).await?; // New → Starting → Running
//! if let Some(cpus) = vm.cpu_hotplugger() {
//!     cpus.set_vcpus(2).await?;
//! }
//! let exit = vm.shutdown().await?; // any → Shutdown; idempotent
//! println!("{:?} by {:?}", exit.reason, exit.stage);
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod config;
pub mod device_spec;
pub mod devices;
pub mod error;
mod forward;
pub mod guest_addr;
pub mod info;
pub mod instance;
pub mod lifecycle;
pub mod resources;
pub mod share;
pub mod state;
pub mod state_cell;
pub mod state_dir;
pub mod validate;

pub use backend::{Backend, BackendListing, BackendOrigin, BackendRegistration, Registry};
pub use config::{
    Accel, DEFAULT_AGENT_PORT, GuestTransport, InstanceConfig, KernelConfig, MemoryHotplug,
    Resources, StateLayout, Timeouts,
};
pub use device_spec::{DeviceInfo, DeviceSpec, DeviceState};
pub use devices::{DiskConfig, DiskFormat, HostFd, MacAddr, NicBackend, NicConfig, VmnetMode};
pub use error::{Error, Result};
pub use guest_addr::GuestAddr;
pub use info::{
    BlockErrorAction, BlockOperation, Capabilities, ExitInfo, ExitReason, ShutdownStage, VmEvent,
    VmInfo,
};
pub use instance::{
    DeviceConfigurator, GuestClient, GuestCommunicator, GuestStream, Instance, StartOptions,
};
pub use lifecycle::{Lifecycle, StartAttempt, StopGuard};
pub use resources::{
    CpuFailure, CpuHotplugger, CpuInfo, CpuTopology, DimmInfo, MemoryHotplugger, MemoryInfo,
    ResourceManager, VcpuResize,
};
pub use share::{MAX_SHARE_TAG, ShareCache, ShareConfig, ShareVia};
pub use state::VmState;
pub use state_cell::StateCell;
pub use state_dir::StateDirLock;

#[doc(hidden)]
pub use inventory as __inventory;
