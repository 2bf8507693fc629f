//! The shim's errors, and the gRPC status each becomes for containerd.

use containerd_shim_protos::ttrpc;

/// What went wrong in a task call, by kind: containerd acts on the code
/// (`NotFound` for a process gone, `FailedPrecondition` for a wrong state).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A request field or the bundle's spec is malformed.
    #[error("{op}: bad argument: {reason}")]
    BadArgument { op: String, reason: String },
    /// No such container or process.
    #[error("{op}: not found: {what}")]
    NotFound { op: String, what: String },
    /// The container or process is in the wrong state for it.
    #[error("{op}: {reason}")]
    WrongState { op: String, reason: String },
    /// What the shim does not do (yet).
    #[error("{op}: not supported: {reason}")]
    Unsupported { op: String, reason: String },
    /// The shim's configuration.
    #[error("shim config {path}: {reason}")]
    Config { path: String, reason: String },
    /// The VM.
    #[error("{op}: {source}")]
    Vm {
        op: String,
        #[source]
        source: Box<vmkit_core::Error>,
    },
    /// A process or mount in the guest.
    #[error("{op}: {source}")]
    Guest {
        op: String,
        #[source]
        source: Box<vmkit_process::Error>,
    },
    /// A host file, FIFO or mount.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// The shim's results.
pub(crate) type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn bad(op: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::BadArgument {
            op: op.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(op: impl Into<String>, what: impl Into<String>) -> Error {
        Error::NotFound {
            op: op.into(),
            what: what.into(),
        }
    }

    pub(crate) fn state(op: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::WrongState {
            op: op.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(op: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Unsupported {
            op: op.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let op = op.into();
        move |source| Error::Io { op, source }
    }

    pub(crate) fn vm(op: impl Into<String>) -> impl FnOnce(vmkit_core::Error) -> Error {
        let op = op.into();
        move |source| Error::Vm {
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn guest(op: impl Into<String>) -> impl FnOnce(vmkit_process::Error) -> Error {
        let op = op.into();
        move |source| Error::Guest {
            op,
            source: Box::new(source),
        }
    }

    /// The gRPC code containerd reads.
    fn code(&self) -> ttrpc::Code {
        match self {
            Error::BadArgument { .. } | Error::Config { .. } => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound { .. } => ttrpc::Code::NOT_FOUND,
            Error::WrongState { .. } => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unsupported { .. } => ttrpc::Code::UNIMPLEMENTED,
            Error::Vm { source, .. } => match source.as_ref() {
                vmkit_core::Error::InvalidConfig { .. } | vmkit_core::Error::BadArgument { .. } => {
                    ttrpc::Code::INVALID_ARGUMENT
                }
                vmkit_core::Error::NotFound { .. } => ttrpc::Code::NOT_FOUND,
                vmkit_core::Error::InvalidState { .. } => ttrpc::Code::FAILED_PRECONDITION,
                vmkit_core::Error::Exhausted { .. } => ttrpc::Code::RESOURCE_EXHAUSTED,
                vmkit_core::Error::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
                vmkit_core::Error::Unsupported { .. } => ttrpc::Code::UNIMPLEMENTED,
                _ => ttrpc::Code::INTERNAL,
            },
            Error::Guest { source, .. } => match source.as_ref() {
                vmkit_process::Error::NotFound { .. } => ttrpc::Code::NOT_FOUND,
                vmkit_process::Error::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
                _ => ttrpc::Code::INTERNAL,
            },
            Error::Io { .. } => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        // The whole cause chain, one message: containerd shows it to the user.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
    }
}
