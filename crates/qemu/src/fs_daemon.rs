//! [`FsDaemon`]: the virtiofsd of one virtio-fs share. Spawned before QEMU (a cold
//! share) or before `device_add` (a hot one), ready once its vhost-user socket exists,
//! watched while it runs — an exit nobody asked for is reported, so the VM can say
//! which share broke — and killed with its share or its VM, its socket removed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use vmkit_core::{Error as CoreError, ShareConfig};

use crate::error::Error;
use crate::process::{Process, tail};

/// How many lines of the daemon's log go into an error.
const LOG_LINES: usize = 8;
/// How long the daemon may take to die after SIGKILL.
const REAP: Duration = Duration::from_secs(5);

/// How to run one virtiofsd.
#[derive(Debug, Clone)]
pub(crate) struct DaemonLaunch {
    /// The binary.
    pub(crate) binary: PathBuf,
    /// Its arguments (see the share mapping's `virtiofsd_args`).
    pub(crate) args: Vec<OsString>,
    /// The vhost-user socket it serves (a stale file there is removed first).
    pub(crate) socket: PathBuf,
    /// Its log.
    pub(crate) log: PathBuf,
}

/// A running virtiofsd.
#[derive(Debug)]
pub(crate) struct FsDaemon {
    process: Arc<Process>,
    socket: PathBuf,
    /// Set before vmkit kills it, so its exit is not reported as a failure.
    stopping: Arc<AtomicBool>,
}

impl FsDaemon {
    /// Spawns virtiofsd for `share` as `launch` says and waits until it serves, at
    /// most until `deadline`. Once it runs, an exit vmkit did not ask for calls `on_exit` with how
    /// it ended.
    ///
    /// # Errors
    /// `Backend` for the binary not runnable or the daemon exiting first (with its
    /// log's last lines); `Timeout` past `deadline`. Each names `op`.
    pub(crate) async fn spawn(
        op: &str,
        share: &ShareConfig,
        launch: DaemonLaunch,
        deadline: Instant,
        on_exit: impl FnOnce(String) + Send + 'static,
    ) -> vmkit_core::Result<FsDaemon> {
        let DaemonLaunch {
            binary,
            args,
            socket,
            log: log_path,
        } = launch;
        remove_if_present(&socket);
        remove_if_present(&pid_file(&socket));
        let log = vmkit_core::state_dir::create_private_file(&log_path)
            .map_err(|e| CoreError::io(format!("{op}: create {}", log_path.display()), e))?;
        let process = Process::spawn(&binary, args, log, &[])
            .await
            .map_err(|e| match e {
                Error::Spawn { binary, source } => Error::ShareDaemonSpawn {
                    share: share.id.clone(),
                    binary,
                    source,
                },
                other => other,
            })
            .map_err(|e| CoreError::backend(op.to_owned(), e))?;
        let daemon = FsDaemon {
            process: Arc::new(process),
            socket,
            stopping: Arc::new(AtomicBool::new(false)),
        };
        daemon.ready(op, share, &log_path, deadline).await?;
        daemon.watch(on_exit);
        Ok(daemon)
    }

    /// Waits for the socket; the daemon's exit or the deadline first is an error (and
    /// the daemon, dropped by the caller, is killed).
    async fn ready(
        &self,
        op: &str,
        share: &ShareConfig,
        log_path: &Path,
        deadline: Instant,
    ) -> vmkit_core::Result<()> {
        let began = Instant::now();
        match tokio::time::timeout_at(deadline, self.process.until_file(&self.socket)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(exit)) => {
                let exited = Error::ShareDaemonExited {
                    share: share.id.clone(),
                    status: exit.to_string(),
                    log: tail(log_path, LOG_LINES).await,
                };
                Err(CoreError::backend(op.to_owned(), exited))
            }
            Err(_) => Err(CoreError::Timeout {
                op: format!(
                    "{op}: virtiofsd for share {} to serve {}",
                    share.id,
                    self.socket.display()
                ),
                after: began.elapsed(),
            }),
        }
    }

    /// Reports an exit nobody asked for to `on_exit`.
    fn watch(&self, on_exit: impl FnOnce(String) + Send + 'static) {
        let process = Arc::clone(&self.process);
        let stopping = Arc::clone(&self.stopping);
        tokio::spawn(async move {
            let exit = process.wait().await;
            if !stopping.load(Ordering::Acquire) {
                on_exit(format!("virtiofsd (pid {}) exited: {exit}", process.pid()));
            }
        });
    }

    /// The daemon's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills the daemon, waits for it to be reaped and removes its socket.
    pub(crate) async fn stop(self) {
        self.stopping.store(true, Ordering::Release);
        self.process.signal(libc::SIGKILL);
        if self.process.wait_timeout(REAP).await.is_none() {
            tracing::error!(
                pid = self.pid(),
                "virtiofsd not reaped {REAP:?} after SIGKILL"
            );
        }
        // Drop removes the socket.
    }
}

impl Drop for FsDaemon {
    fn drop(&mut self) {
        // Without waiting: the process's own task reaps it.
        self.stopping.store(true, Ordering::Release);
        self.process.signal(libc::SIGKILL);
        remove_if_present(&self.socket);
        remove_if_present(&pid_file(&self.socket));
    }
}

/// The pid file virtiofsd keeps beside its socket (`<socket>.pid`).
fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

fn remove_if_present(path: &Path) {
    crate::host::remove_if_present(path, "a virtiofsd socket or pid file");
}
