//! The core's hot-plug traits for a QEMU VM: [`Cpus`] ([`CpuHotplugger`]) and
//! [`Memory`] ([`MemoryHotplugger`]). Each call checks the state, builds the
//! operation's [`Context`] from the VM and runs the operation of [`crate::hotplug`] on
//! the VM's queue. Both hold the VM weakly: a dropped instance counts as shut down.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use vmkit_core::{
    CpuHotplugger, CpuInfo, CpuTopology, Error as CoreError, MemoryHotplugger, MemoryInfo,
    VcpuResize, VmState,
};

use crate::hotplug::{Context, cpu, memory};
use crate::vm::Vm;

/// The VM behind a hot-plugger, in one of `allowed`, and the context for `op`.
fn context(
    vm: &Weak<Vm>,
    op: &'static str,
    allowed: &[VmState],
) -> vmkit_core::Result<(Arc<Vm>, Context)> {
    let vm = vm.upgrade().ok_or(CoreError::InvalidState {
        op,
        state: VmState::Shutdown,
    })?;
    let ctx = vm.hotplug_context(op, allowed)?;
    Ok((vm, ctx))
}

const LIVE: &[VmState] = &[VmState::Running, VmState::Paused];
const RUNNING: &[VmState] = &[VmState::Running];

/// vCPU hot-plug for one VM.
pub(crate) struct Cpus {
    vm: Weak<Vm>,
}

impl Cpus {
    pub(crate) fn new(vm: &Arc<Vm>) -> Self {
        Cpus {
            vm: Arc::downgrade(vm),
        }
    }
}

#[async_trait]
impl CpuHotplugger for Cpus {
    async fn query_cpus(&self) -> vmkit_core::Result<Vec<CpuInfo>> {
        let (vm, ctx) = context(&self.vm, "query_cpus", LIVE)?;
        vm.run_hotplug("query_cpus".into(), async move { cpu::query(&ctx).await })
            .await
    }

    async fn hotplug_cpu(&self) -> vmkit_core::Result<CpuInfo> {
        let (vm, ctx) = context(&self.vm, "hotplug_cpu", RUNNING)?;
        vm.run_hotplug(
            "hotplug_cpu".into(),
            async move { cpu::add(&ctx, None).await },
        )
        .await
    }

    async fn hotplug_cpu_at(&self, at: CpuTopology) -> vmkit_core::Result<CpuInfo> {
        let (vm, ctx) = context(&self.vm, "hotplug_cpu", RUNNING)?;
        let op = format!(
            "hotplug_cpu_at socket={} core={} thread={}",
            at.socket, at.core, at.thread
        );
        vm.run_hotplug(op, async move { cpu::add(&ctx, Some(at)).await })
            .await
    }

    async fn unplug_cpu(&self, index: u32) -> vmkit_core::Result<()> {
        let (vm, ctx) = context(&self.vm, "unplug_cpu", RUNNING)?;
        vm.run_hotplug(format!("unplug_cpu {index}"), async move {
            cpu::remove(&ctx, index).await
        })
        .await
    }

    async fn set_vcpus(&self, count: u32) -> vmkit_core::Result<VcpuResize> {
        let (vm, ctx) = context(&self.vm, "set_vcpus", RUNNING)?;
        let max = vm.config().resources.max_vcpus;
        if count == 0 || count > max {
            return Err(CoreError::bad_argument(
                format!("set_vcpus {count}"),
                "count",
                format!("must be within 1..={max} (max_vcpus)"),
            ));
        }
        vm.run_hotplug(format!("set_vcpus {count}"), async move {
            cpu::resize(&ctx, count).await
        })
        .await
    }
}

/// Memory hot-plug for one VM.
pub(crate) struct Memory {
    vm: Weak<Vm>,
}

impl Memory {
    pub(crate) fn new(vm: &Arc<Vm>) -> Self {
        Memory {
            vm: Arc::downgrade(vm),
        }
    }

    /// [`MemoryHotplugger::hotplug_memory`] with the DIMM slot chosen by the caller
    /// (`None`: QEMU picks). QEMU's refusal of a slot comes back in the error, and the
    /// backend object made for it is removed again.
    pub(crate) async fn hotplug_at(
        &self,
        size_mib: u64,
        slot: Option<u32>,
    ) -> vmkit_core::Result<String> {
        let (vm, ctx) = context(&self.vm, "hotplug_memory", RUNNING)?;
        vm.run_hotplug(format!("hotplug_memory {size_mib} MiB"), async move {
            memory::add(&ctx, size_mib, slot).await
        })
        .await
    }
}

#[async_trait]
impl MemoryHotplugger for Memory {
    async fn query_memory(&self) -> vmkit_core::Result<MemoryInfo> {
        let (vm, ctx) = context(&self.vm, "query_memory", LIVE)?;
        vm.run_hotplug(
            "query_memory".into(),
            async move { memory::query(&ctx).await },
        )
        .await
    }

    async fn hotplug_memory(&self, size_mib: u64) -> vmkit_core::Result<String> {
        self.hotplug_at(size_mib, None).await
    }

    async fn unplug_memory(&self, id: &str) -> vmkit_core::Result<()> {
        let (vm, ctx) = context(&self.vm, "unplug_memory", RUNNING)?;
        let id = id.to_owned();
        vm.run_hotplug(format!("unplug_memory {id}"), async move {
            memory::remove(&ctx, &id).await
        })
        .await
    }
}
