//! The agent's process table: every process the process service spawned, by id, from
//! its spawn until its exit has been delivered; then a bounded record of how it ended.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::AsyncRead;
use vmkit_platform::child::Exit;
use vmkit_proto::StdioStream;

use super::input::Input;
use super::output::Output;
use super::reaper::{ExitWatch, Reaper};
use super::spawn::{SpawnError, Spec, Stdio3, start, tty_size};

/// How many ended processes' statuses are kept for a second `WaitProcess`.
const ENDED_KEPT: usize = 1024;

/// Why a process call failed; each maps to one TTRPC code.
#[derive(Debug)]
pub(crate) enum ProcError {
    /// A malformed request (`INVALID_ARGUMENT`).
    Invalid(String),
    /// No such program, cwd or process (`NOT_FOUND`).
    NotFound(String),
    /// The process cannot do that now: it has ended, it has no TTY
    /// (`FAILED_PRECONDITION`).
    Precondition(String),
    /// Too many processes (`RESOURCE_EXHAUSTED`).
    Exhausted(String),
    /// The system refused (`INTERNAL`).
    Failed(String),
}

impl ProcError {
    /// The reason, whatever the kind.
    pub(crate) fn into_reason(self) -> String {
        match self {
            ProcError::Invalid(r)
            | ProcError::NotFound(r)
            | ProcError::Precondition(r)
            | ProcError::Exhausted(r)
            | ProcError::Failed(r) => r,
        }
    }
}

impl From<SpawnError> for ProcError {
    fn from(e: SpawnError) -> ProcError {
        match e {
            SpawnError::Invalid(r) => ProcError::Invalid(r),
            SpawnError::NotFound(r) => ProcError::NotFound(r),
            SpawnError::Failed(r) => ProcError::Failed(r),
        }
    }
}

/// A process's output streams.
#[derive(Debug)]
enum Outputs {
    Pipes {
        stdout: Arc<Output>,
        stderr: Arc<Output>,
    },
    Tty(Arc<Output>),
}

impl Outputs {
    fn all(&self) -> Vec<&Arc<Output>> {
        match self {
            Outputs::Pipes { stdout, stderr } => vec![stdout, stderr],
            Outputs::Tty(tty) => vec![tty],
        }
    }
}

/// One live process.
#[derive(Debug)]
pub(crate) struct Entry {
    id: u64,
    pid: u32,
    spec: Spec,
    /// The TTY's primary side, for resizes.
    tty: Option<OwnedFd>,
    input: Input,
    outputs: Outputs,
    exit: ExitWatch,
}

/// What the host sees of a process in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    pub(crate) id: u64,
    pub(crate) pid: u32,
    pub(crate) argv: Vec<String>,
    pub(crate) tag: String,
    pub(crate) tty: bool,
    pub(crate) exited: bool,
    pub(crate) buffered: u64,
}

/// A stream of a process, ready to be carried on a host connection.
pub(crate) enum Attached {
    /// Write this output to the connection (from the attachment).
    Output(Arc<Output>, u64),
    /// Feed the connection's bytes to this input.
    Input(Arc<Entry>),
    /// Both: a TTY.
    Tty(Arc<Entry>, Arc<Output>, u64),
}

impl Entry {
    /// The process's input.
    pub(crate) fn input(&self) -> &Input {
        &self.input
    }
}

/// The table; see the module docs.
#[derive(Debug)]
pub(crate) struct Processes {
    reaper: Reaper,
    max: usize,
    buffer: usize,
    next_id: AtomicU64,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    live: HashMap<u64, Arc<Entry>>,
    ended: VecDeque<(u64, Exit)>,
}

/// Process `id` ended with `exit`: why a call that needs it running is refused.
fn ended(id: u64, exit: Exit) -> ProcError {
    let how = match exit {
        Exit::Code(code) => format!("exit code {code}"),
        Exit::Signal(signal) => format!("signal {signal}"),
    };
    ProcError::Precondition(format!("process {id} has ended ({how})"))
}

/// What the table knows of an id.
enum Known {
    Live(Arc<Entry>),
    Ended(Exit),
}

