//! Watching processes with kqueue (`EVFILT_PROC`, `NOTE_EXIT`): macOS has no
//! parent-death signal, so a guardian process watches vmkit and its VMM and kills the
//! VMM when vmkit goes. macOS only: type-checked on Linux (`cargo xtask check-macos`),
//! never run there.

use std::io;

/// Forks a guardian for the process being set up to exec the VMM, from inside
/// `pre_exec` (the child of `parent`, before `exec`): macOS has no parent-death signal,
/// so the guardian waits with kqueue for either `parent` (vmkit) or the VMM to exit, and
/// when vmkit goes first — however it goes, `SIGKILL` included — kills the VMM with
/// `SIGKILL`. It then exits, and launchd reaps it.
///
/// The guardian is a fork of a fork of a threaded process, so it makes raw system
/// calls only (no allocation, no locks): `close`, `kqueue`, `kevent`, `kill`, `_exit`.
/// It closes every fd it inherited first, so it holds no socket or pipe of vmkit's or
/// the VMM's open.
///
/// # Errors
/// `fork(2)`'s error; the spawn then fails with it.
///
/// # Safety
/// Call only between `fork` and `exec` (a `pre_exec` closure), where this is the only
/// thread.
#[allow(unsafe_code)]
pub unsafe fn fork_guardian(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: getpid(2) and fork(2) take no memory of ours; the caller guarantees we are
    // the only thread (between fork and exec), so the child is a consistent copy.
    let vmm = unsafe { libc::getpid() };
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: the new child, with one thread; guard never returns.
            unsafe { guard(parent, vmm) }
        }
        _ => Ok(()),
    }
}

/// The guardian's whole life (see [`fork_guardian`]). Never returns.
#[allow(unsafe_code)]
unsafe fn guard(parent: libc::pid_t, vmm: libc::pid_t) -> ! {
    // SAFETY (every block below): raw system calls on plain integers and on the stack
    // arrays declared here, with the lengths given; async-signal-safe.
    unsafe {
        let max_fd = libc::getdtablesize();
        for fd in 0..max_fd {
            libc::close(fd);
        }
        let kq = libc::kqueue();
        if kq < 0 {
            // Cannot watch: leave the VMM alone rather than kill a healthy one.
            libc::_exit(1);
        }
        let watch = |pid: libc::pid_t| libc::kevent {
            ident: pid as usize,
            filter: libc::EVFILT_PROC,
            flags: libc::EV_ADD | libc::EV_RECEIPT,
            fflags: libc::NOTE_EXIT,
            data: 0,
            udata: std::ptr::null_mut(),
        };
        let changes = [watch(parent), watch(vmm)];
        let mut events: [libc::kevent; 2] = std::mem::zeroed();
        // EV_RECEIPT: one receipt per change, data = 0 or its errno.
        let n = libc::kevent(
            kq,
            changes.as_ptr(),
            2,
            events.as_mut_ptr(),
            2,
            std::ptr::null(),
        );
        if n < 0 {
            libc::_exit(1);
        }
        for receipt in &events[..n as usize] {
            if receipt.data != 0 {
                // ESRCH: that process is already gone. vmkit gone: kill the VMM.
                if receipt.ident == parent as usize {
                    libc::kill(vmm, libc::SIGKILL);
                }
                libc::_exit(0);
            }
        }
        loop {
            let mut event: libc::kevent = std::mem::zeroed();
            let n = libc::kevent(kq, std::ptr::null(), 0, &mut event, 1, std::ptr::null());
            if n < 0 {
                if *libc::__error() == libc::EINTR {
                    continue;
                }
                libc::_exit(1);
            }
            if n == 1 {
                if event.ident == parent as usize {
                    libc::kill(vmm, libc::SIGKILL);
                }
                libc::_exit(0);
            }
        }
    }
}
