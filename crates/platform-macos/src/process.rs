//! Signals and host facts. macOS only: type-checked on Linux (`cargo xtask check-macos`),
//! never run there.

use std::io;

/// Sends `signal` to `pid`.
///
/// # Errors
/// `kill(2)`'s error.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// macOS has no child subreapers: orphans go to launchd. Returns `false`.
///
/// # Errors
/// Never; the signature is Linux's.
pub fn become_subreaper() -> io::Result<bool> {
    Ok(false)
}

/// No TSC frequency is read on macOS (microvm is not offered there).
pub fn tsc_khz() -> Option<u64> {
    None
}
