//! The one reaper of the agent's children.
//!
//! `tokio::process` reaps each child with its own `waitpid(pid)`, which cannot coexist
//! with an agent that reaps orphans with `waitpid(-1)` (it would steal their statuses).
//! So the agent spawns every child through [`Reaper::spawn`] and learns each exit from
//! here. In a guest the reaper collects any child (`waitpid(-1)`): the agent is a child
//! subreaper (or PID 1), so orphans its processes leave behind come to it and are
//! reaped silently. In the host test mode the agent shares its process with other code
//! (a test, a fake backend), so it reaps only the pids it spawned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use vmkit_platform::child::{Exit, reap};

/// A child's exit, once known.
pub(crate) type ExitWatch = watch::Receiver<Option<Exit>>;

/// An exit as the agent's answers carry it: `(exit_code, signal)`, the code -1 and the
/// signal set when a signal killed it.
pub(crate) fn exit_fields(exit: Exit) -> (i32, i32) {
    match exit {
        Exit::Code(code) => (code, 0),
        Exit::Signal(signal) => (-1, signal),
    }
}

/// How often the reaper looks even without a `SIGCHLD` (signals coalesce, and one
/// raised before the handler existed is not seen).
const SWEEP: Duration = Duration::from_secs(1);

/// Spawns children and reports their exits.
#[derive(Debug, Clone)]
pub(crate) struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Reap any child (in a guest), or only those in `watched`.
    any_child: bool,
    /// Held while spawning, reaping and signalling: a pid is in here from the moment
    /// it exists until it is reaped, so a signal never reaches a reused pid.
    watched: Mutex<HashMap<u32, watch::Sender<Option<Exit>>>>,
}

impl Reaper {
    /// A reaper on the current runtime; `any_child` in a guest. Its task ends once the
    /// last clone is dropped and every child it spawned has been reaped.
    pub(crate) fn start(any_child: bool) -> Reaper {
        let inner = Arc::new(Inner {
            any_child,
            watched: Mutex::new(HashMap::new()),
        });
        let mine = Arc::clone(&inner);
        let mut sigchld = signal(SignalKind::child()).ok();
        tokio::spawn(async move {
            loop {
                match sigchld.as_mut() {
                    Some(s) => {
                        let _ = tokio::time::timeout(SWEEP, s.recv()).await;
                    }
                    None => tokio::time::sleep(SWEEP / 10).await,
                }
                mine.sweep();
                if Arc::strong_count(&mine) == 1 && mine.lock().is_empty() {
                    return;
                }
            }
        });
        Reaper { inner }
    }

    /// Spawns `command` and watches its pid; the returned child must not be waited for
    /// (the reaper does it).
    ///
    /// # Errors
    /// The spawn's error.
    pub(crate) fn spawn(
        &self,
        command: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, ExitWatch)> {
        let mut watched = self.inner.lock();
        let child = command.spawn()?;
        let (tx, rx) = watch::channel(None);
        watched.insert(child.id(), tx);
        Ok((child, rx))
    }

    /// Sends `signal` to `pid` if it has not been reaped. `Ok(false)` when it has.
    ///
    /// # Errors
    /// `kill(2)`'s error.
    pub(crate) fn signal(&self, pid: u32, signal: i32) -> std::io::Result<bool> {
        let watched = self.inner.lock();
        if !watched.contains_key(&pid) {
            return Ok(false);
        }
        vmkit_platform::process::signal(pid, signal)?;
        Ok(true)
    }

    /// Kills every child still running (`SIGKILL`); the reaper reaps them.
    pub(crate) fn kill_all(&self) {
        for pid in self.inner.lock().keys() {
            let _ = vmkit_platform::process::signal(*pid, libc::SIGKILL);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, watch::Sender<Option<Exit>>>> {
        // A panic while holding it leaves the map consistent (inserts and removes are
        // single calls): go on with it.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reaps every child that has ended and tells its watcher.
    fn sweep(&self) {
        let mut watched = self.lock();
        if self.any_child {
            while let Ok(Some((pid, exit))) = reap(None) {
                if let Some(tx) = watched.remove(&pid) {
                    tx.send_replace(Some(exit));
                } // else an orphan: reaped, nothing to tell
            }
        } else {
            let pids: Vec<u32> = watched.keys().copied().collect();
            for pid in pids {
                match reap(Some(pid)) {
                    Ok(None) => {}
                    Ok(Some((_, exit))) => {
                        if let Some(tx) = watched.remove(&pid) {
                            tx.send_replace(Some(exit));
                        }
                    }
                    // Not our child after all (reaped by someone else): it is gone.
                    Err(_) => {
                        watched.remove(&pid);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exit_of(mut rx: ExitWatch) -> Exit {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("the exit is reported")
            .expect("the reaper lives");
        got.expect("some")
    }

    #[tokio::test]
    async fn exits_are_reported_with_their_code_or_signal() {
        let reaper = Reaper::start(false);
        let (_child, rx) = reaper
            .spawn(std::process::Command::new("sh").args(["-c", "exit 42"]))
            .unwrap();
        assert_eq!(exit_of(rx).await, Exit::Code(42));
        let (child, rx) = reaper
            .spawn(std::process::Command::new("sleep").arg("30"))
            .unwrap();
        assert!(reaper.signal(child.id(), libc::SIGTERM).unwrap());
        assert_eq!(exit_of(rx).await, Exit::Signal(libc::SIGTERM));
        assert!(
            !reaper.signal(child.id(), libc::SIGTERM).unwrap(),
            "a reaped pid is never signalled"
        );
    }

    #[tokio::test]
    async fn in_the_host_mode_other_children_are_left_alone() {
        let reaper = Reaper::start(false);
        let mut other = std::process::Command::new("true").spawn().unwrap();
        let (_c, rx) = reaper
            .spawn(&mut std::process::Command::new("true"))
            .unwrap();
        assert_eq!(exit_of(rx).await, Exit::Code(0));
        // The other child's status is still there for its owner.
        assert!(other.wait().unwrap().success());
    }
}
