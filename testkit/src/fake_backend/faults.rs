//! The faults a [`super::FakeInstance`] injects, per operation.

use std::collections::HashMap;
use std::time::Duration;

/// An operation of the fake VM that a fault can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `start`.
    Start,
    /// `shutdown`.
    Shutdown,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `hotplug_cpu` (and each vCPU `set_vcpus` adds).
    HotplugCpu,
    /// `unplug_cpu` (and each vCPU `set_vcpus` removes).
    UnplugCpu,
    /// `hotplug_memory`.
    HotplugMemory,
    /// `unplug_memory`.
    UnplugMemory,
    /// `hotplug_disk`.
    HotplugDisk,
    /// `hotplug_nic`.
    HotplugNic,
    /// `unplug` (a disk or NIC).
    Unplug,
}

impl Op {
    /// The operation's name, as errors give it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Shutdown => "shutdown",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::HotplugCpu => "hotplug_cpu",
            Op::UnplugCpu => "unplug_cpu",
            Op::HotplugMemory => "hotplug_memory",
            Op::UnplugMemory => "unplug_memory",
            Op::HotplugDisk => "hotplug_disk",
            Op::HotplugNic => "hotplug_nic",
            Op::Unplug => "unplug",
        }
    }
}

/// What an operation does instead of, or before, its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Waits this long, then does its work (a slow VMM).
    Delay(Duration),
    /// Fails with this message (`Error::Backend`), changing nothing (a refusing VMM).
    Error(String),
    /// Never answers: the operation's own deadline ends it with `Error::Timeout`
    /// (`timeouts.start` for `start`, `timeouts.command` otherwise), as a hung VMM's.
    Hang,
    /// The VM dies right there: it ends with [`vmkit_core::ExitReason::Crashed`] and the
    /// operation fails.
    Crash,
}

/// The faults of one fake VM; each stays until cleared.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    per_op: HashMap<Op, Fault>,
    /// The guest agent never answers (the VM still runs).
    pub(crate) agent_silent: bool,
}

impl Faults {
    pub(crate) fn set(&mut self, op: Op, fault: Option<Fault>) {
        match fault {
            Some(fault) => {
                self.per_op.insert(op, fault);
            }
            None => {
                self.per_op.remove(&op);
            }
        }
    }

    pub(crate) fn get(&self, op: Op) -> Option<Fault> {
        self.per_op.get(&op).cloned()
    }
}
