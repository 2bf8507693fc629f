//! Watching a process's exit with kqueue (`EVFILT_PROC`, `NOTE_EXIT`): macOS has no
//! parent-death signal, so vmkit watches its VMM instead. macOS only; not compiled on
//! the machines vmkit is developed on.

use std::io;

/// Blocks until process `pid` exits (call it from a blocking thread).
///
/// # Errors
/// kqueue's errors; `ESRCH` when the process is already gone.
pub fn wait_exit(pid: u32) -> io::Result<()> {
    let pid = usize::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kqueue(2) takes no arguments and returns a new fd or -1.
    #[allow(unsafe_code)]
    let kq = unsafe { libc::kqueue() };
    if kq < 0 {
        return Err(io::Error::last_os_error());
    }
    let change = libc::kevent {
        ident: pid,
        filter: libc::EVFILT_PROC,
        flags: libc::EV_ADD | libc::EV_ONESHOT,
        fflags: libc::NOTE_EXIT,
        data: 0,
        udata: std::ptr::null_mut(),
    };
    // SAFETY: zeroed is a valid `kevent` (plain integers and a null pointer).
    #[allow(unsafe_code)]
    let mut event: libc::kevent = unsafe { std::mem::zeroed() };
    // SAFETY: one change and one event buffer, both valid for the counts given; `kq` is
    // ours; a null timeout waits.
    #[allow(unsafe_code)]
    let n = unsafe { libc::kevent(kq, &change, 1, &mut event, 1, std::ptr::null()) };
    let result = if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: `kq` is our fd, closed once.
    #[allow(unsafe_code)]
    unsafe {
        libc::close(kq);
    }
    result
}
