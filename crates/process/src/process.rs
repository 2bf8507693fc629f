//! [`Processes`], the door to a guest's process service, and [`Process`], one process.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use vmkit_core::GuestCommunicator;
use vmkit_proto::agent::{
    CloseStdinRequest, ListProcessesRequest, ResizeTtyRequest, SignalProcessRequest,
    WaitProcessRequest,
};
use vmkit_proto::{AgentClient, STREAM_PORT, StdioStream, StreamHeader};

use crate::command::Command;
use crate::error::{Error, Result};
use crate::stdio::{Output, Stdin, Tty};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// It exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// A process the agent holds, as [`Processes::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The agent's id for it.
    pub id: u64,
    /// Its pid in the guest.
    pub pid: u32,
    /// Its program and arguments.
    pub argv: Vec<String>,
    /// The caller's tag ([`Command::tag`]).
    pub tag: String,
    /// It runs on a TTY.
    pub tty: bool,
    /// It has exited, and waits for its output to be read or its status to be taken.
    pub exited: bool,
    /// Output bytes the agent holds for it now (bounded: see the agent's limits).
    pub buffered_bytes: u64,
}

/// Where a reattached process's outputs resume: the [`Output::received`] (or
/// [`Tty::received`]) of the streams before the connection was lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Bytes of stdout already received.
    pub stdout: u64,
    /// Bytes of stderr already received.
    pub stderr: u64,
    /// Bytes of TTY output already received.
    pub tty: u64,
}

/// The guest's process service, through an instance's guest channel: spawn, list and
/// reattach processes. Cheap to clone.
#[derive(Clone)]
pub struct Processes {
    guest: Arc<dyn GuestCommunicator>,
}

impl std::fmt::Debug for Processes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processes").finish_non_exhaustive()
    }
}

