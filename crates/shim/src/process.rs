//! One process of a container — its init (`crun run`) or an exec (`crun exec`) —
//! through the guest agent: started, its stdio copied to containerd's FIFOs, its exit
//! recorded once its output has drained.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use vmkit_process::{Command, ExitStatus, Process};

use crate::error::{Error, Result};
use crate::sandbox::{CALL, Sandbox};
use crate::stdio::{self, StdinPump, StdioPaths, Tail};

/// How long crun may take from spawned to the container process running.
const RUNNING: Duration = Duration::from_secs(60);

/// How a process ended, for containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exit {
    /// The code containerd reports: the exit code, or 128 + the signal.
    pub(crate) code: u32,
    pub(crate) at: SystemTime,
}

impl Exit {
    pub(crate) fn of(status: ExitStatus) -> Exit {
        let code = match status {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        };
        Exit {
            code: u32::try_from(code).unwrap_or(255),
            at: SystemTime::now(),
        }
    }
}

/// Where a process is in its life, as containerd's `State` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Default)]
struct Running {
    process: Option<Arc<Process>>,
    /// The container process's pid in the guest (crun's child, not crun).
    pid: u32,
    stdin: Option<StdinPump>,
}

/// A container process.
pub(crate) struct Proc {
    /// The exec id; empty for the init process.
    pub(crate) exec_id: String,
    pub(crate) stdio: StdioPaths,
    command: Command,
    pid_file: PathBuf,
    /// The end of what it wrote where containerd gave no FIFO.
    tail: Tail,
    running: Mutex<Running>,
    exit: watch::Sender<Option<Exit>>,
}

