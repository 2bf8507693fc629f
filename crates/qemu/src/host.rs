//! The one place this crate meets the host OS: everything goes through
//! `vmkit-platform`, which is `vmkit-linux` or `vmkit-macos` by target, so no `cfg` is
//! needed here.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use tokio::process::{Child, Command};
use vmkit_core::Accel;

use crate::options::Machine;

use vmkit_platform as os;

/// The accelerator `Accel::Auto` means on this host for a `machine` guest run by
/// `qemu`: the platform's hardware accelerator (KVM, HVF) when its probe finds it really
/// usable for that guest, else TCG. May run `qemu` (macOS): call it off the runtime.
pub(crate) fn default_accel(machine: Machine, qemu: &Path) -> Accel {
    let hardware = os::accel::hardware_accel(machine.guest_arch(), qemu);
    tracing::debug!(?hardware, "accelerator probe");
    hardware
        .and_then(|name| name.parse().ok())
        .unwrap_or(Accel::Tcg)
}

/// Removes the file at `path` (a socket, a pid file) unless it is already gone; a failure
/// is logged naming `what`, as nothing can be done about it. A plain unlink, usable
/// from `Drop`.
pub(crate) fn remove_if_present(path: &Path, what: &str) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove {what}");
    }
}

/// Checks that `path` fits this host's Unix socket addresses (103 bytes on macOS, 107
/// on Linux).
pub(crate) fn check_socket_path(path: &std::path::Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > os::limits::SUN_PATH_MAX {
        return Err(format!(
            "socket path {} is {len} bytes; a Unix socket path holds at most {} here",
            path.display(),
            os::limits::SUN_PATH_MAX
        ));
    }
    Ok(())
}

/// Spawns `command` so it dies with this process, letting it inherit `keep_fds`.
pub(crate) async fn spawn(command: Command, keep_fds: &[i32]) -> io::Result<Child> {
    let mut request = os::spawn::SpawnRequest::new(command);
    for fd in keep_fds {
        request = request.keep_fd(*fd);
    }
    os::spawn::Spawner::global().spawn(request).await
}

/// Opens (creating if needed) the TAP interface `name`.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    os::tap::open_tap(name).map(|tap| tap.fd)
}

/// Sends `signal` to `pid`, a child not yet reaped.
pub(crate) fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    os::process::signal(pid, signal)
}

/// The host's TSC frequency in kHz, for microvm guests (`tsc_early_khz`).
pub(crate) fn tsc_khz() -> Option<u64> {
    os::process::tsc_khz()
}

/// Whether kernel vsock for guests (`/dev/vhost-vsock`) is usable here.
pub(crate) fn vhost_vsock_usable() -> bool {
    os::vhost_vsock::usable()
}

/// Whether a child spawned here dies with this process by the platform's own means.
pub(crate) fn children_die_with_us() -> bool {
    os::spawn::CHILDREN_DIE_WITH_PARENT
}

/// Whether QEMU here can use vhost-user devices (and so hybrid vsock).
pub(crate) fn vhost_user_supported() -> bool {
    os::vhost_user::supported()
}

/// Reserves `cid` in the kernel; `None` when another VM holds it.
pub(crate) fn reserve_vsock_cid(cid: u32) -> io::Result<Option<OwnedFd>> {
    os::vhost_vsock::reserve_cid(cid)
}
