//! Real QEMU for tests: find the binary (failing, not skipping, under CI) and run a
//! paused, diskless QEMU with a QMP socket — enough to test QMP against the real thing.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The QEMU binary the tests use: `$VMKIT_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VMKIT_QEMU") {
        return Some(PathBuf::from(path));
    }
    on_path("qemu-system-x86_64")
}

/// `name` in a `PATH` directory.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `qemu-system-aarch64` on `PATH` (for the arm64 guest on machine `virt`), or `None`
/// with a note on stderr so the caller can skip.
///
/// # Panics
/// Under CI, when it is missing: `cargo xtask test` installs it (`qemu-system-arm`).
pub fn require_qemu_aarch64() -> Option<PathBuf> {
    required(
        on_path("qemu-system-aarch64"),
        "qemu-system-aarch64",
        "qemu-system-arm",
    )
}

/// `true` when running under CI (`CI` set to anything but `false`/`0`/empty).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A TAP NIC `id` on a TAP this process may create (`probe` is the backend's check,
/// e.g. `vmkit_qemu::probe_tap`), named for this process; `None` where the host
/// refuses TAP (no root, no `/dev/net/tun`).
///
/// # Panics
/// Under CI (root with a tun device), when the TAP cannot be created.
pub fn tap_nic(
    id: &str,
    probe: impl FnOnce(&str) -> std::io::Result<()>,
) -> Option<vmkit_core::NicConfig> {
    let name = format!("vmkc{}", std::process::id() % 100_000);
    match probe(&name) {
        Ok(()) => Some(vmkit_core::NicConfig::tap(id, name, None)),
        #[allow(clippy::panic)] // CI must not skip what it can run
        Err(e) if under_ci() => panic!("CI is set but TAP {name} cannot be created: {e}"),
        Err(_) => None,
    }
}

/// The QEMU binary, or `None` with a note on stderr so the caller can skip.
///
/// # Panics
/// Under CI, when QEMU is missing: `cargo xtask test` installs it, so its absence is a
/// failure there, never a silent skip.
pub fn require_qemu() -> Option<PathBuf> {
    required(qemu_binary(), "qemu-system-x86_64", "qemu-system-x86")
}

/// `found`, or — the binary `name` (from Debian's `package`) missing — a panic under CI
/// and a skip note otherwise.
fn required(found: Option<PathBuf>, name: &str, package: &str) -> Option<PathBuf> {
    match found {
        Some(path) => Some(path),
        None if under_ci() => panic!(
            "{name} not found and CI is set: `cargo xtask test` installs it \
             (Debian: apt-get install -t bookworm-backports {package})"
        ),
        None => {
            eprintln!("note: {name} not found; skipping a test that needs it");
            None
        }
    }
}

/// A real QEMU started with `-S` (vCPUs never run), no disks and no guest: it boots
/// in well under a second and serves QMP on a Unix socket. Killed when dropped.
#[derive(Debug)]
pub struct PausedQemu {
    child: Child,
    qmp: PathBuf,
}

impl PausedQemu {
    /// Spawns `binary` serving QMP at `qmp` (TCG, q35, 1 of 4 vCPUs, 128 MiB), plus
    /// `extra` arguments. Returns at once: the socket appears a little later.
    ///
    /// # Errors
    /// When the process cannot be spawned.
    pub fn spawn(binary: &Path, qmp: &Path, extra: &[&str]) -> std::io::Result<PausedQemu> {
        let socket = qmp.to_string_lossy().replace(',', ",,");
        let child = Command::new(binary)
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-S",
                "-smp",
                "1,maxcpus=4",
                "-m",
                "128",
                "-qmp",
            ])
            .arg(format!("unix:{socket},server=on,wait=off"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(PausedQemu {
            child,
            qmp: qmp.to_owned(),
        })
    }

    /// The QMP socket path.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (e.g. `SIGSTOP` to freeze it, `SIGCONT` to thaw it).
    ///
    /// # Errors
    /// When the process is gone or the signal cannot be sent.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| std::io::Error::other("QEMU already exited"))?;
        let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
        kill(Pid::from_raw(pid), signal).map_err(std::io::Error::from)
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}
