//! Resizing a running VM: [`ResourceManager`] hands out the [`CpuHotplugger`] and
//! [`MemoryHotplugger`] a backend has, or `None` when it has none.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Access to the VM's hot-plug capabilities.
pub trait ResourceManager: Send + Sync {
    /// vCPU hot-plug, or `None` when this instance cannot change its vCPUs.
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger>;

    /// Memory hot-plug, or `None` when this instance cannot change its memory.
    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger>;
}

/// Where a vCPU sits in the VM's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CpuTopology {
    /// Socket id.
    pub socket: u32,
    /// Core id within the socket.
    pub core: u32,
    /// Thread id within the core.
    pub thread: u32,
}

/// One vCPU as the VMM and the guest see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// The guest's CPU number (Linux `cpuN`).
    pub index: u32,
    /// Its place in the topology.
    pub topology: CpuTopology,
    /// The device id, for a hot-plugged vCPU (`None` for boot vCPUs).
    pub device_id: Option<String>,
    /// Whether the guest has it online; `None` when the guest was not asked (it has no
    /// agent, or it is paused and cannot answer).
    pub online: Option<bool>,
}

/// Why one vCPU of a [`CpuHotplugger::set_vcpus`] did not get there.
#[derive(Debug)]
pub struct CpuFailure {
    /// The guest CPU number that was being added or removed.
    pub index: u32,
    /// What failed, with the VMM's or guest's own message.
    pub error: Error,
}

/// What [`CpuHotplugger::set_vcpus`] reached.
#[derive(Debug)]
pub struct VcpuResize {
    /// The count asked for.
    pub requested: u32,
    /// The count before.
    pub before: u32,
    /// The count reached (online in the guest).
    pub achieved: u32,
    /// One entry per vCPU that failed, with why.
    pub failures: Vec<CpuFailure>,
}

/// vCPU hot-plug. Calls on one VM are serialised by the backend.
#[async_trait]
pub trait CpuHotplugger: Send + Sync {
    /// The VM's vCPUs: the VMM's view joined with the guest's online set.
    ///
    /// Allowed in: `Running`, `Paused`.
    ///
    /// # Errors
    /// `InvalidState`, `Timeout`, `Backend`.
    async fn query_cpus(&self) -> Result<Vec<CpuInfo>>;

    /// Adds one vCPU in the next free slot and waits until the guest has it online.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidState`; `Exhausted` when all `max_vcpus` are present; `Backend` with
    /// the VMM's error text; `Timeout` when the guest never onlined it.
    async fn hotplug_cpu(&self) -> Result<CpuInfo>;

    /// Adds the vCPU of slot `at` (a socket, core and thread as [`CpuInfo::topology`]
    /// reports them) and waits until the guest has it online.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidState`; `NotFound` when the VM has no such slot; `BadArgument` when the
    /// slot holds a vCPU already (or the backend cannot fill it out of order); the
    /// errors of [`CpuHotplugger::hotplug_cpu`].
    async fn hotplug_cpu_at(&self, at: CpuTopology) -> Result<CpuInfo>;

    /// Removes the hot-plugged vCPU `index` and waits until the VMM no longer lists it.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidState`; `BadArgument` for a boot vCPU; `NotFound` for an unknown index;
    /// `Unsupported` where the VMM cannot unplug; `Timeout`; `Backend`.
    async fn unplug_cpu(&self, index: u32) -> Result<()>;

    /// Adds or removes vCPUs until `count` are online; returns how far it got and, per
    /// vCPU that failed, why.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidState`; `BadArgument` when `count` is outside `1..=max_vcpus` (checked
    /// before anything is changed).
    async fn set_vcpus(&self, count: u32) -> Result<VcpuResize>;
}

/// One hot-plugged memory device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimmInfo {
    /// The device id (used with [`MemoryHotplugger::unplug_memory`]).
    pub id: String,
    /// Its size in MiB.
    pub size_mib: u64,
    /// The slot it occupies, where the VMM reports one.
    pub slot: Option<u32>,
    /// Its guest-physical base address.
    pub address: Option<u64>,
}

/// The VM's memory as the VMM and the guest see it. Sizes in MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Boot memory.
    pub base_mib: u64,
    /// Hot-plugged memory in total.
    pub plugged_mib: u64,
    /// The ceiling (`max_memory_mib`).
    pub max_mib: u64,
    /// The hot-plugged devices.
    pub dimms: Vec<DimmInfo>,
    /// The guest's `MemTotal`, when the guest was asked (not when it has no agent or is
    /// paused).
    pub guest_total_mib: Option<u64>,
}

/// Memory hot-plug. Calls on one VM are serialised by the backend.
///
/// With DIMMs ([`MemoryHotplug::Dimm`](crate::MemoryHotplug::Dimm)) each hot-plug is one
/// device. With virtio-mem ([`MemoryHotplug::VirtioMem`](crate::MemoryHotplug::VirtioMem))
/// each hot-plug is a *grant* on the VM's one virtio-mem device: the id names the grant,
/// [`MemoryInfo::dimms`] lists the grants, and unplugging one takes back its size.
#[async_trait]
pub trait MemoryHotplugger: Send + Sync {
    /// Boot, plugged and per-device memory, and the guest's view.
    ///
    /// Allowed in: `Running`, `Paused`.
    ///
    /// # Errors
    /// `InvalidState`, `Timeout`, `Backend`.
    async fn query_memory(&self) -> Result<MemoryInfo>;

    /// Adds `size_mib` of memory as one device and waits until the guest has it online;
    /// returns the device id. On any failure, whatever was created is removed again.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidConfig` for a size that is not aligned (to the guest's memory block for
    /// DIMMs, to the device block for virtio-mem) or exceeds `max_memory_mib` or the free
    /// slots (checked before any VMM command);
    /// `InvalidState`; `Timeout`; `Backend` with the VMM's error text.
    async fn hotplug_memory(&self, size_mib: u64) -> Result<String>;

    /// Removes the memory device `id` and waits until the VMM reports it gone.
    ///
    /// Allowed in: `Running`.
    ///
    /// # Errors
    /// `InvalidConfig` (unknown id), `InvalidState`, `Timeout` (the guest did not
    /// release it), `Backend`.
    async fn unplug_memory(&self, id: &str) -> Result<()>;
}
