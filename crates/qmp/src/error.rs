//! The crate's error type. Each message names the command (or socket) and the cause.

use std::path::PathBuf;
use std::time::Duration;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be reached before the deadline, or refused for good.
    #[error("connect {}: {reason}", path.display())]
    Connect {
        /// The QMP socket.
        path: PathBuf,
        /// What happened: attempts made and the last OS error, or the permanent error.
        reason: String,
    },

    /// The socket answered but the greeting or capability negotiation failed.
    #[error("QMP handshake on {}: {reason}", path.display())]
    Handshake {
        /// The QMP socket.
        path: PathBuf,
        /// What was wrong (no greeting before the deadline, not QMP, refused capabilities).
        reason: String,
    },

    /// QEMU answered the command with an error.
    #[error("{command}: QMP error {class}: {desc}")]
    Qmp {
        /// The command's name.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, …).
        class: String,
        /// QEMU's own description.
        desc: String,
    },

    /// No reply before the command's deadline. The connection stays usable; a late
    /// reply is discarded.
    #[error("{command}: no reply within {after:?} (command #{seq} on this connection)")]
    Timeout {
        /// The command's name.
        command: String,
        /// The command's sequence number on this connection (also its wire id with
        /// [`crate::CommandIds::Always`]).
        seq: u64,
        /// Its deadline.
        after: Duration,
    },

    /// The connection is gone (EOF, socket error, or QEMU sent something that is not
    /// QMP); every waiting command fails with this at once.
    #[error("{command}: QMP connection lost: {reason}")]
    Disconnected {
        /// The command that was waiting or being sent.
        command: String,
        /// Why the connection ended.
        reason: String,
    },

    /// The command's arguments could not be encoded as JSON.
    #[error("{command}: cannot encode the arguments: {source}")]
    Encode {
        /// The command's name.
        command: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },

    /// The reply did not have the shape the command's result type expects.
    #[error("{command}: unexpected reply {reply}: {source}")]
    Decode {
        /// The command's name.
        command: String,
        /// The reply, shortened.
        reply: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// QEMU's error class, for [`Error::Qmp`].
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }

    /// `true` for [`Error::Disconnected`].
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
    }

    /// `true` for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}
