//! Spawning the VMM on macOS. There is no parent-death signal, so each child gets a
//! guardian process ([`crate::kqueue::fork_guardian`]) that kills it with `SIGKILL`
//! when vmkit exits, however vmkit exits; QEMU newer than 10.0 is also given
//! `-run-with exit-with-parent=on`. macOS only: type-checked on Linux
//! (`cargo xtask check-macos`), never run there.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use tokio::process::{Child, Command};

/// Whether the kernel sees to it that a spawned child dies with this process: not on
/// macOS (no parent-death signal). The guardian does, and QEMU is asked to as well
/// (`-run-with exit-with-parent=on`) where it can.
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

    /// Spawns `request` with a umask of 077 and a guardian that kills it when this
    /// process exits.
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
        // Read here, before the fork: in the child it would be the child's own.
        let parent = libc::pid_t::try_from(std::process::id())
            .map_err(|_| io::Error::other("pid out of range"))?;
        // SAFETY: the closure runs between fork and exec, the only thread: umask(2) is
        // async-signal-safe, and fork_guardian makes raw system calls only.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                libc::umask(0o077);
                crate::kqueue::fork_guardian(parent)
            });
        }
        command.kill_on_drop(true).spawn()
    }
}
