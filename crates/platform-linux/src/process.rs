//! Signals to child processes.

use std::io;

/// Sends `signal` (e.g. `libc::SIGTERM`) to `pid`.
///
/// Only call it for a child that has not been reaped yet, so the pid cannot have been
/// reused by an unrelated process.
///
/// # Errors
/// `ESRCH` when no such process exists, `EPERM` when it is not ours.
pub fn signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphaned
/// descendants are reparented to it rather than to PID 1, so an agent that is not
/// PID 1 still reaps what its children leave behind. Returns whether it took effect.
///
/// # Errors
/// `prctl(2)`'s error.
pub fn become_subreaper() -> io::Result<bool> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The host CPU's frequency in kHz from `/proc/cpuinfo` (what microvm guests need as
/// `tsc_early_khz`), when the kernel reports one.
pub fn tsc_khz() -> Option<u64> {
    parse_cpu_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    if !(1.0..1.0e7).contains(&mhz) {
        return None;
    }
    // In range (checked above): the product fits a u64 and is positive.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_khz_is_read_from_the_first_cpu() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2445.404\nprocessor\t: 1\ncpu MHz\t\t: 1.0\n";
        assert_eq!(parse_cpu_khz(text), Some(2_445_404));
        assert_eq!(parse_cpu_khz("cpu MHz : nan\n"), None);
        assert_eq!(parse_cpu_khz("flags : fpu\n"), None);
    }

    #[test]
    fn signalling_a_missing_process_is_esrch() {
        // pid_max is at most 2^22: this pid does not exist.
        let err = signal(4_194_304 + 17, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
