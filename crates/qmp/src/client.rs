//! [`QmpClient`]: one connection, many callers. Callers write their own command (under a
//! short lock) and wait for a reply routed to them by id by the connection's one reader
//! task, which also publishes events. Every wait is bounded.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout_at};
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::options::{CommandIds, QmpOptions};
use crate::wire::{self, ErrorBody, Id, Message};

/// The longest pause between two connection attempts.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_millis(25);
/// At most this much of an unexpected reply is quoted in an error.
const QUOTE: usize = 200;

/// QEMU's version, from the QMP greeting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// Major version (10 for QEMU 10.0.2).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// The distribution's package string (`"Debian 1:10.0.2+ds-2…"`).
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.trim().is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Greeting {
    version: GreetingVersion,
    #[serde(default)]
    capabilities: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersionNumbers,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct QemuVersionNumbers {
    major: u32,
    minor: u32,
    micro: u32,
}

/// What a waiter receives from the reader task.
type Reply = std::result::Result<Box<RawValue>, Failure>;

enum Failure {
    Qmp(ErrorBody),
    Disconnected(Arc<str>),
}

/// Routes replies to waiters and events to subscribers; shared by the client and its
/// reader task.
struct Router {
    state: Mutex<RouterState>,
    events: broadcast::Sender<Event>,
}

/// A command on the wire, waiting for its reply.
struct Waiter {
    /// The command's sequence number on this connection.
    seq: u64,
    /// The id it was sent with, if any.
    wire_id: Option<u64>,
    tx: oneshot::Sender<Reply>,
}

struct RouterState {
    /// Commands in the order they were written. QEMU answers in-band commands one at a
    /// time, in the order received, so the oldest waiter owns the next reply. A waiter
    /// whose caller gave up stays until its late reply arrives, which is then dropped.
    pending: VecDeque<Waiter>,
    /// Why the connection ended, once it has.
    closed: Option<Arc<str>>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, RouterState> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert/remove/drain), so a poisoned lock is safe
        // to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a waiter for a command about to be written (called under the writer
    /// lock, so queue order is wire order).
    fn push(&self, waiter: Waiter) -> std::result::Result<(), Arc<str>> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(Arc::clone(reason));
        }
        state.pending.push_back(waiter);
        Ok(())
    }

    /// Withdraws the newest waiter, `seq`, whose command never reached the wire.
    fn withdraw(&self, seq: u64) {
        let mut state = self.lock();
        if state.pending.back().is_some_and(|w| w.seq == seq) {
            state.pending.pop_back();
        }
    }

    /// The waiter that owns a reply with this id: the one sent with `Some(n)` (anywhere
    /// in the queue: replies may overtake each other), or, for a reply without an id,
    /// the oldest waiter, provided it was sent without one.
    fn take_for(&self, id: &Option<Id>) -> Option<Waiter> {
        let mut state = self.lock();
        match id {
            Some(Id::Number(n)) => {
                let at = state.pending.iter().position(|w| w.wire_id == Some(*n))?;
                state.pending.remove(at)
            }
            Some(Id::Other(_)) => None,
            None => match state.pending.front() {
                Some(w) if w.wire_id.is_none() => state.pending.pop_front(),
                _ => None,
            },
        }
    }

    fn closed(&self) -> Option<Arc<str>> {
        self.lock().closed.clone()
    }

    /// Ends the connection: every waiter fails with `reason`, new commands are refused,
    /// subscribers get [`Event::Disconnected`]. Only the first reason is kept.
    fn close(&self, reason: &str) {
        let (reason, waiters) = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            let reason: Arc<str> = Arc::from(reason);
            state.closed = Some(Arc::clone(&reason));
            let waiters: Vec<_> = state.pending.drain(..).map(|w| w.tx).collect();
            (reason, waiters)
        };
        tracing::debug!(%reason, waiters = waiters.len(), "QMP connection closed");
        for tx in waiters {
            let _ = tx.send(Err(Failure::Disconnected(Arc::clone(&reason))));
        }
        let _ = self.events.send(Event::Disconnected {
            reason: reason.to_string(),
        });
    }
}