/// `work` as `op`, failing with [`Error::Timeout`] when it outlasts `deadline`.
async fn within<T>(
    op: &str,
    deadline: Duration,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                op: op.to_owned(),
                after: deadline,
            })
        })
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Processes {
    /// The process service of the guest behind `guest` (an instance: any
    /// `Arc<dyn Instance>` coerces to it). It needs a running VM with a guest agent.
    pub fn new(guest: Arc<dyn GuestCommunicator>) -> Processes {
        Processes { guest }
    }

    /// Calls the agent as `op` within `deadline`: `call` gets the client and a context
    /// carrying the deadline.
    pub(crate) async fn call<T, F>(
        &self,
        op: &str,
        deadline: Duration,
        call: impl FnOnce(AgentClient, ttrpc::context::Context) -> F,
    ) -> Result<T>
    where
        F: Future<Output = ttrpc::Result<T>>,
    {
        within(op, deadline, async {
            let client = self.guest.client().await.map_err(|source| Error::Guest {
                op: op.to_owned(),
                source,
            })?;
            call(
                AgentClient::new(client),
                ttrpc::context::with_timeout(nanos(deadline)),
            )
            .await
            .map_err(|e| Error::from_ttrpc(op, e))
        })
        .await
    }

    /// Opens one stdio stream of process `id`, resuming at `from`.
    async fn stream(
        &self,
        id: u64,
        stream: StdioStream,
        from: u64,
        deadline: Duration,
    ) -> Result<crate::stdio::Conn> {
        let op = format!("attach {id} {}", stream.name());
        within(&op, deadline, async {
            let conn = self
                .guest
                .start_stream(STREAM_PORT)
                .await
                .map_err(|source| Error::Guest {
                    op: op.clone(),
                    source,
                })?;
            let header = StreamHeader::Attach { id, stream, from };
            vmkit_vsock::begin_stream(conn, &header, deadline, "the agent's stream port")
                .await
                .map_err(|e| Error::Agent {
                    op: op.clone(),
                    reason: e.to_string(),
                })
        })
        .await
    }

    /// Spawns `cmd` in the guest and attaches its stdio, all within `deadline`.
    ///
    /// # Errors
    /// [`Error::BadRequest`] for a malformed command (empty argv, relative cwd, a bad
    /// env entry), [`Error::NotFound`] for a program or cwd that does not exist,
    /// [`Error::Exhausted`] when the agent holds its limit of processes,
    /// [`Error::Timeout`], [`Error::Guest`] when the guest cannot be reached.
    pub async fn spawn(&self, cmd: &Command, deadline: Duration) -> Result<Process> {
        let op = format!("spawn {:?}", cmd.argv());
        let start = Instant::now();
        let req = cmd.request();
        let spawned = self
            .call(&op, deadline, |agent, ctx| async move {
                agent.spawn_process(ctx, &req).await
            })
            .await?;
        let left = deadline.saturating_sub(start.elapsed());
        let attached = self
            .attach_streams(spawned.id, cmd.has_tty(), Resume::default(), left)
            .await;
        match attached {
            Ok(streams) => Ok(self.process(spawned.id, spawned.pid, streams)),
            Err(e) => {
                // Nobody could reach its stdio: it must not run on, holding the agent's
                // buffers. Best effort, briefly.
                let _ = self.signal(spawned.id, 9, Duration::from_secs(1)).await;
                Err(e)
            }
        }
    }

    async fn attach_streams(
        &self,
        id: u64,
        tty: bool,
        resume: Resume,
        deadline: Duration,
    ) -> Result<Streams> {
        if tty {
            let conn = self
                .stream(id, StdioStream::Tty, resume.tty, deadline)
                .await?;
            return Ok(Streams::Tty(Tty::new(conn, resume.tty)));
        }
        let (stdin, stdout, stderr) = tokio::try_join!(
            self.stream(id, StdioStream::Stdin, 0, deadline),
            self.stream(id, StdioStream::Stdout, resume.stdout, deadline),
            self.stream(id, StdioStream::Stderr, resume.stderr, deadline),
        )?;
        Ok(Streams::Pipes(
            Stdin::new(stdin),
            Output::new(stdout, resume.stdout),
            Output::new(stderr, resume.stderr),
        ))
    }

    fn process(&self, id: u64, pid: u32, streams: Streams) -> Process {
        let taken = match streams {
            Streams::Pipes(stdin, stdout, stderr) => Taken {
                stdin: Some(stdin),
                stdout: Some(stdout),
                stderr: Some(stderr),
                tty: None,
            },
            Streams::Tty(tty) => Taken {
                tty: Some(tty),
                ..Taken::default()
            },
        };
        Process {
            id,
            pid,
            service: self.clone(),
            streams: Mutex::new(taken),
        }
    }

    /// Attaches again to process `id` after a lost connection (a host that restarted,
    /// a guest channel that was re-dialled): its outputs resume at `resume`, so nothing
    /// is read twice or missed, as long as the agent still holds those bytes (it keeps
    /// as many already sent as its output buffer, 256 KiB by default).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the agent holds no process `id` (it never existed, or its
    /// exit was already taken by a wait); [`Error::Agent`] naming the agent's reason
    /// when an offset is outside what it kept; [`Error::Timeout`], [`Error::Guest`].
    pub async fn attach(&self, id: u64, resume: Resume, deadline: Duration) -> Result<Process> {
        let start = Instant::now();
        let listed = self.list(deadline).await?;
        let Some(info) = listed.into_iter().find(|p| p.id == id) else {
            return Err(Error::NotFound {
                op: format!("attach {id}"),
                reason: format!("the agent holds no process {id}"),
            });
        };
        let left = deadline.saturating_sub(start.elapsed());
        let streams = self.attach_streams(id, info.tty, resume, left).await?;
        Ok(self.process(id, info.pid, streams))
    }

    /// The processes the agent holds: running, or exited and not yet waited for.
    ///
    /// # Errors
    /// [`Error::Timeout`], [`Error::Guest`], [`Error::Agent`].
    pub async fn list(&self, deadline: Duration) -> Result<Vec<ProcessInfo>> {
        let listed = self
            .call("list processes", deadline, |agent, ctx| async move {
                agent
                    .list_processes(ctx, &ListProcessesRequest::new())
                    .await
            })
            .await?;
        Ok(listed
            .processes
            .into_iter()
            .map(|p| ProcessInfo {
                id: p.id,
                pid: p.pid,
                argv: p.argv,
                tag: p.tag,
                tty: p.tty,
                exited: p.exited,
                buffered_bytes: p.buffered_bytes,
            })
            .collect())
    }

    async fn signal(&self, id: u64, signal: i32, deadline: Duration) -> Result<()> {
        let mut req = SignalProcessRequest::new();
        req.id = id;
        req.signal = signal;
        self.call(
            &format!("signal {signal} to process {id}"),
            deadline,
            |agent, ctx| async move { agent.signal_process(ctx, &req).await },
        )
        .await
        .map(drop)
    }
}

