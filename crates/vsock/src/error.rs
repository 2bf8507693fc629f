//! The crate's error.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong in vmkit-vsock. Every message names the operation and the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// One connection attempt failed.
    #[error("dial {addr}: {cause}")]
    Dial {
        /// The address dialled.
        addr: String,
        /// What happened.
        cause: String,
        /// Whether another attempt may succeed (refused, reset, closed before `OK`, no
        /// socket yet) or not (permission, bad address, a peer speaking another protocol).
        transient: bool,
    },
    /// [`crate::dial_with_retry`] ran out of time.
    #[error("dial {addr}: no connection after {attempts} attempts in {after:?}; last: {last}")]
    DialTimeout {
        /// The address dialled.
        addr: String,
        /// How many connections were tried.
        attempts: u32,
        /// The deadline that passed.
        after: Duration,
        /// The last attempt's failure.
        last: String,
    },
    /// The agent took the connection but did not answer its first call.
    #[error("the guest agent at {addr} did not answer {call}: {cause}")]
    Agent {
        /// The address dialled.
        addr: String,
        /// The call (`Ping`).
        call: &'static str,
        /// What happened.
        cause: String,
    },
    /// Opening a raw stream failed after the connection was made.
    #[error("stream {kind} on {addr}: {cause}")]
    Stream {
        /// The address dialled.
        addr: String,
        /// The stream kind ("echo", "exec").
        kind: &'static str,
        /// What happened, including the agent's own reason when it refused.
        cause: String,
    },
    /// The CID allocator's settings are unusable.
    #[error("CID allocator: {0}")]
    CidConfig(String),
    /// Every CID in the range is leased, cooling down, or held by another process.
    #[error("allocate CID: none free in {first}..={last} ({scanned} tried)")]
    CidExhausted {
        /// The range's first CID.
        first: u32,
        /// The range's last CID.
        last: u32,
        /// How many candidates were looked at.
        scanned: u64,
    },
    /// A lock file of the cross-process reservation could not be used.
    #[error("CID {cid} lock file {}: {source}", path.display())]
    CidLock {
        /// The CID.
        cid: u32,
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The caller's reservation hook (e.g. the kernel's `VHOST_VSOCK_SET_GUEST_CID`)
    /// failed for a reason other than "already taken".
    #[error("reserve CID {cid}: {source}")]
    CidReserve {
        /// The CID.
        cid: u32,
        /// Why the reservation failed.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Dial {
                transient: true,
                ..
            }
        )
    }

    /// The error of `op` in vmkit-core's terms, for a backend's `GuestCommunicator`
    /// calls: a dial that ran out of time is a `Timeout` (its text keeps the attempts
    /// and the last cause), anything else a `Backend` error with this one as its source.
    pub fn into_core(self, op: &str) -> vmkit_core::Error {
        match self {
            Error::DialTimeout { after, .. } => vmkit_core::Error::Timeout {
                op: format!("{op}: {self}"),
                after,
            },
            other => vmkit_core::Error::backend(op, other),
        }
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
