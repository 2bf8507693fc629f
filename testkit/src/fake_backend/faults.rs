//! The faults a [`super::FakeInstance`] injects, per operation.

use std::collections::HashMap;
use std::time::Duration;

/// `Op`, its names and the list of all, from one table.
macro_rules! ops {
    ($($(#[$doc:meta])* $op:ident = $name:literal,)*) => {
        /// An operation of the fake VM that a fault can be attached to.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Op {
            $($(#[$doc])* $op,)*
        }

        impl Op {
            /// The operation's name, as errors give it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$op => $name,)*
                }
            }

            /// Every operation, for parsing.
            const ALL: &'static [Op] = &[$(Op::$op,)*];
        }
    };
}

ops! {
    /// `start`.
    Start = "start",
    /// `shutdown`.
    Shutdown = "shutdown",
    /// `pause`.
    Pause = "pause",
    /// `resume`.
    Resume = "resume",
    /// `hotplug_cpu` (and each vCPU `set_vcpus` adds).
    HotplugCpu = "hotplug_cpu",
    /// `unplug_cpu` (and each vCPU `set_vcpus` removes).
    UnplugCpu = "unplug_cpu",
    /// `hotplug_memory`.
    HotplugMemory = "hotplug_memory",
    /// `unplug_memory`.
    UnplugMemory = "unplug_memory",
    /// `hotplug_disk`.
    HotplugDisk = "hotplug_disk",
    /// `hotplug_nic`.
    HotplugNic = "hotplug_nic",
    /// `hotplug_device` of a share.
    HotplugShare = "hotplug_share",
    /// `unplug` (a disk or NIC).
    Unplug = "unplug",
    /// `state()` (synchronous: a fault there blocks the caller's thread).
    State = "state",
    /// `vm_info()` (synchronous, as `State`).
    VmInfo = "vm_info",
}

impl Op {
    /// The hot-plug operation of `spec`'s kind.
    pub fn of(spec: &vmkit_core::DeviceSpec) -> Op {
        match spec {
            vmkit_core::DeviceSpec::Nic(_) => Op::HotplugNic,
            vmkit_core::DeviceSpec::Share(_) => Op::HotplugShare,
            // A disk, and any kind added later, counts as a disk.
            _ => Op::HotplugDisk,
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
    /// Never answers, whatever its deadline — a broken backend, for testing what calls
    /// it across a boundary (the plugin host's own deadlines). In a synchronous call it
    /// blocks the thread.
    Wedge,
    /// Blocks its thread for good inside an async call — the bug a plugin must never
    /// have, for testing that a wedged plugin runtime is detected.
    Block,
    /// Panics inside the call (a backend bug), for testing that a boundary catches it.
    Panic,
}

impl Fault {
    /// A fault by name: `delay:<ms>`, `error:<message>`, `hang`, `crash`, `wedge`,
    /// `block`, `panic`.
    ///
    /// # Errors
    /// `Error::InvalidConfig` (field `backend_options.faults`) naming what is wrong.
    pub fn parse(text: &str) -> vmkit_core::Result<Fault> {
        let bad = |why: String| vmkit_core::Error::config("backend_options.faults", why);
        Ok(match text.split_once(':') {
            Some(("delay", ms)) => Fault::Delay(Duration::from_millis(
                ms.parse()
                    .map_err(|_| bad(format!("{text:?}: delay:<milliseconds>")))?,
            )),
            Some(("error", message)) => Fault::Error(message.to_owned()),
            None if text == "hang" => Fault::Hang,
            None if text == "crash" => Fault::Crash,
            None if text == "wedge" => Fault::Wedge,
            None if text == "block" => Fault::Block,
            None if text == "panic" => Fault::Panic,
            _ => {
                return Err(bad(format!(
                    "{text:?}: a fault is delay:<ms>, error:<message>, hang, crash, wedge, block or panic"
                )));
            }
        })
    }
}

/// The faults of one fake VM; each stays until cleared.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    per_op: HashMap<Op, Fault>,
    /// The guest agent never answers (the VM still runs).
    pub(crate) agent_silent: bool,
}

impl Faults {
    /// Faults from `op=fault` pairs separated by commas (`start=wedge,vm_info=block`).
    pub(crate) fn parse(text: &str) -> vmkit_core::Result<Faults> {
        let mut faults = Faults::default();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let Some((name, fault)) = pair.split_once('=') else {
                return Err(vmkit_core::Error::config(
                    "backend_options.faults",
                    format!("{pair:?}: expected op=fault"),
                ));
            };
            let Some(op) = Op::ALL.iter().copied().find(|op| op.name() == name) else {
                return Err(vmkit_core::Error::config(
                    "backend_options.faults",
                    format!("{name:?} is no operation of the fake VM"),
                ));
            };
            faults.set(op, Some(Fault::parse(fault)?));
        }
        Ok(faults)
    }

    pub(crate) fn set(&mut self, op: Op, fault: Option<Fault>) {
        let _ = match fault {
            Some(fault) => self.per_op.insert(op, fault),
            None => self.per_op.remove(&op),
        };
    }

    pub(crate) fn get(&self, op: Op) -> Option<Fault> {
        self.per_op.get(&op).cloned()
    }
}
