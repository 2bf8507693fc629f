//! [`Process`]: the running QEMU. One supervisor task owns the child: it reaps it the
//! moment it exits and is the only sender of signals, so a signal can never reach a
//! reused pid. Dropping the last handle kills the process.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use crate::error::Error;
use crate::host;

/// How the process ended.
/// `Default` (neither) is an exit whose status could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProcessExit {
    /// Its exit code, when it exited.
    pub(crate) code: Option<i32>,
    /// The signal that killed it, when one did.
    pub(crate) signal: Option<i32>,
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "killed by signal {signal}"),
            (None, None) => f.write_str("exited"),
        }
    }
}

/// A spawned QEMU.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    signals: mpsc::UnboundedSender<i32>,
    exit: watch::Receiver<Option<ProcessExit>>,
}

impl Process {
    /// Spawns `binary` with `args` (stdin and stdout closed, stderr to `stderr`), dying
    /// with this process, inheriting `keep_fds`.
    ///
    /// # Errors
    /// [`Error::Spawn`] (binary missing, not executable, …).
    pub(crate) async fn spawn(
        binary: &Path,
        args: Vec<OsString>,
        stderr: std::fs::File,
        keep_fds: &[i32],
    ) -> Result<Process, Error> {
        Self::spawn_with_env(binary, args, stderr, keep_fds, &[]).await
    }

    /// [`Process::spawn`] with `env` added to the inherited environment.
    ///
    /// # Errors
    /// As [`Process::spawn`].
    pub(crate) async fn spawn_with_env(
        binary: &Path,
        args: Vec<OsString>,
        stderr: std::fs::File,
        keep_fds: &[i32],
        env: &[(&str, &str)],
    ) -> Result<Process, Error> {
        let mut command = Command::new(binary);
        command
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let spawn_error = |source| Error::Spawn {
            binary: binary.to_owned(),
            source,
        };
        let mut child = host::spawn(command, keep_fds).await.map_err(spawn_error)?;
        let pid = child
            .id()
            .ok_or_else(|| spawn_error(std::io::Error::other("the child has no pid")))?;
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<i32>();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let mut signals_open = true;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    signal = signal_rx.recv(), if signals_open => match signal {
                        // Not reaped yet (we own the child and are not in wait()), so
                        // the pid is still this process.
                        Some(signal) => {
                            if let Err(e) = host::send_signal(pid, signal) {
                                tracing::debug!(pid, signal, error = %e, "signal not delivered");
                            }
                        }
                        None => {
                            // Every handle is gone: nobody will stop it any more.
                            signals_open = false;
                            let _ = child.start_kill();
                        }
                    },
                }
            };
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    ProcessExit {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "waiting for QEMU failed");
                    ProcessExit::default()
                }
            };
            tracing::debug!(pid, %exit, "QEMU exited");
            exit_tx.send_replace(Some(exit));
        });
        Ok(Process { pid, signals, exit })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` unless the process has exited.
    pub(crate) fn signal(&self, signal: i32) {
        let _ = self.signals.send(signal);
    }

    /// How it ended, once it has (and has been reaped).
    pub(crate) fn exited(&self) -> Option<ProcessExit> {
        *self.exit.borrow()
    }

    /// Waits until it has exited and been reaped. Unbounded: callers put a deadline on it.
    pub(crate) async fn wait(&self) -> ProcessExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.unwrap_or_default(),
            // The supervisor always sends before it ends; if it was dropped (runtime
            // shutting down), the process was killed with it.
            Err(_) => ProcessExit {
                code: None,
                signal: Some(libc::SIGKILL),
            },
        }
    }

    /// Waits until the file at `path` exists (a daemon's socket, made once it serves)
    /// and returns its metadata, polling with a backoff up to 20 ms; or how the process
    /// ended, if it ends first. Unbounded: callers put a deadline on it.
    pub(crate) async fn until_file(&self, path: &Path) -> Result<std::fs::Metadata, ProcessExit> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Ok(meta) = tokio::fs::metadata(path).await {
                return Ok(meta);
            }
            if let Some(exit) = self.exited() {
                return Err(exit);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Waits at most `timeout` for the exit.
    pub(crate) async fn wait_timeout(&self, timeout: Duration) -> Option<ProcessExit> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }
}

/// The last `max_lines` lines of the file at `path` (at most 64 KiB read), for errors;
/// read on the blocking pool, off the runtime's threads.
pub(crate) async fn tail(path: &Path, max_lines: usize) -> String {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || tail_now(&path, max_lines))
        .await
        .unwrap_or_default()
}

/// [`tail`], on the calling thread.
fn tail_now(path: &Path, max_lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> std::fs::File {
        std::fs::File::create("/dev/null").unwrap()
    }

    #[tokio::test]
    async fn exit_code_and_signal_are_reported() {
        let p = Process::spawn(
            Path::new("/bin/sh"),
            vec!["-c".into(), "exit 3".into()],
            null(),
            &[],
        )
        .await
        .unwrap();
        let exit = p.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert_eq!(exit.code, Some(3));
        assert_eq!(exit.to_string(), "exit code 3");

        let p = Process::spawn(Path::new("/bin/sleep"), vec!["30".into()], null(), &[])
            .await
            .unwrap();
        assert!(p.exited().is_none());
        p.signal(libc::SIGTERM);
        let exit = p.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        assert_eq!(exit.to_string(), "killed by signal 15");
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_and_reaps() {
        let p = Process::spawn(Path::new("/bin/sleep"), vec!["30".into()], null(), &[])
            .await
            .unwrap();
        let pid = p.pid();
        let mut exit = p.exit.clone();
        drop(p);
        tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} not reaped"
        );
    }

    #[tokio::test]
    async fn a_missing_binary_is_a_spawn_error_naming_it() {
        let err = Process::spawn(Path::new("/nonexistent/qemu"), vec![], null(), &[])
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "spawn /nonexistent/qemu: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail_now(&path, 2), "c\nd");
        assert_eq!(tail_now(&dir.path().join("missing"), 2), "");
    }
}
