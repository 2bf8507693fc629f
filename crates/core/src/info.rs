//! What an instance reports about itself: [`VmInfo`], [`Capabilities`], [`VmEvent`],
//! [`ExitInfo`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::state::VmState;

bitflags::bitflags! {
    /// What a backend (or one instance of it) can do. Callers check a bit before they
    /// rely on a feature instead of finding out from a failure.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
    pub struct Capabilities: u32 {
        /// vCPUs can be added (and maybe removed) while running.
        const CPU_HOTPLUG = 1 << 0;
        /// Memory can be added (and maybe removed) while running.
        const MEMORY_HOTPLUG = 1 << 1;
        /// Disks can be attached and detached while running.
        const DISK_HOTPLUG = 1 << 2;
        /// NICs can be attached and detached while running.
        const NIC_HOTPLUG = 1 << 3;
        /// Kernel vsock to the guest.
        const VSOCK = 1 << 4;
        /// Hybrid vsock (a Unix socket speaking `CONNECT <port>`) to the guest.
        const HYBRID_VSOCK = 1 << 5;
        /// `pause` / `resume`.
        const PAUSE = 1 << 6;
        /// A TTRPC guest agent is dialled and `start` waits for it.
        const GUEST_AGENT = 1 << 7;
        /// Raw byte streams to the guest (`start_stream`).
        const GUEST_STREAMS = 1 << 8;
        /// Host directories can be shared with the guest (`DeviceSpec::Share`): before
        /// start always; after start where the share's transport allows (virtio-fs;
        /// a virtio-9p share is cold only and its hot-plug is `Unsupported`).
        const FS_SHARE = 1 << 9;
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        bitflags::parser::to_writer(self, f)
    }
}

/// A snapshot of an instance's identity and runtime details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The config's id.
    pub id: String,
    /// The backend's name.
    pub backend: String,
    /// The state when the snapshot was taken.
    pub state: VmState,
    /// The VMM process's pid, while it runs.
    pub pid: Option<u32>,
    /// The guest's vsock CID, once assigned.
    pub cid: Option<u32>,
    /// The sockets the instance serves or uses, by role (`"control"`, `"vsock"`).
    pub sockets: Vec<(String, PathBuf)>,
    /// Where the guest's agent listens (its TTRPC port), while the VM lives and has one:
    /// what a host-side adapter (a backend loaded as a plugin) dials with vmkit-vsock.
    pub guest: Option<crate::GuestAddr>,
    /// What this instance can do (may be narrower than the backend's list, e.g. without
    /// memory slots there is no memory hotplug).
    pub capabilities: Capabilities,
}

/// The stage of a staged shutdown that made the VMM exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownStage {
    /// The guest agent powered the guest off.
    GuestPowerOff,
    /// ACPI power button (`system_powerdown` in QEMU); the guest shut itself down.
    AcpiPowerdown,
    /// The VMM's own quit command.
    Quit,
    /// SIGTERM to the VMM process.
    Terminate,
    /// SIGKILL to the VMM process.
    Kill,
}

/// Why the VM is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest shut down by itself or in answer to a graceful request.
    GuestShutdown,
    /// The guest kernel panicked.
    GuestPanic,
    /// The host stopped it (`shutdown`, quit, a signal sent by vmkit).
    HostShutdown,
    /// The VMM process died without being asked.
    Crashed,
    /// `start` failed; the message says why.
    StartFailed,
    /// Shut down before it was ever started.
    NeverStarted,
}

/// How a VM ended. Returned by `shutdown` and `wait`; every waiter gets the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Why it ended.
    pub reason: ExitReason,
    /// Which shutdown stage ended it; `None` when it ended on its own.
    pub stage: Option<ShutdownStage>,
    /// The VMM process's exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that killed the VMM process, if one did.
    pub signal: Option<i32>,
    /// Details: the error of a failed start, the last lines of a crashed VMM's stderr.
    pub message: Option<String>,
}

impl ExitInfo {
    /// An exit for `reason` and nothing else known; the `with_` methods add the rest
    /// (`ExitInfo::new(ExitReason::StartFailed).with_message("no kernel")`).
    pub fn new(reason: ExitReason) -> Self {
        ExitInfo {
            reason,
            stage: None,
            exit_code: None,
            signal: None,
            message: None,
        }
    }

