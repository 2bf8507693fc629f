//! Powering the guest off.

/// Flushes file systems and powers the machine off. Returns only on failure.
#[allow(unsafe_code)]
pub(crate) fn power_off() -> std::io::Error {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command constant; it touches no memory of ours.
    let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    if rc == 0 {
        // Not reached: the kernel powered off.
        std::io::Error::other("reboot(POWER_OFF) returned")
    } else {
        std::io::Error::last_os_error()
    }
}
