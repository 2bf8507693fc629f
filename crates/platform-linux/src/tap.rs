//! TAP interfaces: [`open_tap`] opens one by name (the kernel creates it when it does
//! not exist and the caller may, i.e. has `CAP_NET_ADMIN`) and returns the fd to hand
//! to the VMM. A TAP created this way is not persistent: it disappears when the last fd
//! to it closes, so a VM that is gone leaves no interface behind.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `IFNAMSIZ`: interface names are at most 15 bytes plus the NUL.
pub const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the
/// union is unused here).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    /// The fd (close-on-exec; pass it to the VMM explicitly).
    pub fd: OwnedFd,
    /// The interface's name as the kernel gave it.
    pub name: String,
}

/// Opens the TAP interface `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), creating it
/// when it does not exist.
///
/// # Errors
/// A name that is empty, too long or holds a NUL (`InvalidInput`); `/dev/net/tun`
/// missing; `EPERM` without `CAP_NET_ADMIN` for an interface that must be created;
/// `EBUSY` when another process holds it.
pub fn open_tap(name: &str) -> io::Result<Tap> {
    let cname = CString::new(name).map_err(|_| invalid(name, "holds a NUL byte"))?;
    let bytes = cname.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ {
        return Err(invalid(name, "must be 1-15 bytes"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out
    // (40 bytes, name then flags); `req` lives across the call; the fd is open.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    let len = req.name.iter().position(|c| *c == 0).unwrap_or(IFNAMSIZ);
    let name = req.name[..len].iter().map(|c| *c as u8 as char).collect();
    Ok(Tap {
        fd: OwnedFd::from(file),
        name,
    })
}

fn invalid(name: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("TAP name {name:?} {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "sixteen-bytes-xx", "a\0b"] {
            let err = open_tap(name).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}: {err}");
        }
    }

    #[test]
    fn a_tap_opened_here_vanishes_when_its_fd_closes() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("note: no /dev/net/tun; skipping");
            return;
        }
        let name = format!("vmkt{}", std::process::id() % 100_000);
        let tap = match open_tap(&name) {
            Ok(tap) => tap,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("note: no CAP_NET_ADMIN ({e}); skipping");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tap.name, name);
        let sys = std::path::PathBuf::from(format!("/sys/class/net/{name}"));
        assert!(sys.exists());
        drop(tap);
        assert!(!sys.exists(), "{name} outlived its fd");
    }
}
