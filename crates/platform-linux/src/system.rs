//! The running system itself: its uptime, and powering it off (what the guest agent
//! asks of the Linux guest it runs in).

use std::io;

/// Milliseconds since boot, sleep included (`CLOCK_BOOTTIME`): a clock read, no file
/// I/O. 0 if the clock cannot be read.
pub fn uptime_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one `timespec` to the valid pointer given.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut t) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let ms = u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000;
    secs * 1000 + ms
}

/// Flushes file systems and powers the machine off. Returns only on failure, with the
/// reason.
pub fn power_off() -> io::Error {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync()
    };
    // SAFETY: reboot(2) with a valid command constant; it touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    if rc == 0 {
        // Not reached: the kernel powered off.
        io::Error::other("reboot(POWER_OFF) returned")
    } else {
        io::Error::last_os_error()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime_is_read_and_advances() {
        let a = super::uptime_ms();
        assert!(a > 0, "CLOCK_BOOTTIME read as 0");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = super::uptime_ms();
        assert!(b >= a + 15, "{a} then {b}");
    }
}