    /// An instance shut down before it was started.
    pub fn never_started() -> Self {
        ExitInfo::new(ExitReason::NeverStarted)
    }

    /// The same, ended by `stage`.
    #[must_use]
    pub fn with_stage(mut self, stage: ShutdownStage) -> Self {
        self.stage = Some(stage);
        self
    }

    /// The same, with the VMM's exit code.
    #[must_use]
    pub fn with_exit_code(mut self, code: i32) -> Self {
        self.exit_code = Some(code);
        self
    }

    /// The same, with `message`.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// A disk operation, in [`VmEvent::BlockIoError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockOperation {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// What the VMM did about a disk error, in [`VmEvent::BlockIoError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockErrorAction {
    /// Nothing: the error was only reported here.
    Ignore,
    /// The error was passed to the guest.
    Report,
    /// The VM was paused (a `Stopped` event follows); `resume` retries the operation.
    Stop,
}

/// Something that happened to a VM, published on [`crate::Instance::events`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VmEvent {
    /// The state changed.
    StateChanged {
        /// The state before.
        from: VmState,
        /// The state after.
        to: VmState,
    },
    /// The guest was asked to power down (ACPI power button).
    Powerdown,
    /// The VMM reports a shutdown; `guest` is true when the guest initiated it.
    ShutdownRequested {
        /// Initiated by the guest.
        guest: bool,
        /// The VMM's reason string (`"guest-shutdown"`, `"host-signal"`, …).
        reason: String,
    },
    /// The guest reset.
    Reset {
        /// Initiated by the guest.
        guest: bool,
    },
    /// The vCPUs stopped.
    Stopped,
    /// The vCPUs resumed.
    Resumed,
    /// A device finished unplugging.
    DeviceDeleted {
        /// The device id, when it had one.
        id: Option<String>,
        /// The VMM's path for it.
        path: String,
    },
    /// A device stopped working while the VM runs: the daemon serving it (a share's
    /// virtiofsd) died. The VM and its other devices go on; the device stays listed
    /// until unplugged.
    DeviceFailed {
        /// The device's id.
        id: String,
        /// What happened, for people (`"virtiofsd (pid 4242) exited: killed by signal 9"`).
        reason: String,
    },
    /// The guest kernel panicked.
    GuestPanicked,
    /// A step of `start` finished (`"spawned"`, `"qmp connected"`, `"guest ready"`), with
    /// the time since `start` was called: boot latency, observable.
    StartProgress {
        /// What was reached, with details (`"spawned QEMU (pid 4242)"`).
        step: String,
        /// Milliseconds since `start` was called.
        elapsed_ms: u64,
    },
    /// A disk's I/O failed in the VMM (the host file: out of space, gone, unreadable).
    BlockIoError {
        /// The VMM's name for the disk's block node (vmkit-qemu: `vmkit-disk<N>` for the
        /// N-th cold disk, `vmkit-hot<N>` for a hot-plugged one).
        node: Option<String>,
        /// The VMM's device name (often empty with `-blockdev`).
        device: String,
        /// The failed operation.
        operation: BlockOperation,
        /// What the VMM did about it.
        action: BlockErrorAction,
        /// The error was running out of space on the host.
        nospace: bool,
        /// The host's words, for people (not to be parsed).
        reason: String,
    },
    /// The VMM process is gone.
    Exited(ExitInfo),
    /// A VMM event vmkit has no variant for, as raw JSON.
    Other {
        /// The event's name.
        name: String,
        /// Its data.
        data: serde_json::Value,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_print_by_name_and_serialise() {
        let caps = Capabilities::CPU_HOTPLUG | Capabilities::PAUSE;
        assert_eq!(caps.to_string(), "CPU_HOTPLUG | PAUSE");
        let json = serde_json::to_string(&caps).unwrap();
        assert_eq!(json, "\"CPU_HOTPLUG | PAUSE\"");
        assert_eq!(serde_json::from_str::<Capabilities>(&json).unwrap(), caps);
        assert!(!caps.contains(Capabilities::MEMORY_HOTPLUG));
    }

    #[test]
    fn events_serialise_with_snake_case_tags() {
        let ev = VmEvent::StateChanged {
            from: VmState::Running,
            to: VmState::Paused,
        };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"state_changed":{"from":"running","to":"paused"}}"#
        );
    }
}
