//! Kernel vsock for guests: `/dev/vhost-vsock` and the kernel's own CID reservation.
//!
//! [`reserve_cid`] opens `/dev/vhost-vsock` and sets the guest CID on it
//! (`VHOST_VSOCK_SET_GUEST_CID`). The kernel refuses a CID that another open fd holds
//! (`EADDRINUSE`), so the fd *is* the reservation, host-wide; it is then handed to QEMU
//! (`vhost-vsock-pci,vhostfd=N`) and released when the last copy closes.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The device.
pub const VHOST_VSOCK: &str = "/dev/vhost-vsock";
/// `_IOW(VHOST_VIRTIO = 0xAF, 0x60, __u64)`.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_af60;

/// Whether `/dev/vhost-vsock` exists and opens (read-write) for this process.
pub fn usable() -> bool {
    open(Path::new(VHOST_VSOCK)).is_ok()
}

fn open(path: &Path) -> io::Result<OwnedFd> {
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?
        .into())
}

/// Reserves `cid` in the kernel. `Ok(None)` when another VM holds it.
///
/// # Errors
/// `/dev/vhost-vsock` missing or not permitted, or the ioctl failing otherwise.
pub fn reserve_cid(cid: u32) -> io::Result<Option<OwnedFd>> {
    let fd = open(Path::new(VHOST_VSOCK))?;
    let value: u64 = cid.into();
    // SAFETY: the ioctl reads one u64 from the pointer, which points at a live local.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            VHOST_VSOCK_SET_GUEST_CID,
            std::ptr::from_ref(&value),
        )
    };
    if rc == 0 {
        return Ok(Some(fd));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EADDRINUSE) {
        Ok(None)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_iow_0xaf_0x60_u64() {
        // _IOW(type, nr, size) = (1 << 30) | (size << 16) | (type << 8) | nr
        let expected = (1u64 << 30) | (8 << 16) | (0xAF << 8) | 0x60;
        #[allow(clippy::useless_conversion)] // c_ulong is u64 here, u32 elsewhere
        let number = u64::from(VHOST_VSOCK_SET_GUEST_CID);
        assert_eq!(number, expected);
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_panic() {
        let err = open(Path::new("/nonexistent/vhost-vsock")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
