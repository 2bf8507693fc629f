//! The fake VM's vCPUs and memory, as its config allows them.

use std::sync::Arc;

use async_trait::async_trait;
use vmkit_core::{
    CpuFailure, CpuHotplugger, CpuInfo, CpuTopology, DimmInfo, Error, InstanceConfig,
    MemoryHotplug, MemoryHotplugger, MemoryInfo, VcpuResize, VmState,
};

use super::{Op, Vm, lock};

/// Memory hot-plug granularity, in MiB (the guest's memory block size on x86).
pub const MEMORY_BLOCK_MIB: u64 = 128;

/// The fake VM's vCPU and memory accounts.
#[derive(Debug)]
pub(crate) struct Resources {
    boot_vcpus: u32,
    max_vcpus: u32,
    /// vCPUs present: boot ones first, then the hot-plugged.
    vcpus: u32,
    memory_mib: u64,
    max_memory_mib: u64,
    slots: u32,
    virtio_mem: bool,
    dimms: Vec<DimmInfo>,
    next_dimm: u32,
}

impl Resources {
    pub(crate) fn of(config: &InstanceConfig) -> Resources {
        let r = &config.resources;
        Resources {
            boot_vcpus: r.boot_vcpus,
            max_vcpus: r.max_vcpus,
            vcpus: r.boot_vcpus,
            memory_mib: r.memory_mib,
            max_memory_mib: r.max_memory_mib.unwrap_or(r.memory_mib),
            slots: r.memory_slots,
            virtio_mem: r.memory_hotplug == MemoryHotplug::VirtioMem,
            dimms: Vec::new(),
            next_dimm: 0,
        }
    }

    pub(crate) fn cpu_hotplug(&self) -> bool {
        self.max_vcpus > self.boot_vcpus
    }

    pub(crate) fn memory_hotplug(&self) -> bool {
        self.max_memory_mib > self.memory_mib && (self.slots > 0 || self.virtio_mem)
    }

    fn plugged_mib(&self) -> u64 {
        self.dimms.iter().map(|d| d.size_mib).sum()
    }

    fn cpu(&self, index: u32) -> CpuInfo {
        CpuInfo {
            index,
            topology: CpuTopology {
                socket: 0,
                core: index,
                thread: 0,
            },
            device_id: (index >= self.boot_vcpus).then(|| format!("cpu{index}")),
            online: Some(true),
        }
    }
}

/// The fake VM's [`CpuHotplugger`].
pub(crate) struct FakeCpus {
    vm: Arc<Vm>,
}

impl FakeCpus {
    pub(crate) fn new(vm: Arc<Vm>) -> FakeCpus {
        FakeCpus { vm }
    }

    async fn add(&self) -> vmkit_core::Result<CpuInfo> {
        let vm = &self.vm;
        vm.life.require("hotplug_cpu", &[VmState::Running])?;
        {
            let res = lock(&vm.resources);
            if res.vcpus >= res.max_vcpus {
                return Err(Error::exhausted(
                    "hotplug_cpu",
                    "vCPU slot",
                    format!("all {} vCPU slots are in use", res.max_vcpus),
                ));
            }
        }
        vm.fault(Op::HotplugCpu, vm.config.timeouts.command).await?;
        vm.life.require("hotplug_cpu", &[VmState::Running])?;
        let mut res = lock(&vm.resources);
        let index = res.vcpus;
        res.vcpus += 1;
        Ok(res.cpu(index))
    }

    async fn remove(&self, index: u32) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        let op = format!("unplug_cpu {index}");
        vm.life.require("unplug_cpu", &[VmState::Running])?;
        {
            let res = lock(&vm.resources);
            if index < res.boot_vcpus || index >= res.vcpus {
                return Err(if index >= res.vcpus {
                    Error::not_found(op, format!("no vCPU {index} ({} present)", res.vcpus))
                } else {
                    Error::bad_argument(op, "index", "a boot vCPU: boot vCPUs stay")
                });
            }
            if index + 1 != res.vcpus {
                return Err(Error::bad_argument(
                    op,
                    "index",
                    format!("unplug the last vCPU first (cpu{})", res.vcpus - 1),
                ));
            }
        }
        vm.fault(Op::UnplugCpu, vm.config.timeouts.command).await?;
        lock(&vm.resources).vcpus -= 1;
        Ok(())
    }
}

#[async_trait]
impl CpuHotplugger for FakeCpus {
    async fn query_cpus(&self) -> vmkit_core::Result<Vec<CpuInfo>> {
        self.vm
            .life
            .require("query_cpus", &[VmState::Running, VmState::Paused])?;
        let res = lock(&self.vm.resources);
        Ok((0..res.vcpus).map(|i| res.cpu(i)).collect())
    }

    async fn hotplug_cpu(&self) -> vmkit_core::Result<CpuInfo> {
        self.add().await
    }

