//! TAP devices, which macOS does not have (see [`crate::net`] for what it has).

use std::io;
use std::os::fd::OwnedFd;

/// A TAP interface (never made on macOS).
#[derive(Debug)]
pub struct Tap {
    /// Its fd.
    pub fd: OwnedFd,
}

/// Refused: macOS has no TAP devices.
///
/// # Errors
/// Always `Unsupported`, naming what to use instead.
pub fn open_tap(name: &str) -> io::Result<Tap> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "TAP {name:?}: macOS has no TAP devices; use user networking, vmnet or a stream netdev to socket_vmnet"
        ),
    ))
}
