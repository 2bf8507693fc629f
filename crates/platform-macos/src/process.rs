//! Signals, the host facts the HVF decision needs (sysctls), and the QEMU build check.
//! macOS only; not compiled on the machines vmkit is developed on.

use std::ffi::CStr;
use std::io;

use crate::accel::{Arch, HvfFacts};

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

/// No TSC frequency is read on macOS (microvm is not offered there).
pub fn tsc_khz() -> Option<u64> {
    None
}

/// An integer sysctl, `None` when it does not exist.
fn sysctl_i64(name: &CStr) -> Option<i64> {
    let mut value: i64 = 0;
    let mut len = std::mem::size_of::<i64>();
    // SAFETY: `name` is NUL-terminated; `value` and `len` are valid for writes of the
    // size `len` says, and no new value is set (null, 0).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&raw mut value).cast(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    // The kernel writes an int (4 bytes) for these; the rest of `value` stays 0.
    (rc == 0).then_some(value)
}

/// The facts for a guest of the host's own architecture, QEMU at `$VMKIT_QEMU` or
/// `qemu-system-<arch>` on `PATH` (asked once per process: `-accel help`).
pub(crate) fn hvf_facts() -> HvfFacts {
    static LISTS_HVF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let lists_hvf = *LISTS_HVF.get_or_init(|| {
        let qemu = std::env::var_os("VMKIT_QEMU").unwrap_or_else(|| match Arch::native() {
            Arch::Aarch64 => "qemu-system-aarch64".into(),
            Arch::X86_64 => "qemu-system-x86_64".into(),
        });
        std::process::Command::new(qemu)
            .args(["-accel", "help"])
            .output()
            .map(|out| crate::accel::lists_hvf(&String::from_utf8_lossy(&out.stdout)))
            .unwrap_or(false)
    });
    HvfFacts {
        hv_support: sysctl_i64(c"kern.hv_support"),
        translated: sysctl_i64(c"sysctl.proc_translated"),
        host: Arch::native(),
        guest: Arch::native(),
        qemu_lists_hvf: lists_hvf,
    }
}
