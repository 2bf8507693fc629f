//! Mounting and unmounting, for the guest agent (`mount(2)`, `umount2(2)`).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The mount flags the agent allows.
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

impl MountFlags {
    fn bits(self) -> libc::c_ulong {
        [
            (self.read_only, libc::MS_RDONLY),
            (self.no_suid, libc::MS_NOSUID),
            (self.no_dev, libc::MS_NODEV),
            (self.no_exec, libc::MS_NOEXEC),
            (self.no_atime, libc::MS_NOATIME),
            (self.rel_atime, libc::MS_RELATIME),
            (self.sync, libc::MS_SYNCHRONOUS),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |bits, (_, bit)| bits | bit)
    }
}

fn c_string(what: &str, bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Mounts `source` (a device path, a share tag, or a name for tmpfs and overlay) at
/// `target` as `fstype`, with `flags` and the filesystem's `data` options.
///
/// # Errors
/// `mount(2)`'s error, or `InvalidInput` for a NUL byte in an argument.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let source = c_string("the source", source.as_bytes())?;
    let target = c_string("the target", target.as_os_str().as_bytes())?;
    let fstype = c_string("the filesystem type", fstype.as_bytes())?;
    let data = c_string("the options", data.as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that lives across the call;
    // mount(2) only reads them.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags.bits(),
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts what is mounted at `target`; `lazy` detaches it now and cleans up once it
/// is no longer busy (`MNT_DETACH`).
///
/// # Errors
/// `umount2(2)`'s error (`EINVAL`: nothing is mounted there; `EBUSY`: in use).
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let target = c_string("the target", target.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: the pointer is a NUL-terminated string that lives across the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::umount2(target.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_their_bits() {
        let flags = MountFlags {
            read_only: true,
            no_dev: true,
            ..MountFlags::default()
        };
        assert_eq!(flags.bits(), libc::MS_RDONLY | libc::MS_NODEV);
        assert_eq!(MountFlags::default().bits(), 0);
    }

    #[test]
    fn a_nul_in_an_argument_is_refused_before_the_call() {
        let err = mount(
            "a\0b",
            Path::new("/mnt"),
            "tmpfs",
            MountFlags::default(),
            "",
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(unmount(Path::new("/nothing/mounted/here"), false).is_err());
    }
}
