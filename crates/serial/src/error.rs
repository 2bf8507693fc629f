//! The errors of opening a channel.

use std::time::Duration;

/// Why a channel could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The link is dead: its stream ended or failed, or the mux was dropped.
    #[error("the serial link is closed: {reason}")]
    Closed {
        /// What ended it.
        reason: String,
    },
    /// The other side restarted while the open was under way; opening again reaches
    /// its new life.
    #[error("the other side of the serial link restarted")]
    PeerRestarted,
    /// The other side refused the channel.
    #[error("port {port}: refused: {reason}")]
    Refused {
        /// The port asked for.
        port: u32,
        /// The other side's reason.
        reason: String,
    },
    /// No answer in time (the other side is not there yet, or stalled).
    #[error("port {port}: no answer within {after:?}")]
    Timeout {
        /// The port asked for.
        port: u32,
        /// The time waited.
        after: Duration,
    },
}
