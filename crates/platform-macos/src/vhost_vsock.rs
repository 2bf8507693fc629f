//! Kernel vsock for guests, which macOS does not have: QEMU there has no vsock device
//! and no vhost-user, so the guest channel is virtio-serial (`vmkit-serial`).

use std::io;
use std::os::fd::OwnedFd;

/// Kernel vsock is never usable on macOS.
pub fn usable() -> bool {
    false
}

/// Refused: there is no `/dev/vhost-vsock` on macOS.
///
/// # Errors
/// Always `Unsupported`.
pub fn reserve_cid(cid: u32) -> io::Result<Option<OwnedFd>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("guest CID {cid}: macOS has no kernel vsock; use the virtio-serial transport"),
    ))
}

/// vhost-user devices, which QEMU on macOS does not have either.
pub mod vhost_user {
    /// Never on macOS (no vhost-user, so no hybrid vsock).
    pub fn supported() -> bool {
        false
    }
}