    async fn hotplug_cpu_at(&self, at: CpuTopology) -> vmkit_core::Result<CpuInfo> {
        let op = format!(
            "hotplug_cpu_at socket={} core={} thread={}",
            at.socket, at.core, at.thread
        );
        self.vm.life.require("hotplug_cpu", &[VmState::Running])?;
        let (vcpus, max) = {
            let res = lock(&self.vm.resources);
            (res.vcpus, res.max_vcpus)
        };
        // The fake's slots are cores 0..max_vcpus of socket 0, filled in order.
        if at.socket != 0 || at.thread != 0 || at.core >= max {
            return Err(Error::not_found(
                op,
                format!("no such vCPU slot (socket 0, cores 0..{max}, thread 0)"),
            ));
        }
        if at.core < vcpus {
            return Err(Error::bad_argument(
                op,
                "at",
                "the slot holds a vCPU already",
            ));
        }
        if at.core != vcpus {
            return Err(Error::bad_argument(
                op,
                "at",
                format!("the fake backend fills slots in order; the next is core {vcpus}"),
            ));
        }
        self.add().await
    }

    async fn unplug_cpu(&self, index: u32) -> vmkit_core::Result<()> {
        self.remove(index).await
    }

    async fn set_vcpus(&self, count: u32) -> vmkit_core::Result<VcpuResize> {
        let vm = &self.vm;
        vm.life.require("set_vcpus", &[VmState::Running])?;
        let (before, boot, max) = {
            let res = lock(&vm.resources);
            (res.vcpus, res.boot_vcpus, res.max_vcpus)
        };
        if count < boot || count > max {
            return Err(Error::bad_argument(
                format!("set_vcpus {count}"),
                "count",
                format!("expected {boot} (the boot vCPUs) to {max} (max_vcpus)"),
            ));
        }
        let mut failures = Vec::new();
        let mut now = before;
        while now < count {
            match self.add().await {
                Ok(_) => now += 1,
                Err(error) => {
                    failures.push(CpuFailure { index: now, error });
                    break;
                }
            }
        }
        while now > count {
            match self.remove(now - 1).await {
                Ok(()) => now -= 1,
                Err(error) => {
                    failures.push(CpuFailure {
                        index: now - 1,
                        error,
                    });
                    break;
                }
            }
        }
        Ok(VcpuResize {
            requested: count,
            before,
            achieved: now,
            failures,
        })
    }
}

/// The fake VM's [`MemoryHotplugger`].
pub(crate) struct FakeMemory {
    vm: Arc<Vm>,
}

impl FakeMemory {
    pub(crate) fn new(vm: Arc<Vm>) -> FakeMemory {
        FakeMemory { vm }
    }
}

#[async_trait]
impl MemoryHotplugger for FakeMemory {
    async fn query_memory(&self) -> vmkit_core::Result<MemoryInfo> {
        self.vm
            .life
            .require("query_memory", &[VmState::Running, VmState::Paused])?;
        let res = lock(&self.vm.resources);
        Ok(MemoryInfo {
            base_mib: res.memory_mib,
            plugged_mib: res.plugged_mib(),
            max_mib: res.max_memory_mib,
            dimms: res.dimms.clone(),
            guest_total_mib: Some(res.memory_mib + res.plugged_mib()),
        })
    }

    async fn hotplug_memory(&self, size_mib: u64) -> vmkit_core::Result<String> {
        let vm = &self.vm;
        let op = format!("hotplug_memory {size_mib} MiB");
        vm.life.require("hotplug_memory", &[VmState::Running])?;
        {
            let res = lock(&vm.resources);
            if size_mib == 0 || !size_mib.is_multiple_of(MEMORY_BLOCK_MIB) {
                return Err(Error::bad_argument(
                    op,
                    "size_mib",
                    format!(
                        "not a multiple of the guest's memory block size ({MEMORY_BLOCK_MIB} MiB)"
                    ),
                ));
            }
            let total = res.memory_mib + res.plugged_mib() + size_mib;
            if total > res.max_memory_mib {
                return Err(Error::exhausted(
                    op,
                    "memory",
                    format!(
                        "{} MiB boot + {} MiB plugged + {size_mib} MiB exceeds max_memory_mib {}",
                        res.memory_mib,
                        res.plugged_mib(),
                        res.max_memory_mib
                    ),
                ));
            }
            if !res.virtio_mem && res.dimms.len() >= res.slots as usize {
                return Err(Error::exhausted(
                    op,
                    "DIMM slot",
                    format!("all {} memory slots are in use", res.slots),
                ));
            }
        }
        vm.fault(Op::HotplugMemory, vm.config.timeouts.command)
            .await?;
        vm.life.require("hotplug_memory", &[VmState::Running])?;
        let mut res = lock(&vm.resources);
        let id = format!("fake-mem{}", res.next_dimm);
        res.next_dimm += 1;
        let slot = (!res.virtio_mem).then(|| u32::try_from(res.dimms.len()).unwrap_or(u32::MAX));
        res.dimms.push(DimmInfo {
            id: id.clone(),
            size_mib,
            slot,
            address: None,
        });
        Ok(id)
    }

    async fn unplug_memory(&self, id: &str) -> vmkit_core::Result<()> {
        let vm = &self.vm;
        vm.life.require("unplug_memory", &[VmState::Running])?;
        if !lock(&vm.resources).dimms.iter().any(|d| d.id == id) {
            return Err(Error::not_found(
                format!("unplug_memory {id}"),
                "no hot-plugged memory with that id",
            ));
        }
        vm.fault(Op::UnplugMemory, vm.config.timeouts.command)
            .await?;
        lock(&vm.resources).dimms.retain(|d| d.id != id);
        Ok(())
    }
}
