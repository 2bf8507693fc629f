//! A TTY's primary side as async byte streams: a reader (the process's output) and a
//! writer (its input), each on its own duplicate of the fd.
//!
//! tokio's pipe ends carry any non-blocking fd that epoll can watch; a pseudo-terminal's
//! primary side is one. Once the process and everything holding the replica have gone,
//! a read fails with `EIO`: the output pump takes that as the end.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::net::unix::pipe;

/// The output and input ends of the TTY whose primary side is `primary`.
///
/// # Errors
/// Duplicating the fd, making it non-blocking or registering it failed.
pub(crate) fn ends(primary: &OwnedFd) -> io::Result<(pipe::Receiver, pipe::Sender)> {
    // O_NONBLOCK belongs to the open file: every duplicate shares it, which is what the
    // agent wants for all of them.
    vmkit_platform::child::set_nonblocking(primary.as_fd())?;
    let output = pipe::Receiver::from_owned_fd_unchecked(primary.try_clone()?)?;
    let input = pipe::Sender::from_owned_fd_unchecked(primary.try_clone()?)?;
    Ok((output, input))
}