struct Inner {
    path: PathBuf,
    opts: QmpOptions,
    version: QemuVersion,
    oob: bool,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_seq: AtomicU64,
    router: Arc<Router>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An async QMP client on a Unix socket. Cheap to clone; all clones share one connection.
///
/// Many tasks may call [`QmpClient::execute`] at once: replies are routed to their
/// callers in the order QEMU answers in-band commands, or by id with
/// [`CommandIds::Always`]. Every call has a deadline; when the connection dies every
/// waiting call fails at once with [`Error::Disconnected`].
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .field("oob", &self.inner.oob)
            .finish()
    }
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, retrying while it does not exist yet or
    /// refuses (QEMU creates it a little after it starts) — first after 1 ms, backing
    /// off to 25 ms — then reads the greeting and negotiates capabilities (`oob` when
    /// offered and [`QmpOptions::negotiate_oob`]). All of it within
    /// [`QmpOptions::connect_timeout`].
    ///
    /// # Errors
    /// [`Error::Connect`] when the socket never accepted before the deadline (with the
    /// attempts made and the last OS error) or refused for good (permission, not a
    /// socket); [`Error::Handshake`] when the greeting or negotiation failed or did not
    /// finish before the deadline.
    pub async fn connect(path: impl AsRef<Path>, opts: QmpOptions) -> Result<QmpClient> {
        let path = path.as_ref().to_owned();
        let deadline = Instant::now() + opts.connect_timeout;
        let span = tracing::debug_span!("qmp", path = %path.display());
        let stream = connect_socket(&path, deadline)
            .instrument(span.clone())
            .await?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 << 10, read);
        let handshake = handshake(&mut reader, write, &opts);
        let (version, oob, write) = match timeout_at(deadline, handshake).await {
            Ok(result) => result.map_err(|reason| Error::Handshake {
                path: path.clone(),
                reason,
            })?,
            Err(_) => {
                return Err(Error::Handshake {
                    path,
                    reason: format!(
                        "no greeting and capabilities within {:?} (is QEMU stopped or hung?)",
                        opts.connect_timeout
                    ),
                });
            }
        };
        tracing::debug!(parent: &span, %version, oob, "QMP connected");
        let (events, _) = broadcast::channel(opts.event_capacity.max(1));
        let router = Arc::new(Router {
            state: Mutex::new(RouterState {
                pending: VecDeque::new(),
                closed: None,
            }),
            events,
        });
        let reader = tokio::spawn(
            read_loop(reader, Arc::clone(&router), opts.max_message_size).instrument(span),
        );
        Ok(QmpClient {
            inner: Arc::new(Inner {
                path,
                opts,
                version,
                oob,
                writer: tokio::sync::Mutex::new(write),
                next_seq: AtomicU64::new(0),
                router,
                reader,
            }),
        })
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// `true` when the `oob` capability was negotiated (QEMU then queues up to 8
    /// commands instead of reading one at a time).
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A new subscription to QEMU's events. Unknown events arrive as
    /// [`Event::Unknown`]; the last message is [`Event::Disconnected`].
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.router.events.subscribe()
    }

    /// Why the connection ended, or `None` while it is up.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.router.closed().map(|r| r.to_string())
    }

    /// Runs a typed command (`qapi_qmp::query_status {}`) with the default deadline.
    ///
    /// # Errors
    /// [`Error::Qmp`] with QEMU's error, [`Error::Timeout`], [`Error::Disconnected`],
    /// [`Error::Encode`], [`Error::Decode`].
    pub async fn execute<C: qapi_spec::Command>(&self, command: C) -> Result<C::Ok> {
        self.execute_with_timeout(command, self.inner.opts.command_timeout)
            .await
    }

    /// Runs a typed command with its own deadline.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn execute_with_timeout<C: qapi_spec::Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok> {
        let reply = self.call(C::NAME, &command, timeout).await?;
        decode(C::NAME, &reply)
    }

    /// Runs a command the schema lacks, by name, with JSON arguments (`None` for none),
    /// with the default deadline; returns the raw `return` value.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn execute_raw(
        &self,
        name: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        self.execute_raw_with_timeout(name, arguments, self.inner.opts.command_timeout)
            .await
    }

    /// Runs `name` with `fd` passed alongside (SCM_RIGHTS on the command's bytes), for
    /// QMP's `getfd` and `add-fd`; QEMU keeps its own copy, the caller keeps `fd`.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn execute_raw_with_fd(
        &self,
        name: &str,
        arguments: Option<serde_json::Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<serde_json::Value> {
        let reply = self
            .call_with_fd(
                name,
                &arguments,
                self.inner.opts.command_timeout,
                Some(fd.as_raw_fd()),
            )
            .await?;
        decode(name, &reply)
    }

    /// Runs a typed command with `fd` passed alongside (SCM_RIGHTS on the command's
    /// bytes), for QMP's `getfd` and `add-fd`; QEMU keeps its own copy, the caller keeps
    /// `fd`. The default deadline.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn execute_with_fd<C: qapi_spec::Command>(
        &self,
        command: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok> {
        let reply = self
            .call_with_fd(
                C::NAME,
                &command,
                self.inner.opts.command_timeout,
                Some(fd.as_raw_fd()),
            )
            .await?;
        decode(C::NAME, &reply)
    }

    /// [`QmpClient::execute_raw`] with its own deadline.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn execute_raw_with_timeout(
        &self,
        name: &str,
        arguments: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let reply = self.call(name, &arguments, timeout).await?;
        decode(name, &reply)
    }

    async fn call(
        &self,
        name: &str,
        arguments: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<Box<RawValue>> {
        self.call_with_fd(name, arguments, timeout, None).await
    }

    async fn call_with_fd(
        &self,
        name: &str,
        arguments: &impl serde::Serialize,
        timeout: Duration,
        fd: Option<RawFd>,
    ) -> Result<Box<RawValue>> {
        let inner = &*self.inner;
        let deadline = Instant::now() + timeout;
        let seq = inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let wire_id = match inner.opts.command_ids {
            CommandIds::Always => Some(seq),
            CommandIds::WhenNeeded => None,
        };
        let mut bytes = Vec::with_capacity(64);
        wire::encode_command(&mut bytes, name, arguments, wire_id).map_err(|source| {
            Error::Encode {
                command: name.to_owned(),
                source,
            }
        })?;
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { seq, wire_id, tx };
        let exchange = async {
            self.send(name, &bytes, waiter, fd).await?;
            rx.await
                .map_err(|_| disconnected(name, "the reader stopped without an answer"))
        };
        let span = tracing::trace_span!("qmp_command", command = name, seq);
        let started = std::time::Instant::now();
        let outcome = timeout_at(deadline, exchange).instrument(span).await;
        tracing::trace!(
            command = name,
            seq,
            elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            ok = matches!(outcome, Ok(Ok(Ok(_)))),
            "qmp reply"
        );
        match outcome {
            Err(_) => Err(Error::Timeout {
                command: name.to_owned(),
                seq,
                after: timeout,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(Failure::Qmp(body)))) => Err(Error::Qmp {
                command: name.to_owned(),
                class: body.class,
                desc: body.desc,
            }),
            Ok(Ok(Err(Failure::Disconnected(reason)))) => Err(disconnected(name, &reason)),
        }
    }

    /// Queues `waiter` and writes its encoded command, under the writer lock so that
    /// queue order is wire order. A command abandoned before its first byte is
    /// withdrawn; one abandoned or failed half-way leaves the stream unusable, so it
    /// closes the connection.
    async fn send(
        &self,
        name: &str,
        bytes: &[u8],
        waiter: Waiter,
        fd: Option<RawFd>,
    ) -> Result<()> {
        let inner = &*self.inner;
        let mut writer = inner.writer.lock().await;
        let seq = waiter.seq;
        inner
            .router
            .push(waiter)
            .map_err(|reason| disconnected(name, &reason))?;
        let mut guard = WriteGuard {
            inner,
            seq,
            written: 0,
            len: bytes.len(),
        };
        if let Some(fd) = fd {
            // The fd rides on the command's first bytes (SCM_RIGHTS), as QMP's getfd
            // and add-fd expect.
            match send_with_fd(writer.as_ref(), bytes, fd).await {
                Ok(n) => guard.written = n,
                Err(e) => {
                    let reason = format!("writing the QMP socket with an fd: {e}");
                    inner.router.close(&reason);
                    return Err(disconnected(name, &reason));
                }
            }
        }
        while guard.written < bytes.len() {
            let reason = match writer.write(&bytes[guard.written..]).await {
                Ok(0) => "the socket accepts no more bytes".to_owned(),
                Ok(n) => {
                    guard.written += n;
                    continue;
                }
                Err(e) => format!("writing the QMP socket: {e}"),
            };
            inner.router.close(&reason);
            return Err(disconnected(name, &reason));
        }
        Ok(())
    }
}

