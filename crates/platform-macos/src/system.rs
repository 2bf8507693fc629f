//! The running system itself: its uptime, and powering it off. vmkit's guest agent runs
//! on macOS only in its host test mode (the testkit's fake guest), which never powers
//! the machine off.

use std::io;

/// Milliseconds since boot (`CLOCK_MONOTONIC`, which on macOS counts sleep too). 0 if
/// the clock cannot be read.
pub fn uptime_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one `timespec` to the valid pointer given.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let ms = u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000;
    secs * 1000 + ms
}

/// Refused: vmkit powers off Linux guests only, never a macOS host.
pub fn power_off() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "powering off is a Linux guest's operation; the agent does not power off a macOS host",
    )
}
