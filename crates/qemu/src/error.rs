//! The QEMU backend's error type. Each message names what was being done and why it
//! failed; the core wraps it in `vmkit_core::Error::Backend` with the operation.

use std::path::PathBuf;

/// What went wrong in the QEMU backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The QEMU binary could not be started.
    #[error("spawn {}: {source}", binary.display())]
    Spawn {
        /// The binary that was run.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// QEMU exited before the VM was running.
    #[error("QEMU exited during start ({status}){}", stderr_suffix(.stderr))]
    ExitedEarly {
        /// How it exited (`exit code 1`, `signal 9`).
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },

    /// The guest kernel panicked before the VM was running (vmkit runs QEMU with
    /// `-no-reboot` and the guest with `panic=-1`, so QEMU then exits).
    #[error(
        "the guest kernel panicked during start (QEMU {status}); the console's last lines:\n{console}"
    )]
    GuestPanickedAtStart {
        /// How QEMU exited.
        status: String,
        /// The console lines up to and including the panic.
        console: String,
    },

    /// The guest reset itself before the VM was running (a triple fault or a reboot;
    /// QEMU exits on it under `-no-reboot`).
    #[error("the guest reset during start (QEMU {status}); the console's last lines:\n{console}")]
    GuestResetAtStart {
        /// How QEMU exited.
        status: String,
        /// The console's last lines.
        console: String,
    },

    /// A QMP command or the QMP connection failed.
    #[error(transparent)]
    Qmp(#[from] vmkit_qmp::Error),

    /// QEMU answered a query with something this backend cannot read.
    #[error("read the answer to {command}: {reason}")]
    QmpAnswer {
        /// The QMP command.
        command: String,
        /// What did not fit.
        reason: String,
    },

    /// QEMU does not list what it was just told to make, or what vmkit made at boot.
    #[error("QEMU does not list {what}")]
    NotListed {
        /// What is missing.
        what: String,
    },

    /// A host file or directory operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done (`"create state dir /run/vm"`).
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A backend option (`backend_options` key) is wrong.
    #[error("backend option {key}: {reason}")]
    Option {
        /// The key.
        key: String,
        /// Why it is refused.
        reason: String,
    },

    /// The accelerator asked for cannot be used on this host.
    #[error("accelerator {accel}: {reason}")]
    Accel {
        /// The accelerator's name.
        accel: String,
        /// Why it is unusable.
        reason: String,
    },

    /// Talking to the guest over vsock failed.
    #[error(transparent)]
    Vsock(#[from] vmkit_vsock::Error),

    /// The vhost-device-vsock daemon (hybrid vsock) cannot be run.
    #[error(
        "hybrid vsock needs vhost-device-vsock: {} cannot be run ({source}); install it with \
         `cargo install --locked vhost-device-vsock`, name it with the backend option \
         vhost_vsock_binary, or set transport none", binary.display()
    )]
    VsockDaemonMissing {
        /// The binary that was tried.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The vhost-device-vsock daemon exited before QEMU could use it.
    #[error("vhost-device-vsock exited during start ({status}){}", stderr_suffix(.stderr))]
    VsockDaemonExited {
        /// How it exited.
        status: String,
        /// The last lines of its output.
        stderr: String,
    },

    /// A share's virtiofsd could not be started.
    #[error("virtiofsd for share {share} ({}): {source}", binary.display())]
    ShareDaemonSpawn {
        /// The share's id.
        share: String,
        /// The binary that was tried.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A share's virtiofsd exited before QEMU could use it.
    #[error("virtiofsd for share {share} exited before it was ready ({status}){}", stderr_suffix(.log))]
    ShareDaemonExited {
        /// The share's id.
        share: String,
        /// How it exited.
        status: String,
        /// The last lines of its output.
        log: String,
    },

    /// The guest link was found dead after a resume: the agent did not answer on a
    /// fresh connection. With hybrid vsock this is vhost-device-vsock 0.3 having ended
    /// its worker (anything reaching it while the VM was paused does that).
    #[error(
        "the guest link is broken: {cause}; vmkit cannot reach the agent of this VM any more \
         (with hybrid vsock: vhost-device-vsock stopped serving it, which it does when a \
         connection reaches it while the VM is paused); restart the VM"
    )]
    GuestLinkBroken {
        /// What the check after the resume saw.
        cause: String,
    },

    /// Replacing a hybrid-vsock device whose daemon stopped serving failed at `step`.
    #[error("replace the vsock device: {step}: {cause}")]
    Relink {
        /// What was being done (`device_del`, `spawn vhost-device-vsock`, …).
        step: &'static str,
        /// Why it failed.
        cause: String,
    },

    /// The CID asked for is held by another VM.
    #[error("guest CID {cid} is in use by another VM on this host")]
    CidInUse {
        /// The CID.
        cid: u32,
    },

    /// The guest agent answered the dial but not the call.
    #[error("the guest agent did not answer {call}: {cause}")]
    Agent {
        /// The call (`Ping`).
        call: &'static str,
        /// What happened.
        cause: String,
    },

    /// A call (a hot-plug, a pause or resume) was refused or ended because the VM began
    /// shutting down.
    #[error("the VM is shutting down")]
    ShuttingDown,

    /// The guest refused to eject a device (its ACPI `_OST` answer to the eject request).
    #[error("the guest refused to eject it: ACPI _OST status {status:#04x} ({meaning})")]
    GuestRefusedEject {
        /// The `_OST` status code.
        status: u64,
        /// What the ACPI specification says the code means.
        meaning: &'static str,
    },

    /// QEMU accepted a run-state change but reports another state.
    #[error("QEMU accepted the command but reports the VM {reported}, not {asked}")]
    RunState {
        /// The state asked for.
        asked: vmkit_core::VmState,
        /// The state QEMU reports.
        reported: vmkit_core::VmState,
    },

    /// `start` was cancelled by a concurrent `shutdown`.
    #[error("cancelled by shutdown")]
    Cancelled,

    /// QEMU did not exit after the last shutdown stage (SIGKILL).
    #[error("QEMU (pid {pid}) still running {waited:?} after SIGKILL")]
    Unkillable {
        /// Its pid.
        pid: u32,
        /// How long we waited.
        waited: std::time::Duration,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        ": no output on stderr".to_owned()
    } else {
        format!(": {}", stderr.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_exit_quotes_stderr() {
        let err = Error::ExitedEarly {
            status: "exit code 1".into(),
            stderr: "qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\n"
                .into(),
        };
        assert_eq!(
            err.to_string(),
            "QEMU exited during start (exit code 1): qemu-system-x86_64: -device foo: 'foo' is not a valid device model name"
        );
        let silent = Error::ExitedEarly {
            status: "signal 9".into(),
            stderr: String::new(),
        };
        assert_eq!(
            silent.to_string(),
            "QEMU exited during start (signal 9): no output on stderr"
        );
    }
}
