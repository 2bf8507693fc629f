//! The crate's one error type. Every message names the operation and the cause.

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use crate::state::VmState;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a vmkit operation. Backends wrap their own typed errors in
/// [`Error::Backend`], keeping the operation's context in `op`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `op` is not allowed in the VM's current `state` (see [`VmState::can_transition_to`]).
    #[error("{op}: not allowed while the VM is {state}")]
    InvalidState {
        /// The operation that was refused (`"start"`, `"pause"`, `"add_device"`, …).
        op: &'static str,
        /// The state the VM was found in.
        state: VmState,
    },

    /// A configuration value is wrong. `field` is its path, e.g. `resources.boot_vcpus`
    /// or `disks[1].path`.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig {
        /// Path of the offending field inside [`crate::InstanceConfig`] (or the device).
        field: String,
        /// Why the value is refused.
        reason: String,
    },

    /// An argument of a call (not the config) is wrong: a count out of range, a size
    /// that is not a multiple of the block size, an id already taken.
    #[error("{op}: bad argument {arg}: {reason}")]
    BadArgument {
        /// The call, with its arguments (`"set_vcpus 9"`).
        op: String,
        /// The argument (`"count"`, `"size_mib"`, `"id"`).
        arg: String,
        /// Why it is refused.
        reason: String,
    },

    /// What a call names does not exist: no device with that id, no such vCPU.
    #[error("{op}: not found: {what}")]
    NotFound {
        /// The call, with its arguments (`"unplug_memory vmkit-mem7"`).
        op: String,
        /// What was looked for, and what there is.
        what: String,
    },

    /// A resource the call needs is used up: every vCPU slot, DIMM slot or hot-plug
    /// port is taken, or the memory ceiling is reached.
    #[error("{op}: no {resource} left: {reason}")]
    Exhausted {
        /// The call, with its arguments.
        op: String,
        /// What ran out (`"vCPU slot"`, `"DIMM slot"`, `"hot-plug port"`, `"memory"`).
        resource: String,
        /// The figures.
        reason: String,
    },

    /// The backend does not offer `op` (see [`crate::Capabilities`]).
    #[error("{op}: not supported by the {backend} backend: {reason}")]
    Unsupported {
        /// The operation asked for.
        op: String,
        /// The backend's name.
        backend: String,
        /// Why, e.g. "lands with guest communication" or "QEMU has no vhost-vsock here".
        reason: String,
    },

    /// No backend of that name is registered.
    #[error("unknown backend {name:?}; known backends: [{}]", .known.join(", "))]
    UnknownBackend {
        /// The name asked for.
        name: String,
        /// The names the registry knows, sorted.
        known: Vec<String>,
    },

    /// A backend with this name is already in the registry.
    #[error("backend {name:?} is registered twice")]
    DuplicateBackend {
        /// The name registered twice.
        name: String,
    },

    /// `op` did not finish before its deadline.
    #[error("{op}: timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        op: String,
        /// The deadline it was given.
        after: Duration,
    },

    /// `op` was called from an async context that cannot run it: a tokio runtime
    /// without the IO or time driver (build it with `enable_all()`), or no runtime.
    /// Nothing was taken or changed.
    #[error("{op}: {reason}")]
    Runtime {
        /// The operation that was refused.
        op: String,
        /// What the runtime lacks.
        reason: String,
    },

    /// A resource another owner holds: a state dir that a live instance (in this or
    /// another process) has locked.
    #[error("{op}: {resource} is in use by {holder}")]
    InUse {
        /// The operation that was refused.
        op: String,
        /// The resource, e.g. `state dir /run/vmkit/a`.
        resource: String,
        /// Who holds it, as far as known (`pid 1234 (vm "a")`).
        holder: String,
    },

    /// A path vmkit would create files in, or open, is not safe to use: owned by
    /// another user, writable by group or others, or a symbolic link.
    #[error("{op}: {} is unsafe: {reason}", path.display())]
    UnsafePath {
        /// The operation that was refused.
        op: String,
        /// The path.
        path: std::path::PathBuf,
        /// Why it is refused.
        reason: String,
    },

    /// A guest address or URL that cannot be used.
    #[error("invalid guest address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is invalid.
        reason: String,
    },

    /// An operating-system call failed during `op`.
    #[error("{op}: {source}")]
    Io {
        /// What was being done (`"create state dir /run/vmkit/a"`).
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The backend failed during `op`; `source` is the backend's own typed error.
    #[error("{op}: {source}")]
    Backend {
        /// The operation with its context (`"hotplug cpu 2"`).
        op: String,
        /// The backend's error (e.g. `vmkit_qemu::Error`).
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },
}

impl Error {
    /// Shorthand for [`Error::BadArgument`].
    pub fn bad_argument(
        op: impl Into<String>,
        arg: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadArgument {
            op: op.into(),
            arg: arg.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(op: impl Into<String>, what: impl Into<String>) -> Self {
        Error::NotFound {
            op: op.into(),
            what: what.into(),
        }
    }

    /// Shorthand for [`Error::Exhausted`].
    pub fn exhausted(
        op: impl Into<String>,
        resource: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Exhausted {
            op: op.into(),
            resource: resource.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// Wraps a backend's error, keeping the operation's context.
    pub fn backend(op: impl Into<String>, source: impl StdError + Send + Sync + 'static) -> Self {
        Error::Backend {
            op: op.into(),
            source: Box::new(source),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(
        op: impl Into<String>,
        backend: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Unsupported {
            op: op.into(),
            backend: backend.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("device_add: QMP error: Bus 'rp0' does not support hotplugging")]
    struct Cause;

    #[test]
    fn backend_error_keeps_context_and_source() {
        let err = Error::backend("hotplug disk data1", Cause);
        assert_eq!(
            err.to_string(),
            "hotplug disk data1: device_add: QMP error: Bus 'rp0' does not support hotplugging"
        );
        assert!(
            err.source()
                .is_some_and(|s| s.downcast_ref::<Cause>().is_some())
        );
    }

    #[test]
    fn unknown_backend_lists_the_known_ones() {
        let err = Error::UnknownBackend {
            name: "firecracker".into(),
            known: vec!["mock".into(), "qemu".into()],
        };
        assert_eq!(
            err.to_string(),
            "unknown backend \"firecracker\"; known backends: [mock, qemu]"
        );
    }

    #[test]
    fn unsupported_names_op_and_backend() {
        let err = Error::unsupported("hotplug_cpu", "qemu", "lands with the hotplug issue");
        assert_eq!(
            err.to_string(),
            "hotplug_cpu: not supported by the qemu backend: lands with the hotplug issue"
        );
    }
}