enum Streams {
    Pipes(Stdin, Output, Output),
    Tty(Tty),
}

/// A process running in the guest. Its stdio streams are taken out with
/// [`Process::take_stdin`] and friends; dropping the `Process` leaves it running (the
/// agent holds it: [`Processes::attach`] finds it again).
#[derive(Debug)]
pub struct Process {
    id: u64,
    pid: u32,
    service: Processes,
    /// Behind a mutex only so that `&Process` is `Send` (its calls run on any task);
    /// taking a stream needs `&mut self`, so it is never contended.
    streams: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    stdin: Option<Stdin>,
    stdout: Option<Output>,
    stderr: Option<Output>,
    tty: Option<Tty>,
}

impl Process {
    /// The agent's id for it (for [`Processes::attach`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdin, once (`None` on a TTY, or when taken).
    pub fn take_stdin(&mut self) -> Option<Stdin> {
        self.taken().stdin.take()
    }

    fn taken(&mut self) -> &mut Taken {
        // Nothing panics while holding it (it is never locked): a poison is impossible.
        self.streams
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Its stdout, once.
    pub fn take_stdout(&mut self) -> Option<Output> {
        self.taken().stdout.take()
    }

    /// Its stderr, once.
    pub fn take_stderr(&mut self) -> Option<Output> {
        self.taken().stderr.take()
    }

    /// Its TTY, once (`None` without one).
    pub fn take_tty(&mut self) -> Option<Tty> {
        self.taken().tty.take()
    }

    /// Waits for it to exit and its output to be delivered, within `deadline`. Read its
    /// outputs meanwhile (on other tasks): the agent answers only once every byte has
    /// reached the host, and a process whose output nobody reads does not finish.
    ///
    /// # Errors
    /// [`Error::Timeout`]; [`Error::NotFound`] when the agent no longer knows it;
    /// [`Error::Guest`], [`Error::Agent`].
    pub async fn wait(&self, deadline: Duration) -> Result<ExitStatus> {
        let mut req = WaitProcessRequest::new();
        req.id = self.id;
        let status = self
            .service
            .call(
                &format!("wait for process {}", self.id),
                deadline,
                |agent, ctx| async move { agent.wait_process(ctx, &req).await },
            )
            .await?;
        Ok(match status.signal {
            0 => ExitStatus::Code(status.exit_code),
            signal => ExitStatus::Signal(signal),
        })
    }

    /// Sends `signal` (e.g. 15 for SIGTERM) to it.
    ///
    /// # Errors
    /// [`Error::Refused`] when it has ended, [`Error::BadRequest`] for a signal out of
    /// range, [`Error::Timeout`], [`Error::Guest`], [`Error::Agent`].
    pub async fn kill(&self, signal: i32, deadline: Duration) -> Result<()> {
        self.service.signal(self.id, signal, deadline).await
    }

    /// Resizes its TTY to `rows` × `cols` (it gets `SIGWINCH`).
    ///
    /// # Errors
    /// [`Error::Refused`] when it has no TTY or has ended, [`Error::BadRequest`] for a
    /// zero size, [`Error::Timeout`], [`Error::Guest`], [`Error::Agent`].
    pub async fn resize(&self, rows: u16, cols: u16, deadline: Duration) -> Result<()> {
        let mut req = ResizeTtyRequest::new();
        req.id = self.id;
        req.rows = u32::from(rows);
        req.cols = u32::from(cols);
        self.service
            .call(
                &format!("resize the tty of process {} to {rows}x{cols}", self.id),
                deadline,
                |agent, ctx| async move { agent.resize_tty(ctx, &req).await },
            )
            .await
            .map(drop)
    }

    /// Closes its stdin without a [`Stdin`] at hand (a TTY gets Ctrl-D).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the agent no longer knows it, [`Error::Timeout`],
    /// [`Error::Guest`], [`Error::Agent`].
    pub async fn close_stdin(&self, deadline: Duration) -> Result<()> {
        let mut req = CloseStdinRequest::new();
        req.id = self.id;
        self.service
            .call(
                &format!("close the stdin of process {}", self.id),
                deadline,
                |agent, ctx| async move { agent.close_stdin(ctx, &req).await },
            )
            .await
            .map(drop)
    }
}