impl Processes {
    /// A table of at most `max` live processes, each output buffered up to `buffer`
    /// bytes, spawning through `reaper`.
    pub(crate) fn new(reaper: Reaper, max: usize, buffer: usize) -> Processes {
        Processes {
            reaper,
            max,
            buffer,
            next_id: AtomicU64::new(1),
            table: Mutex::new(Table::default()),
        }
    }

    /// The reaper processes are spawned through (the exec paths use it too).
    pub(crate) fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Inserts and removes are single calls: a panic cannot leave it torn.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live entry `id`, or how it ended (among the last [`ENDED_KEPT`]).
    fn known(&self, id: u64) -> Result<Known, ProcError> {
        let table = self.lock();
        if let Some(entry) = table.live.get(&id) {
            return Ok(Known::Live(Arc::clone(entry)));
        }
        match table.ended.iter().find(|(i, _)| *i == id) {
            Some((_, exit)) => Ok(Known::Ended(*exit)),
            None => Err(ProcError::NotFound(format!("no process {id}"))),
        }
    }

    /// The live entry `id`, or why there is none.
    fn entry(&self, id: u64) -> Result<Arc<Entry>, ProcError> {
        match self.known(id)? {
            Known::Live(entry) => Ok(entry),
            Known::Ended(exit) => Err(ended(id, exit)),
        }
    }

    /// Starts a process and its output pumps.
    pub(crate) fn spawn(&self, spec: Spec) -> Result<(u64, u32), ProcError> {
        if self.lock().live.len() >= self.max {
            return Err(ProcError::Exhausted(format!(
                "the agent holds {} processes, its limit",
                self.max
            )));
        }
        let started = start(&spec, &self.reaper)?;
        let (input, outputs, tty) = match self.stdio(started.stdio) {
            Ok(set_up) => set_up,
            Err(e) => {
                // Nobody could ever reach it: it must not run on.
                let _ = self.reaper.signal(started.pid, libc::SIGKILL);
                return Err(e);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            id,
            pid: started.pid,
            spec,
            tty,
            input,
            outputs,
            exit: started.exit,
        });
        self.lock().live.insert(id, entry);
        Ok((id, started.pid))
    }

