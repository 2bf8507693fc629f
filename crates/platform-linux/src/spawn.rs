//! [`Spawner`]: spawns child processes that cannot outlive this process.
//!
//! Each child gets `PR_SET_PDEATHSIG` = `SIGKILL`. Linux sends that signal when the
//! *thread* that forked the child exits, not the process: a child forked by a tokio
//! worker or blocking-pool thread would be killed when the pool retires that thread
//! (after 10 s idle, by default). So every spawn happens on one dedicated thread that
//! lives as long as the process; callers hand it their command and get the child back.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// What to spawn, and how.
#[derive(Debug)]
pub struct SpawnRequest {
    command: Command,
    keep_fds: Vec<RawFd>,
}

impl SpawnRequest {
    /// Spawn `command` as it is set up (args, env, stdio); the spawner adds the
    /// parent-death signal.
    pub fn new(command: Command) -> Self {
        SpawnRequest {
            command,
            keep_fds: Vec::new(),
        }
    }

    /// Let the child inherit `fd` under the same number (for `fd=N` options). The fd
    /// must stay open in this process until the spawn returns; it stays close-on-exec
    /// here, so no other child inherits it.
    pub fn keep_fd(mut self, fd: RawFd) -> Self {
        self.keep_fds.push(fd);
        self
    }
}

struct Job {
    request: SpawnRequest,
    runtime: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Spawns processes from one long-lived thread, with a parent-death signal.
#[derive(Debug)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
}

impl Spawner {
    /// The process-wide spawner (its thread starts on first use and never exits).
    ///
    /// # Panics
    /// Never in practice: only if the OS refuses to create the one spawner thread, in
    /// which case nothing could be spawned anyway.
    pub fn global() -> &'static Spawner {
        static GLOBAL: OnceLock<Spawner> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let (jobs, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("vmkit-spawner".into())
                .spawn(move || {
                    // Runs until the process exits: every sender lives in a `static`.
                    while let Ok(job) = rx.recv() {
                        let _enter = job.runtime.enter();
                        let result = spawn_here(job.request);
                        let _ = job.reply.send(result);
                    }
                });
            if let Err(e) = spawned {
                // Without the spawner thread no VM can be started at all; there is no
                // caller to hand an error to from a `static` initialiser.
                #[allow(clippy::panic)]
                {
                    panic!("vmkit-linux: cannot start the spawner thread: {e}");
                }
            }
            Spawner { jobs }
        })
    }

    /// Spawns the request's command on the spawner thread and returns the child, whose
    /// `wait` runs on the caller's tokio runtime.
    ///
    /// # Errors
    /// The spawn's own error (binary missing, permission, …).
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub async fn spawn(&self, request: SpawnRequest) -> io::Result<Child> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            runtime: Handle::current(),
            reply,
        };
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("the vmkit spawner thread is gone"))?;
        // The thread answers every job it receives: spawn returns promptly (fork+exec).
        rx.await
            .map_err(|_| io::Error::other("the vmkit spawner thread dropped the request"))?
    }
}

/// Spawns on the current thread with the parent-death signal and the kept fds.
fn spawn_here(request: SpawnRequest) -> io::Result<Child> {
    let SpawnRequest {
        mut command,
        keep_fds,
    } = request;
    let parent = libc_pid(std::process::id());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, fcntl); it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody will send the
            // signal, so do not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            for &fd in &keep_fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn()
}

fn libc_pid(pid: u32) -> libc::pid_t {
    // Linux pids fit in pid_t (at most 2^22).
    libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::process::Stdio;
    use std::time::Duration;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd
    }

    #[tokio::test]
    async fn the_child_is_ours_even_though_another_thread_forked_it() {
        // (That it dies with us is proven end to end by vmkit-qemu's orphan test, which
        // kills a host process and checks its QEMU is gone.)
        let child = Spawner::global()
            .spawn(SpawnRequest::new(sh("echo $PPID")))
            .await
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        let ppid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(ppid, std::process::id());
    }

    #[tokio::test]
    async fn kept_fds_are_inherited_and_others_are_not() {
        let kept = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let script = format!(
            "[ -e /proc/self/fd/{} ] && echo kept; [ -e /proc/self/fd/{} ] && echo leaked; true",
            kept.as_raw_fd(),
            other.as_raw_fd()
        );
        let child = Spawner::global()
            .spawn(SpawnRequest::new(sh(&script)).keep_fd(kept.as_raw_fd()))
            .await
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    }

    #[tokio::test]
    async fn a_missing_binary_is_an_error_not_a_panic() {
        let err = Spawner::global()
            .spawn(SpawnRequest::new(Command::new("/nonexistent/qemu")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spawns_from_many_tasks_at_once_all_succeed() {
        let mut tasks = Vec::new();
        for i in 0..16 {
            tasks.push(tokio::spawn(async move {
                let child = Spawner::global()
                    .spawn(SpawnRequest::new(sh(&format!("echo {i}"))))
                    .await
                    .unwrap();
                let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
                    .await
                    .unwrap()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u32>()
                    .unwrap()
            }));
        }
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..16).collect::<Vec<_>>());
    }
}
