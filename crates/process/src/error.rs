//! The one error type of vmkit-process.

use std::time::Duration;

/// What went wrong with a process call; every message names the call and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: an empty argv, a relative cwd, a bad signal or size,
    /// an offset outside what the agent kept.
    #[error("{op}: bad request: {reason}")]
    BadRequest {
        /// The call, e.g. `spawn ["cat"]`.
        op: String,
        /// The agent's reason.
        reason: String,
    },
    /// The program, the cwd or the process does not exist.
    #[error("{op}: not found: {reason}")]
    NotFound {
        /// The call.
        op: String,
        /// The agent's reason.
        reason: String,
    },
    /// The process cannot do that now: it has ended, or it has no TTY.
    #[error("{op}: {reason}")]
    Refused {
        /// The call.
        op: String,
        /// The agent's reason.
        reason: String,
    },
    /// The agent holds as many processes as it may.
    #[error("{op}: exhausted: {reason}")]
    Exhausted {
        /// The call.
        op: String,
        /// The agent's reason.
        reason: String,
    },
    /// The call did not finish within its deadline.
    #[error("{op}: no answer within {after:?}")]
    Timeout {
        /// The call.
        op: String,
        /// The deadline it had.
        after: Duration,
    },
    /// The guest could not be reached (the VM is not running, no agent, a dial failed).
    #[error("{op}: reach the guest: {source}")]
    Guest {
        /// The call.
        op: String,
        /// Why.
        #[source]
        source: vmkit_core::Error,
    },
    /// The agent failed the call, or the connection to it broke.
    #[error("{op}: {reason}")]
    Agent {
        /// The call.
        op: String,
        /// The agent's or the transport's reason.
        reason: String,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error for a failed TTRPC call: its status code picks the kind.
    pub(crate) fn from_ttrpc(op: &str, e: ttrpc::Error) -> Error {
        let op = op.to_owned();
        match e {
            ttrpc::Error::RpcStatus(status) => {
                let reason = status.message().to_owned();
                match status.code() {
                    ttrpc::Code::INVALID_ARGUMENT => Error::BadRequest { op, reason },
                    ttrpc::Code::NOT_FOUND => Error::NotFound { op, reason },
                    ttrpc::Code::FAILED_PRECONDITION => Error::Refused { op, reason },
                    ttrpc::Code::RESOURCE_EXHAUSTED => Error::Exhausted { op, reason },
                    code => Error::Agent {
                        op,
                        reason: format!("{code:?}: {reason}"),
                    },
                }
            }
            other => Error::Agent {
                op,
                reason: other.to_string(),
            },
        }
    }
}
