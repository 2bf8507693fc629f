//! The command's errors: what went wrong, with its cause, one kind per kind of failure.

use std::io;
use std::path::PathBuf;

/// What a `vmkit` command can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// An argument or a config file says something that cannot be.
    #[error("{0}")]
    BadArgument(String),
    /// A config file that cannot be read or parsed.
    #[error("config file {path}: {message}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No VM of that name.
    #[error("no VM named {0:?} (`vmkit ps` lists them)")]
    NoSuchVm(String),
    /// A VM of that name exists already.
    #[error("a VM named {0:?} exists already (`vmkit rm {0}` forgets a stopped one)")]
    VmExists(String),
    /// The VM is not in a state the command needs.
    #[error("{op}: VM {vm:?} is {state}")]
    VmState {
        /// The command.
        op: String,
        /// The VM.
        vm: String,
        /// Its state, as words.
        state: String,
    },
    /// The test guest (the default kernel) is not built.
    #[error(
        "no kernel given and no test guest in {0} (build it with `cargo xtask image`, or pass --kernel)"
    )]
    NoTestGuest(PathBuf),
    /// vmkit-core said no.
    #[error("{op}: {source}")]
    Vm {
        /// What was being done.
        op: String,
        /// vmkit's error.
        #[source]
        source: Box<vmkit_core::Error>,
    },
    /// A process in the guest.
    #[error("{op}: {source}")]
    Process {
        /// What was being done.
        op: String,
        /// vmkit-process's error.
        #[source]
        source: Box<vmkit_process::Error>,
    },
    /// A plugin that could not be brought in.
    #[error("{op}: {source}")]
    Plugin {
        /// What was being done.
        op: String,
        /// vmkit-plugin's error.
        #[source]
        source: Box<vmkit_plugin::Error>,
    },
    /// The host said no.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A VM's supervisor answered with an error, or not at all.
    #[error("VM {vm:?}: {message}")]
    Supervisor {
        /// The VM.
        vm: String,
        /// What it said, or why it could not be asked.
        message: String,
    },
    /// The VM did not start.
    #[error("start of VM {vm:?} failed: {message}{}", console.as_ref().map(|c| format!(" (console log: {})", c.display())).unwrap_or_default())]
    StartFailed {
        /// The VM.
        vm: String,
        /// Why.
        message: String,
        /// Where its console went.
        console: Option<PathBuf>,
    },
}

impl Error {
    /// `op` failed with the system error `source`.
    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// `op` failed in vmkit.
    pub(crate) fn vm(op: impl Into<String>, source: vmkit_core::Error) -> Error {
        Error::Vm {
            op: op.into(),
            source: Box::new(source),
        }
    }
}

/// The command's result.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
