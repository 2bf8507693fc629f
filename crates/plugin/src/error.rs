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
    /// A plugin library could not be opened (not a shared library, truncated, a
    /// missing dependency or symbol).
    #[error("load plugin {}: {reason}", path.display())]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's words.
        reason: String,
    },
    /// A library's descriptor is missing or wrong; nothing of it was called.
    #[error("plugin {}: {field}: {reason}", path.display())]
    Descriptor {
        /// The library.
        path: PathBuf,
        /// The field (or `symbol`, `init`, `describe`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A library, or its directory, is in a place others may write to.
    #[error("plugin {}: refused: {reason}", path.display())]
    UnsafePath {
        /// The library or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugin sent more than a message may hold; it was not read whole.
    #[error(
        "the plugin ({origin}) sent a {what} of {size} bytes or more, over the {limit}-byte limit"
    )]
    Oversized {
        /// Where it came from.
        origin: String,
        /// What was too large (`"reply"`, `"line"`).
        what: &'static str,
        /// Its size, or as much of it as was seen.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The plugin sent something that is not a message of the protocol.
    #[error("the plugin ({origin}) broke the protocol: {what}")]
    Protocol {
        /// Where it came from.
        origin: String,
        /// What it sent, and what was wrong with it.
        what: String,
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
