//! The crate's one error type: what can go wrong bringing a backend in at run time.

use std::path::PathBuf;

/// Why a plugin could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend executable could not be started or reached.
    #[error("launch backend process {}: {reason}", binary.display())]
    Launch {
        /// The executable.
        binary: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugin went away (its process died, its socket closed).
    #[error("the backend ({origin}) is gone: {cause}")]
    BackendGone {
        /// Where it came from.
        origin: String,
        /// How it went.
        cause: String,
    },
}
