//! What a guest agent needs to run its children, the same on every POSIX system:
//! pseudo-terminals ([`open_pty`]), a new session whose controlling terminal is the
//! child's stdin ([`new_session_on_stdin`]), default signal actions
//! ([`default_signals`]), terminal sizes ([`set_window_size`]) and
//! reaping without blocking ([`reap`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

/// A pseudo-terminal: the primary side the agent reads and writes, and the replica a
/// child gets as its terminal.
#[derive(Debug)]
pub struct Pty {
    /// The primary (master) side.
    pub primary: OwnedFd,
    /// The replica (slave) side.
    pub replica: OwnedFd,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a new pseudo-terminal of `rows` × `cols`; both fds are close-on-exec.
///
/// # Errors
/// `openpty(3)`'s error (e.g. no `/dev/ptmx` or `/dev/pts`).
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    let (mut primary, mut replica) = (-1, -1);
    // Mutable only because macOS's openpty takes `*mut winsize` (Linux's `*const`).
    let mut size = winsize(rows, cols);
    // SAFETY: openpty writes two fds into the out-pointers, which point at live locals;
    // the name pointer is null (not wanted) and the termios pointer null (defaults);
    // `size` lives across the call and is only read.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::openpty(
            &raw mut primary,
            &raw mut replica,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &raw mut size,
        )
    };
    check(rc)?;
    // SAFETY: openpty succeeded, so both are open fds that nothing else owns.
    #[allow(unsafe_code)]
    let (primary, replica) =
        unsafe { (OwnedFd::from_raw_fd(primary), OwnedFd::from_raw_fd(replica)) };
    for fd in [&primary, &replica] {
        set_cloexec(fd.as_fd())?;
    }
    Ok(Pty { primary, replica })
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a borrowed (so open) fd with integer arguments only.
    #[allow(unsafe_code)]
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd`'s open file (shared by its duplicates).
///
/// # Errors
/// `fcntl(2)`'s error.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a borrowed (so open) fd with integer arguments only.
    #[allow(unsafe_code)]
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    #[allow(unsafe_code)]
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Sets the terminal size of the pseudo-terminal whose primary side is `fd`; the kernel
/// sends `SIGWINCH` to the terminal's foreground process group.
///
/// # Errors
/// `ioctl(TIOCSWINSZ)`'s error (`ENOTTY` when `fd` is not a terminal).
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live
    // local; the fd is borrowed, so open.
    #[allow(unsafe_code)]
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &raw const size) })?;
    Ok(())
}

/// The terminal size (rows, cols) of the terminal `fd`.
///
/// # Errors
/// `ioctl(TIOCGWINSZ)`'s error.
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut size = winsize(0, 0);
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at a
    // live local; the fd is borrowed, so open.
    #[allow(unsafe_code)]
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &raw mut size) })?;
    Ok((size.ws_row, size.ws_col))
}

/// Makes `command`'s child the leader of a new session whose controlling terminal is
/// its stdin (which must be a terminal's replica side): what a login shell gets, so
/// job control works and Ctrl-C on the terminal reaches its foreground group.
pub fn new_session_on_stdin(command: &mut std::process::Command) {
    // SAFETY: the hook runs in the forked child before exec and calls only setsid(2)
    // and ioctl(2), both async-signal-safe; it allocates nothing and touches no memory
    // shared with the parent.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            check(libc::setsid())?;
            // The cast: TIOCSCTTY's type differs between libcs (an int or a long).
            #[allow(clippy::cast_lossless, clippy::useless_conversion)]
            check(libc::ioctl(0, libc::TIOCSCTTY.into(), 0))?;
            Ok(())
        });
    }
}

/// Gives `command`'s child every signal's default action. Ignored signals are inherited
/// across `exec`: an agent started in the background by a non-interactive shell ignores
/// SIGINT and SIGQUIT, and without this so would every process it spawns (Ctrl-C on a
/// TTY would do nothing).
pub fn default_signals(command: &mut std::process::Command) {
    // SAFETY: the hook runs in the forked child before exec and calls only signal(2),
    // which is async-signal-safe; it allocates nothing and touches no memory shared with
    // the parent. SIGKILL, SIGSTOP and numbers past the system's last signal fail with
    // EINVAL, which is ignored.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            for signal in 1..65 {
                libc::signal(signal, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// Reaps one child that has ended, without blocking: `pid`, or any child when `None`.
/// `Ok(None)` when none has ended yet (or, for `None`, there are no children at all).
///
/// # Errors
/// `waitpid(2)`'s error: `ECHILD` when `pid` is not a child of this process (or was
/// reaped already).
pub fn reap(pid: Option<u32>) -> io::Result<Option<(u32, Exit)>> {
    let target = match pid {
        Some(p) => libc::pid_t::try_from(p).map_err(|_| io::Error::other("pid out of range"))?,
        None => -1,
    };
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int through the pointer, which points at a live local.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::waitpid(target, &raw mut status, libc::WNOHANG) };
    match rc {
        0 => Ok(None),
        -1 => {
            let e = io::Error::last_os_error();
            if pid.is_none() && e.raw_os_error() == Some(libc::ECHILD) {
                Ok(None)
            } else {
                Err(e)
            }
        }
        reaped => {
            let exit = if libc::WIFSIGNALED(status) {
                Exit::Signal(libc::WTERMSIG(status))
            } else {
                Exit::Code(libc::WEXITSTATUS(status))
            };
            // waitpid returns a positive pid here.
            Ok(Some((u32::try_from(reaped).unwrap_or_default(), exit)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_has_the_size_it_was_opened_with_and_takes_a_new_one() {
        let pty = open_pty(24, 80).unwrap();
        assert_eq!(window_size(pty.replica.as_fd()).unwrap(), (24, 80));
        set_window_size(pty.primary.as_fd(), 50, 132).unwrap();
        assert_eq!(window_size(pty.replica.as_fd()).unwrap(), (50, 132));
    }

    #[test]
    // The children are reaped by `reap`, which is what is tested, not by `wait`.
    #[allow(clippy::zombie_processes)]
    fn a_child_is_reaped_with_its_code_or_its_signal() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 42"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let exit = loop {
            if let Some((reaped, exit)) = reap(Some(pid)).unwrap() {
                assert_eq!(reaped, pid);
                break exit;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(exit, Exit::Code(42));
        assert!(reap(Some(pid)).is_err(), "reaped once only");
        let child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert_eq!(reap(Some(pid)).unwrap(), None, "still running");
        crate::process::signal(pid, libc::SIGTERM).unwrap();
        let exit = loop {
            if let Some((_, exit)) = reap(Some(pid)).unwrap() {
                break exit;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(exit, Exit::Signal(libc::SIGTERM));
    }

    #[test]
    fn a_child_gets_the_default_action_of_a_signal_its_parent_ignores() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "kill -INT $$; exit 3"]);
        // This process ignores SIGINT for the spawn: without the reset, so would the child.
        // SAFETY (test): signal(2) with integer arguments.
        #[allow(unsafe_code)]
        let before = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        let inherited = cmd.status().unwrap();
        default_signals(&mut cmd);
        let reset = cmd.status().unwrap();
        // SAFETY (test): as above, putting the old action back.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGINT, before);
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            inherited.code(),
            Some(3),
            "without the reset SIGINT is ignored"
        );
        assert_eq!(reset.signal(), Some(libc::SIGINT), "with it SIGINT kills");
    }

    #[test]
    fn a_session_child_has_its_stdin_as_controlling_terminal() {
        let pty = open_pty(10, 20).unwrap();
        let mut cmd = std::process::Command::new("sh");
        // `stty size` reads the size of its controlling terminal through /dev/tty.
        cmd.args(["-c", "stty size < /dev/tty > /dev/tty"])
            .stdin(pty.replica.try_clone().unwrap())
            .stdout(pty.replica.try_clone().unwrap())
            .stderr(pty.replica.try_clone().unwrap());
        new_session_on_stdin(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        drop(pty.replica);
        assert!(child.wait().unwrap().success());
        let mut out = Vec::new();
        let mut primary = std::fs::File::from(pty.primary);
        let _ = std::io::Read::read_to_end(&mut primary, &mut out); // EIO at the end
        assert_eq!(String::from_utf8_lossy(&out).trim(), "10 20");
    }
}
