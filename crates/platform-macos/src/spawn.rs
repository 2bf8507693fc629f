//! Spawning the VMM on macOS. There is no parent-death signal: the caller watches the
//! child ([`crate::kqueue`]) and kills it when vmkit's instance goes, and QEMU newer
//! than 10.0 is also given `-run-with exit-with-parent=on`. macOS only; not compiled on
//! the machines vmkit is developed on.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use tokio::process::{Child, Command};

/// Whether a spawned child dies with this process: not on macOS (no parent-death
/// signal), so QEMU is asked to (`-run-with exit-with-parent=on`) where it can.
pub const CHILDREN_DIE_WITH_PARENT: bool = false;

/// What to spawn.
#[derive(Debug)]
pub struct SpawnRequest {
    command: Command,
    keep_fds: Vec<RawFd>,
}

impl SpawnRequest {
    /// Spawn `command` as it is set up.
    pub fn new(command: Command) -> Self {
        SpawnRequest {
            command,
            keep_fds: Vec::new(),
        }
    }

    /// Let the child inherit `fd` (macOS needs none: no TAP, no vhost fds).
    pub fn keep_fd(mut self, fd: RawFd) -> Self {
        self.keep_fds.push(fd);
        self
    }
}

/// Spawns processes (the same interface as vmkit-linux's).
#[derive(Debug, Default)]
pub struct Spawner;

impl Spawner {
    /// The process's spawner.
    pub fn global() -> &'static Spawner {
        static SPAWNER: OnceLock<Spawner> = OnceLock::new();
        SPAWNER.get_or_init(Spawner::default)
    }

    /// Spawns `request` with a umask of 077.
    ///
    /// # Errors
    /// The spawn's error; `Unsupported` when fds are to be inherited.
    pub async fn spawn(&self, request: SpawnRequest) -> io::Result<Child> {
        if !request.keep_fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "inheriting fds is not supported on macOS (no TAP or vhost devices there)",
            ));
        }
        let mut command = request.command;
        // SAFETY: umask(2) is async-signal-safe and touches no memory; nothing else
        // runs between fork and exec.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        command.kill_on_drop(true).spawn()
    }
}
