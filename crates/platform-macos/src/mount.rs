//! Mounting, which only a Linux guest agent does: on macOS every call is `Unsupported`.
//! macOS only: type-checked on Linux (`cargo xtask check-macos`), never run there.

use std::io;
use std::path::Path;

/// The mount flags the agent allows (the same as vmkit-linux's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// `ro`.
    pub read_only: bool,
    /// `nosuid`.
    pub no_suid: bool,
    /// `nodev`.
    pub no_dev: bool,
    /// `noexec`.
    pub no_exec: bool,
    /// `noatime`.
    pub no_atime: bool,
    /// `relatime`.
    pub rel_atime: bool,
    /// `sync`.
    pub sync: bool,
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "mounting is for a Linux guest's agent",
    )
}

/// `Unsupported`: the agent mounts only in a Linux guest.
///
/// # Errors
/// Always.
pub fn mount(
    _source: &str,
    _target: &Path,
    _fstype: &str,
    _flags: MountFlags,
    _data: &str,
) -> io::Result<()> {
    Err(unsupported())
}

/// `Unsupported`: the agent unmounts only in a Linux guest.
///
/// # Errors
/// Always.
pub fn unmount(_target: &Path, _lazy: bool) -> io::Result<()> {
    Err(unsupported())
}
