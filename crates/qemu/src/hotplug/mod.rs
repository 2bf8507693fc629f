//! Hot-plug: each operation — vCPU ([`cpu`]), memory as DIMMs or through virtio-mem
//! ([`memory`]), disks and NICs on reserved root ports ([`pci`]), and the unplug of
//! each — runs on a narrow [`Context`] (typed QMP, the agent, the VM's limits and
//! deadline, its events and hot-plug state), one after another on the VM's
//! queue (`queue.rs`). Nothing here knows the VM itself, so every operation can be tested
//! against `MockQmpServer` and the agent's host test mode, without a VM.

pub(crate) mod context;
pub(crate) mod cpu;
mod dimm;
mod eject;
pub(crate) mod memory;
pub(crate) mod pci;
mod queue;
mod state;
mod virtio_mem;

#[cfg(test)]
mod tests;

pub(crate) use context::{AgentSource, Context, Limits};
pub(crate) use state::Hotplug;