fn disconnected(command: &str, reason: &str) -> Error {
    Error::Disconnected {
        command: command.to_owned(),
        reason: reason.to_owned(),
    }
}

fn decode<T: DeserializeOwned>(command: &str, reply: &RawValue) -> Result<T> {
    serde_json::from_str(reply.get()).map_err(|source| {
        let text = reply.get();
        let mut reply: String = text.chars().take(QUOTE).collect();
        if reply.len() < text.len() {
            reply.push('…');
        }
        Error::Decode {
            command: command.to_owned(),
            reply,
            source,
        }
    })
}

/// Undoes a write that did not finish: withdraws the waiter when nothing was written,
/// closes the connection when part of the command is on the wire.
struct WriteGuard<'a> {
    inner: &'a Inner,
    seq: u64,
    written: usize,
    len: usize,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if self.written == self.len {
            return;
        }
        if self.written == 0 {
            self.inner.router.withdraw(self.seq);
        } else {
            // Half a command is on the wire: whatever follows would be misread.
            self.inner
                .router
                .close("a command was abandoned half-written; the stream is out of step");
            self.inner.reader.abort();
        }
    }
}

/// Connects, retrying transient failures with backoff until `deadline`.
async fn connect_socket(path: &Path, deadline: Instant) -> Result<UnixStream> {
    let mut delay = Duration::from_millis(1);
    let mut attempts = 0u32;
    let started = Instant::now();
    loop {
        attempts += 1;
        let error = match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        let transient = matches!(
            error.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        );
        if !transient {
            return Err(Error::Connect {
                path: path.to_owned(),
                reason: error.to_string(),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Connect {
                path: path.to_owned(),
                reason: format!(
                    "no QMP server after {attempts} attempts in {:?}: {error}",
                    now - started
                ),
            });
        }
        sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
    }
}

/// Reads the greeting, then negotiates capabilities. Returns the version, whether
/// `oob` is on, and the writer.
async fn handshake(
    reader: &mut BufReader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    opts: &QmpOptions,
) -> std::result::Result<(QemuVersion, bool, OwnedWriteHalf), String> {
    let mut line = Vec::with_capacity(512);
    wire::read_line(reader, &mut line, opts.max_message_size)
        .await
        .map_err(|e| format!("waiting for the greeting: {e}"))?;
    let greeting: Greeting = match wire::parse(&line) {
        Ok(Message::Greeting(body)) => serde_json::from_str(body.get())
            .map_err(|e| format!("malformed greeting ({e}): {}", body.get()))?,
        Ok(_) => return Err("the first message is not a QMP greeting".to_owned()),
        Err(e) => return Err(format!("waiting for the greeting: {e}")),
    };
    let version = QemuVersion {
        major: greeting.version.qemu.major,
        minor: greeting.version.qemu.minor,
        micro: greeting.version.qemu.micro,
        package: greeting.version.package,
    };
    let offers_oob = greeting
        .capabilities
        .iter()
        .any(|c| c.as_str() == Some("oob"));
    let oob = offers_oob && opts.negotiate_oob;
    let command: &[u8] = if oob {
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n"
    } else {
        b"{\"execute\":\"qmp_capabilities\"}\n"
    };
    writer
        .write_all(command)
        .await
        .map_err(|e| format!("sending qmp_capabilities: {e}"))?;
    loop {
        wire::read_line(reader, &mut line, opts.max_message_size)
            .await
            .map_err(|e| format!("waiting for the qmp_capabilities reply: {e}"))?;
        match wire::parse(&line) {
            Ok(Message::Reply { result: Ok(_), .. }) => return Ok((version, oob, writer)),
            Ok(Message::Reply { result: Err(e), .. }) => {
                return Err(format!("qmp_capabilities refused: {}: {}", e.class, e.desc));
            }
            Ok(Message::Event { .. }) => continue,
            Ok(Message::Greeting(_)) => return Err("a second greeting arrived".to_owned()),
            Err(e) => return Err(format!("waiting for the qmp_capabilities reply: {e}")),
        }
    }
}

/// The connection's one reader: replies to their waiters (by id, else oldest first), events to
/// subscribers. Ends the connection on EOF, a socket error, or anything that is not QMP.
async fn read_loop(mut reader: BufReader<OwnedReadHalf>, router: Arc<Router>, limit: usize) {
    let mut line = Vec::with_capacity(4096);
    let reason = loop {
        if let Err(e) = wire::read_line(&mut reader, &mut line, limit).await {
            break e.to_string();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match wire::parse(&line) {
            Err(e) => break e.to_string(),
            Ok(Message::Greeting(_)) => break "a second greeting arrived mid-session".to_owned(),
            Ok(Message::Event {
                name,
                data,
                timestamp,
            }) => {
                let event = Event::from_parts(&name, data, timestamp, &line);
                tracing::trace!(event = %name, "qmp event");
                let _ = router.events.send(event);
            }
            Ok(Message::Reply { id, result }) => {
                let Some(waiter) = router.take_for(&id) else {
                    break format!(
                        "a reply matches no command in flight: it {}",
                        describe(&id, &result)
                    );
                };
                let reply = match result {
                    Ok(value) => Ok(value.to_owned()),
                    Err(body) => Err(Failure::Qmp(body)),
                };
                if waiter.tx.send(reply).is_err() {
                    tracing::debug!(
                        seq = waiter.seq,
                        "late QMP reply discarded (its caller gave up)"
                    );
                }
            }
        }
    };
    router.close(&reason);
}

/// A reply in a few words, for errors.
fn describe(id: &Option<Id>, result: &std::result::Result<&RawValue, ErrorBody>) -> String {
    let id = match id {
        Some(Id::Number(n)) => format!("carries id {n}"),
        Some(Id::Other(text)) => format!("carries id {text}"),
        None => "carries no id".to_owned(),
    };
    let body: String = match result {
        Ok(v) => v.get().chars().take(QUOTE).collect(),
        Err(e) => format!("error {}: {}", e.class, e.desc),
    };
    format!("{id} ({body})")
}

/// Writes (a first part of) `bytes` with `fd` attached; returns how many bytes went.
async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(bytes)];
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            // No MSG_NOSIGNAL: macOS has no such flag, and this socket's other writes
            // (plain write(2) through tokio) rely on SIGPIPE being ignored, as Rust's
            // runtime sets it, just the same.
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