    /// A started process's input and outputs (its output pumps running).
    fn stdio(&self, stdio: Stdio3) -> Result<(Input, Outputs, Option<OwnedFd>), ProcError> {
        match stdio {
            Stdio3::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let out = Arc::new(Output::new(self.buffer));
                let err = Arc::new(Output::new(self.buffer));
                pump(&out, stdout);
                pump(&err, stderr);
                let input = Input::new(Box::new(stdin), false);
                let outputs = Outputs::Pipes {
                    stdout: out,
                    stderr: err,
                };
                Ok((input, outputs, None))
            }
            Stdio3::Tty(primary) => {
                let (screen, keys) = super::tty::ends(&primary)
                    .map_err(|e| ProcError::Failed(format!("set up the tty: {e}")))?;
                let out = Arc::new(Output::new(self.buffer));
                pump(&out, screen);
                Ok((
                    Input::new(Box::new(keys), true),
                    Outputs::Tty(out),
                    Some(primary),
                ))
            }
        }
    }

    /// Waits until process `id` has exited and its output is delivered; its status
    /// (again, for a process that was waited for already).
    pub(crate) async fn wait(&self, id: u64) -> Result<Exit, ProcError> {
        let entry = match self.known(id)? {
            Known::Live(entry) => entry,
            Known::Ended(exit) => return Ok(exit),
        };
        let mut exit = entry.exit.clone();
        let status = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ProcError::Failed(format!("process {id}: its reaper is gone")))?
            .unwrap_or(Exit::Code(-1));
        for output in entry.outputs.all() {
            output.wait_delivered().await;
        }
        let mut table = self.lock();
        if table.live.remove(&id).is_some() {
            if table.ended.len() >= ENDED_KEPT {
                table.ended.pop_front();
            }
            table.ended.push_back((id, status));
        }
        Ok(status)
    }

    /// Sends `signal` to process `id`.
    pub(crate) fn signal(&self, id: u64, signal: i32) -> Result<(), ProcError> {
        if !(1..=64).contains(&signal) {
            return Err(ProcError::Invalid(format!("signal {signal} is not 1..=64")));
        }
        let entry = self.entry(id)?;
        let exited = *entry.exit.borrow();
        if let Some(exit) = exited {
            return Err(ended(id, exit));
        }
        match self.reaper.signal(entry.pid, signal) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ProcError::Precondition(format!("process {id} has ended"))),
            Err(e) => Err(ProcError::Failed(format!(
                "signal {signal} to process {id} (pid {}): {e}",
                entry.pid
            ))),
        }
    }

    /// Resizes process `id`'s TTY.
    pub(crate) fn resize(&self, id: u64, rows: u32, cols: u32) -> Result<(), ProcError> {
        let entry = self.entry(id)?;
        let Some(tty) = &entry.tty else {
            return Err(ProcError::Precondition(format!("process {id} has no TTY")));
        };
        let (rows, cols) = tty_size(rows, cols).map_err(ProcError::Invalid)?;
        vmkit_platform::child::set_window_size(tty.as_fd(), rows, cols)
            .map_err(|e| ProcError::Failed(format!("resize the tty of process {id}: {e}")))
    }

    /// Closes process `id`'s stdin.
    pub(crate) async fn close_stdin(&self, id: u64) -> Result<(), ProcError> {
        self.entry(id)?.input.close().await;
        Ok(())
    }

    /// Every live process.
    pub(crate) fn list(&self) -> Vec<Listed> {
        let mut listed: Vec<Listed> = self
            .lock()
            .live
            .values()
            .map(|e| Listed {
                id: e.id,
                pid: e.pid,
                argv: e.spec.argv.clone(),
                tag: e.spec.tag.clone(),
                tty: e.tty.is_some(),
                exited: e.exit.borrow().is_some(),
                buffered: e.outputs.all().iter().map(|o| o.held() as u64).sum(),
            })
            .collect();
        listed.sort_by_key(|l| l.id);
        listed
    }

    /// Process `id`'s `stream`, resumed at `from`. A refusal's reason does not name the
    /// attach (the stream server prefixes every one with it).
    pub(crate) fn attach(
        &self,
        id: u64,
        stream: StdioStream,
        from: u64,
    ) -> Result<Attached, ProcError> {
        let entry = self.entry(id)?;
        let resume = |output: &Arc<Output>| {
            output
                .attach(from)
                .map_err(|e| ProcError::Invalid(e.to_string()))
        };
        match (&entry.outputs, stream) {
            (Outputs::Pipes { stdout, .. }, StdioStream::Stdout) => {
                Ok(Attached::Output(Arc::clone(stdout), resume(stdout)?))
            }
            (Outputs::Pipes { stderr, .. }, StdioStream::Stderr) => {
                Ok(Attached::Output(Arc::clone(stderr), resume(stderr)?))
            }
            (Outputs::Pipes { .. }, StdioStream::Stdin) if from == 0 => {
                Ok(Attached::Input(Arc::clone(&entry)))
            }
            (Outputs::Pipes { .. }, StdioStream::Stdin) => Err(ProcError::Invalid(format!(
                "from={from}, but stdin is not resumable (from=0 only)"
            ))),
            (Outputs::Tty(tty), StdioStream::Tty) => {
                let attachment = resume(tty)?;
                Ok(Attached::Tty(
                    Arc::clone(&entry),
                    Arc::clone(tty),
                    attachment,
                ))
            }
            (Outputs::Pipes { .. }, StdioStream::Tty) => Err(ProcError::Precondition(format!(
                "process {id} has no TTY (attach stdin, stdout, stderr)"
            ))),
            (Outputs::Tty(_), _) => Err(ProcError::Precondition(format!(
                "process {id} runs on a TTY (attach tty)"
            ))),
        }
    }
}

impl Drop for Processes {
    /// The agent stops serving (in the host test mode: its fake VM is gone): its
    /// processes end with it.
    fn drop(&mut self) {
        self.reaper.kill_all();
    }
}

/// Pumps `source` into `output` on its own task (it ends at the source's end).
fn pump(output: &Arc<Output>, source: impl AsyncRead + Send + Unpin + 'static) {
    let output = Arc::clone(output);
    tokio::spawn(async move { output.pump(source).await });
}