impl Proc {
    /// A process not started yet, which will run `command` in the guest.
    /// `pid_file` is where crun writes (through the share) the container process's
    /// pid in the guest once it runs: `command` names it as `--pid-file`.
    pub(crate) fn new(
        exec_id: &str,
        stdio: StdioPaths,
        command: Command,
        pid_file: PathBuf,
    ) -> Proc {
        let command = if stdio.terminal {
            command.tty(24, 80)
        } else {
            command
        };
        Proc {
            exec_id: exec_id.to_owned(),
            stdio,
            command,
            pid_file,
            tail: Tail::default(),
            running: Mutex::new(Running::default()),
            exit: watch::channel(None).0,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        // A poisoned lock only means a panic elsewhere; the data is still whole.
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn status(&self) -> Status {
        if self.exit.borrow().is_some() {
            Status::Stopped
        } else if self.running().process.is_some() {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// Its pid in the guest (0 before it started).
    pub(crate) fn pid(&self) -> u32 {
        self.running().pid
    }

    pub(crate) fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Starts it; `on_exit` runs once it ended and its output reached the FIFOs.
    pub(crate) async fn start<F>(self: &Arc<Self>, sandbox: &Sandbox, on_exit: F) -> Result<u32>
    where
        F: FnOnce(Exit) + Send + 'static,
    {
        if self.status() != Status::Created {
            return Err(Error::state(
                format!("start process {:?}", self.exec_id),
                "it was started already",
            ));
        }
        let mut process = sandbox.spawn(&self.command).await?;
        let mut outputs = Vec::new();
        let mut stdin = None;
        if let Some(tty) = process.take_tty() {
            let (reader, writer) = tokio::io::split(tty);
            outputs.push(stdio::output_to(reader, &self.stdio.stdout, &self.tail)?);
            if !self.stdio.stdin.is_empty() {
                stdin = Some(StdinPump::start(&self.stdio.stdin, writer)?);
            }
        } else {
            if let Some(out) = process.take_stdout() {
                outputs.push(stdio::output_to(out, &self.stdio.stdout, &self.tail)?);
            }
            if let Some(err) = process.take_stderr() {
                outputs.push(stdio::output_to(err, &self.stdio.stderr, &self.tail)?);
            }
            if let Some(input) = process.take_stdin() {
                if self.stdio.stdin.is_empty() {
                    drop(input); // closes it: the process reads end of file
                } else {
                    stdin = Some(StdinPump::start(&self.stdio.stdin, input)?);
                }
            }
        }
        let process = Arc::new(process);
        {
            let mut running = self.running();
            running.process = Some(process.clone());
            running.stdin = stdin;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let exit = wait(&process).await;
            // The exit is reported only after the output has drained.
            for output in outputs {
                let _ = output.await;
            }
            me.exit.send_replace(Some(exit));
            on_exit(exit);
        });
        let pid = self.until_running().await?;
        self.running().pid = pid;
        Ok(pid)
    }

    /// Waits until crun has the container process running: its pid file appears.
    async fn until_running(&self) -> Result<u32> {
        let op = format!("start process {:?}", self.exec_id);
        let until = Instant::now() + RUNNING;
        loop {
            if let Ok(text) = tokio::fs::read_to_string(&self.pid_file).await {
                // Written by crun in the guest: a number, or the guest is lying.
                match text.trim().parse::<u32>() {
                    Ok(pid) if pid > 0 => return Ok(pid),
                    _ if text.ends_with('\n') || text.len() > 10 => {
                        return Err(Error::state(op, format!("bad pid file {text:?}")));
                    }
                    _ => {} // being written
                }
            }
            if let Some(exit) = self.exit() {
                let said = self.tail.text();
                let why = if said.is_empty() {
                    "its stderr has why".to_owned()
                } else {
                    said
                };
                return Err(Error::state(
                    op,
                    format!(
                        "crun ended with code {} before the process ran: {why}",
                        exit.code
                    ),
                ));
            }
            if Instant::now() > until {
                return Err(Error::state(op, format!("not running after {RUNNING:?}")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until it ended.
    pub(crate) async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self, so this cannot happen while self exists.
                return Exit::of(ExitStatus::Code(255));
            }
        }
    }

    /// Sends `signal` to the guest process (crun passes it on to the container's).
    pub(crate) async fn signal(&self, signal: u32) -> Result<()> {
        let op = format!("signal {signal} to process {:?}", self.exec_id);
        let process = self.running().process.clone();
        match process {
            Some(p) if self.exit().is_none() => {
                let signal =
                    i32::try_from(signal).map_err(|_| Error::bad(&op, "no such signal"))?;
                p.kill(signal, CALL).await.map_err(Error::guest(op))
            }
            _ => Err(Error::not_found(op, "process already finished")),
        }
    }

    /// Marks a process that never started as ended (killed before `Start`).
    pub(crate) fn end_unstarted(&self, signal: u32) -> Option<Exit> {
        if self.status() != Status::Created {
            return None;
        }
        let exit = Exit {
            code: 128 + signal,
            at: SystemTime::now(),
        };
        self.exit.send_replace(Some(exit));
        Some(exit)
    }

    /// Resizes its TTY.
    pub(crate) async fn resize(&self, cols: u32, rows: u32) -> Result<()> {
        // A terminal of unknown size reports 0x0: nothing to pass on.
        if cols == 0 || rows == 0 {
            return Ok(());
        }
        let op = format!("resize the tty of process {:?}", self.exec_id);
        let process = self.running().process.clone();
        let process = process.ok_or_else(|| Error::state(&op, "it has not started"))?;
        let (rows, cols) = (
            u16::try_from(rows).map_err(|_| Error::bad(&op, "too many rows"))?,
            u16::try_from(cols).map_err(|_| Error::bad(&op, "too many columns"))?,
        );
        process
            .resize(rows, cols, CALL)
            .await
            .map_err(Error::guest(op))
    }

    /// Closes its stdin once what containerd wrote has been passed on.
    pub(crate) fn close_stdin(&self) {
        if let Some(pump) = self.running().stdin.take() {
            pump.close();
        }
    }
}

/// The process's exit: waits in long steps (a container may run for days), each a
/// deadline of its own.
async fn wait(process: &Process) -> Exit {
    const STEP: Duration = Duration::from_secs(3600);
    loop {
        match process.wait(STEP).await {
            Ok(status) => return Exit::of(status),
            Err(vmkit_process::Error::Timeout { .. }) => continue,
            Err(e) => {
                log::warn!("wait for process {}: {e}", process.id());
                // The agent or the VM is gone: the process is too.
                return Exit::of(ExitStatus::Signal(9));
            }
        }
    }
}
