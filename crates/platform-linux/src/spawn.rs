//! [`Spawner`]: spawns child processes that cannot outlive this process.
//!
//! Each child gets `PR_SET_PDEATHSIG` = `SIGKILL`. Linux sends that signal when the
//! *thread* that forked the child exits, not the process: a child forked by a tokio
//! worker or blocking-pool thread would be killed when the pool retires that thread
//! (after 10 s idle, by default). So every spawn happens on one dedicated thread that
//! lives as long as the process; callers hand it their command and get the child back.
//!
//! That thread is every child's life line, so nothing a caller does may end it:
//! - it runs its own tokio runtime (IO and time drivers on, never dropped), so a
//!   child's `wait` and pipes work whatever runtime the caller has, even one built
//!   without the IO driver, and orphaned children are reaped there;
//! - each job runs under `catch_unwind`: a job that panics is that job's error only
//!   ([`io::ErrorKind::Other`], naming the program and the panic), and the thread takes
//!   the next job.

use std::io;
use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

/// Whether a spawned child dies with this process (the parent-death signal sees to it).
pub const CHILDREN_DIE_WITH_PARENT: bool = true;

/// What to spawn, and how.
#[derive(Debug)]
pub struct SpawnRequest {
    command: Command,
    keep_fds: Vec<RawFd>,
}

impl SpawnRequest {
    /// Spawn `command` as it is set up (args, env, stdio); the spawner adds the
    /// parent-death signal and a umask of 077 (whatever the child creates, sockets and
    /// logs, is its owner's alone, whatever this process's umask is).
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
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Spawns processes from one long-lived thread, with a parent-death signal.
#[derive(Debug)]
pub struct Spawner {
    /// `Err` when the spawner thread or its runtime could not be created: every spawn
    /// then fails with this message.
    jobs: Result<mpsc::UnboundedSender<Job>, String>,
}

impl Spawner {
    /// The process-wide spawner (its thread starts on first use and never exits).
    pub fn global() -> &'static Spawner {
        static GLOBAL: OnceLock<Spawner> = OnceLock::new();
        GLOBAL.get_or_init(|| Spawner {
            jobs: start_thread(),
        })
    }

    /// Spawns the request's command on the spawner thread and returns the child. Works
    /// from any async context: the child is tied to the spawner's own runtime, not the
    /// caller's.
    ///
    /// # Errors
    /// The spawn's own error (binary missing, permission, …); [`io::ErrorKind::Other`]
    /// when the spawn panicked or the spawner could not be started.
    pub async fn spawn(&self, request: SpawnRequest) -> io::Result<Child> {
        let jobs = self.jobs.as_ref().map_err(|e| {
            io::Error::other(format!("the vmkit spawner thread could not start: {e}"))
        })?;
        let (reply, rx) = oneshot::channel();
        jobs.send(Job { request, reply })
            .map_err(|_| io::Error::other("the vmkit spawner thread is gone"))?;
        // The thread answers every job it receives, also one whose spawn panicked:
        // spawn returns promptly (fork+exec).
        rx.await
            .map_err(|_| io::Error::other("the vmkit spawner thread dropped the request"))?
    }
}

/// Starts the spawner thread with its own current-thread runtime. The runtime is driven
/// for as long as the thread waits for jobs, which is for ever: every sender lives in
/// a `static`.
fn start_thread() -> Result<mpsc::UnboundedSender<Job>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build its tokio runtime: {e}"))?;
    let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
    std::thread::Builder::new()
        .name("vmkit-spawner".into())
        .spawn(move || {
            runtime.block_on(async move {
                while let Some(job) = rx.recv().await {
                    let Job { request, reply } = job;
                    let program = request.command.as_std().get_program().to_owned();
                    let result = catch_unwind(AssertUnwindSafe(|| spawn_here(request)))
                        .unwrap_or_else(|panic| {
                            Err(io::Error::other(format!(
                                "spawning {} panicked: {}",
                                program.to_string_lossy(),
                                panic_message(panic.as_ref())
                            )))
                        });
                    let _ = reply.send(result);
                }
            });
        })
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    Ok(jobs)
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-text panic".to_owned()
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
    // async-signal-safe functions (prctl, umask, getppid, fcntl); it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::umask(0o077);
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

    /// Issue 12, defect 3: a spawn from a runtime built without the IO driver used to
    /// panic the spawner thread, and every child it had forked died by the parent-death
    /// signal. Now the spawn works, the earlier child lives on, and so do later spawns.
    #[test]
    fn a_caller_runtime_without_io_neither_fails_nor_kills_other_children() {
        let healthy = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut sleeper = healthy
            .block_on(Spawner::global().spawn(SpawnRequest::new(sh("sleep 30"))))
            .unwrap();
        let sleeper_pid = sleeper.id().unwrap();

        let no_io = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let out = no_io.block_on(async {
            let child = Spawner::global()
                .spawn(SpawnRequest::new(sh("echo from-a-runtime-without-io")))
                .await
                .expect("a runtime without the IO driver can spawn");
            let pid = child.id().unwrap();
            let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
                .await
                .expect("the child's wait is driven by the spawner's runtime")
                .unwrap();
            (pid, out)
        });
        assert_eq!(
            String::from_utf8_lossy(&out.1.stdout),
            "from-a-runtime-without-io\n"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{}", out.0)).exists(),
            "the finished child was reaped (no zombie)"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            std::path::Path::new(&format!("/proc/{sleeper_pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{sleeper_pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z "),
            "the earlier child still runs"
        );
        // And the spawner still serves everyone.
        let again = healthy
            .block_on(async {
                let c = Spawner::global()
                    .spawn(SpawnRequest::new(sh("echo again")))
                    .await?;
                c.wait_with_output().await
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&again.stdout), "again\n");
        sleeper.start_kill().unwrap();
    }

    #[test]
    fn children_create_files_for_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("made-by-child");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = rt
            .block_on(async {
                let c = Spawner::global()
                    .spawn(SpawnRequest::new(sh(&format!(
                        "umask; : > {}",
                        file.display()
                    ))))
                    .await?;
                c.wait_with_output().await
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "0077");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
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
