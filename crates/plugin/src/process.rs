//! Out of process: the backend runs as its own executable (`<binary> <name> serve
//! --socket PATH`, the containerd shim model) and the host speaks the [wire](crate::wire)
//! schema to it over a Unix socket, one JSON message per line. A backend built with
//! another toolchain, or one that crashes, cannot take the runtime down: when the
//! process dies every pending call fails at once and its instances end with
//! `ExitReason::Crashed`, naming how it died.
//!
//! - Backend side: [`serve`] (or [`serve_main`] as a whole `main`).
//! - Host side: [`ProcessChannel::launch`], then
//!   [`PluginBackend::describe`](crate::PluginBackend::describe).

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use vmkit_core::{Backend, Error as CoreError};

use crate::adapter::{Channel, Origin};
use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::feed::InstanceFeed;
use crate::lines::{LineError, read_line, read_line_async};
use crate::wire::{EventMessage, InstanceId, MAX_MESSAGE, Reply, Request};

/// How long a launched backend may take to listen.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a backend may take to exit once its host hung up, before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long a backend whose host is gone gives its runtime's tasks to end before it
/// exits all the same (its instances were dropped first, which ends their VMs).
const ORPHAN_EXIT: Duration = Duration::from_millis(500);
/// How often a backend process checks that its host is still its parent.
const PARENT_POLL: Duration = Duration::from_millis(100);

/// A message from the host.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToBackend {
    /// A request and its id.
    Call {
        /// The id its reply carries.
        id: u64,
        /// The request.
        request: Request,
    },
    /// Send this instance's events from now on.
    Subscribe {
        /// The instance.
        instance: InstanceId,
    },
    /// The host gave up on call `id`: abort it (its reply is not wanted).
    Cancel {
        /// The call's id.
        id: u64,
    },
}

/// A message from the backend.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToHost {
    /// The reply to call `id`.
    Reply {
        /// The call's id.
        id: u64,
        /// The reply.
        reply: Reply,
    },
    /// An instance's event.
    Event(EventMessage),
}

fn line_of<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types cannot fail: plain data with string keys.
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Serves `backend` on a Unix socket at `socket` (created 0600) to one host connection,
/// until the host hangs up; then every instance is dropped (which ends its VM) and the
/// socket is removed.
///
/// # Errors
/// The socket cannot be created or accepted on.
pub async fn serve(backend: Arc<dyn Backend>, socket: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let accepted = listener.accept().await;
    let _ = std::fs::remove_file(socket);
    let (conn, _) = accepted?;
    let (read, mut write) = conn.into_split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(line) = out_rx.recv().await {
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(read);
    let mut session = Session {
        dispatcher: Arc::new(Dispatcher::new(backend)),
        out: out_tx,
        running: Arc::default(),
        forwarders: Vec::new(),
    };
    while let Some(line) = next_line(&mut lines).await {
        match serde_json::from_slice::<ToBackend>(&line) {
            Ok(message) => session.handle(message),
            Err(e) => {
                tracing::warn!(error = %e, "vmkit-plugin: an unreadable message from the host")
            }
        }
    }
    session.end();
    writer.abort();
    Ok(())
}

/// The host's next line; `None` once it hung up (or sent a line over the limit, which
/// ends the connection).
async fn next_line(
    lines: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Option<Vec<u8>> {
    match read_line_async(lines, MAX_MESSAGE).await {
        Ok(line) => line,
        Err(LineError::TooLong(seen)) => {
            tracing::error!(
                seen,
                "vmkit-plugin: the host sent a line over {MAX_MESSAGE} bytes; hanging up"
            );
            None
        }
        Err(LineError::Io(e)) => {
            tracing::debug!(error = %e, "vmkit-plugin: the host connection ended");
            None
        }
    }
}

/// One host connection's state on the backend side.
struct Session {
    dispatcher: Arc<Dispatcher>,
    /// Lines for the writer task.
    out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// The calls in flight, so that the host can cancel one.
    running: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>,
    /// The event forwarders, one per subscribed instance.
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    fn handle(&mut self, message: ToBackend) {
        match message {
            ToBackend::Call { id, request } => {
                let (dispatcher, out) = (Arc::clone(&self.dispatcher), self.out.clone());
                let calls = Arc::clone(&self.running);
                let task = tokio::spawn(async move {
                    let reply = dispatcher.answer(request).await;
                    let _ = out.send(line_of(&ToHost::Reply { id, reply }));
                    locked(&calls).remove(&id);
                });
                locked(&self.running).insert(id, task.abort_handle());
            }
            ToBackend::Cancel { id } => {
                if let Some(task) = locked(&self.running).remove(&id) {
                    task.abort();
                }
            }
            ToBackend::Subscribe { instance } => {
                let out = self.out.clone();
                let sink = move |event| {
                    let _ = out.send(line_of(&ToHost::Event(EventMessage { instance, event })));
                };
                if let Some(forward) = self.dispatcher.subscribe(instance, sink) {
                    self.forwarders.push(tokio::spawn(forward));
                }
            }
        }
    }

    /// The host is gone: nothing more to answer; the calls in flight are dropped (their
    /// backend futures with them) and the instances go with the dispatcher.
    fn end(self) {
        for (_, call) in locked(&self.running).drain() {
            call.abort();
        }
        for forwarder in self.forwarders {
            forwarder.abort();
        }
        drop(self.dispatcher);
    }
}

/// A backend executable's whole `main`: reads `<name> serve --socket PATH`, checks the
/// name is `backend`'s, and [`run_backend`]s it; returns the exit code (2 for a bad
/// command line, 1 when serving failed).
pub fn serve_main(backend: Arc<dyn Backend>) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = format!("usage: <binary> {} serve --socket PATH", backend.name());
    let socket = match args.as_slice() {
        [name, serve, flag, path] if serve == "serve" && flag == "--socket" => {
            if name != backend.name() {
                eprintln!(
                    "vmkit backend: this executable serves {:?}, not {name:?}",
                    backend.name()
                );
                return 2;
            }
            PathBuf::from(path)
        }
        _ => {
            eprintln!("{usage}");
            return 2;
        }
    };
    run_backend(backend, &socket, || {})
}

/// Serves `backend` on `socket` on a multi-thread runtime of its own until the host
/// hangs up, and returns the exit code (1 when serving failed). `setup` runs first,
/// inside the runtime (to spawn the executable's own tasks).
///
/// The process dies with its host: when the host's connection ends (it exited or was
/// killed) every instance is dropped, which ends its VM, and the runtime gets
/// half a second for its tasks before the process exits; and should the host die while
/// the connection lingers, a watch on the parent process exits within 100 ms of its
/// death (the parent changes when the host is gone).
pub fn run_backend(backend: Arc<dyn Backend>, socket: &Path, setup: impl FnOnce()) -> i32 {
    watch_parent();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmkit backend: start a runtime: {e}");
            return 1;
        }
    };
    let served = runtime.block_on(async {
        setup();
        serve(backend, socket).await
    });
    // A blocked task must not keep an orphan alive.
    runtime.shutdown_timeout(ORPHAN_EXIT);
    match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmkit backend: serve on {}: {e}", socket.display());
            1
        }
    }
}

/// Exits the process once its parent (the host) is gone.
fn watch_parent() {
    let host = std::os::unix::process::parent_id();
    let watch = move || {
        loop {
            std::thread::sleep(PARENT_POLL);
            if std::os::unix::process::parent_id() != host {
                eprintln!("vmkit backend: the host (pid {host}) is gone; exiting");
                std::process::exit(1);
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("vmkit-host-watch".into())
        .spawn(watch)
    {
        eprintln!("vmkit backend: cannot watch the host process: {e}");
    }
}

/// A reply, or why the backend's answer to the call could not be read.
type Answered = Result<Reply, String>;

/// Where a reply goes.
enum Pending {
    Async(oneshot::Sender<Answered>),
    Blocking(mpsc::Sender<Answered>),
}

impl Pending {
    fn send(self, answer: Answered) {
        match self {
            Pending::Async(tx) => {
                let _ = tx.send(answer);
            }
            Pending::Blocking(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

/// What the reader thread and the callers share.
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    subscribers: Mutex<HashMap<InstanceId, Arc<InstanceFeed>>>,
    gone: Mutex<Option<String>>,
    child: Mutex<Child>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map or field update: still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Marks the backend gone: every pending call fails now (their senders drop), and
    /// every instance ends as crashed, with `Exited` published (no call needed).
    fn fail_all(&self, cause: String) {
        let cause = locked(&self.gone).get_or_insert(cause).clone();
        locked(&self.pending).clear();
        let feeds: Vec<Arc<InstanceFeed>> = locked(&self.subscribers).values().cloned().collect();
        for feed in feeds {
            feed.lost(&cause);
        }
    }

    /// The backend broke the protocol (`what`): it is killed, and it is gone.
    fn broken(&self, what: &str) {
        tracing::error!(%what, "vmkit-plugin: the backend process broke the protocol; killing it");
        {
            let mut child = locked(&self.child);
            let _ = child.kill();
            let _ = child.wait();
        }
        self.fail_all(format!("it broke the protocol: {what}"));
    }

    /// How the process ended, waiting a little for it to be reapable.
    fn how_it_ended(&self) -> String {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match locked(&self.child).try_wait() {
                Ok(Some(status)) => {
                    use std::os::unix::process::ExitStatusExt;
                    return match (status.code(), status.signal()) {
                        (_, Some(signal)) => {
                            format!("the backend process was killed by signal {signal}")
                        }
                        (Some(code), None) => {
                            format!("the backend process exited with code {code}")
                        }
                        (None, None) => "the backend process ended".into(),
                    };
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => return "the backend process closed its socket".into(),
            }
        }
    }
}

/// The host's end of a backend process.
pub struct ProcessChannel {
    shared: Arc<Shared>,
    /// Lines for the writer thread (a sync socket never blocks a caller's runtime).
    writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    next: AtomicU64,
    origin: Origin,
    _dir: PrivateDir,
}

impl std::fmt::Debug for ProcessChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessChannel")
            .field("origin", &self.origin)
            .finish()
    }
}

/// A 0700 directory this process made for a backend's socket; removed when dropped.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn private_dir() -> Result<PrivateDir, Error> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmkit-backend-{}-{}-{}",
        vmkit_core::state_dir::euid(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    vmkit_core::state_dir::prepare_private_dir("launch a backend process", &dir).map_err(|e| {
        Error::Launch {
            binary: dir.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok(PrivateDir(dir))
}

impl ProcessChannel {
    /// Runs `binary <name> serve --socket <private dir>/backend.sock` and connects to it
    /// (its stderr goes to this process's stderr).
    ///
    /// # Errors
    /// [`Error::Launch`] when it cannot be spawned, exits, or does not listen within
    /// 10 s (it is killed then).
    pub fn launch(binary: &Path, name: &str) -> Result<Arc<ProcessChannel>, Error> {
        let dir = private_dir()?;
        let socket = dir.0.join("backend.sock");
        let launch_error = |reason: String| Error::Launch {
            binary: binary.to_owned(),
            reason,
        };
        let mut child = Command::new(binary)
            .arg(name)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| launch_error(format!("spawn: {e}")))?;
        let deadline = Instant::now() + LISTEN_DEADLINE;
        let conn = loop {
            match StdUnixStream::connect(&socket) {
                Ok(conn) => break conn,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(launch_error(format!(
                            "it exited ({status}) before listening"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(launch_error(format!(
                        "no socket at {} within {LISTEN_DEADLINE:?}: {e}",
                        socket.display()
                    )));
                }
            }
        };
        let reader = conn
            .try_clone()
            .map_err(|e| launch_error(format!("clone its socket: {e}")))?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            gone: Mutex::new(None),
            child: Mutex::new(child),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("vmkit-backend-{name}"))
            .spawn(move || read_replies(reader, &thread_shared))
            .map_err(|e| launch_error(format!("start its reader thread: {e}")))?;
        let (lines, to_write) = mpsc::channel::<Vec<u8>>();
        std::thread::Builder::new()
            .name(format!("vmkit-backend-{name}-w"))
            .spawn(move || write_lines(conn, &to_write))
            .map_err(|e| launch_error(format!("start its writer thread: {e}")))?;
        Ok(Arc::new(ProcessChannel {
            shared,
            writer: Mutex::new(Some(lines)),
            next: AtomicU64::new(1),
            origin: Origin::Process(binary.to_owned()),
            _dir: dir,
        }))
    }

    /// The backend process's pid.
    pub fn pid(&self) -> u32 {
        locked(&self.shared.child).id()
    }

    fn gone_error(&self, cause: &str) -> CoreError {
        CoreError::backend(
            "plugin call",
            Error::BackendGone {
                origin: self.origin.to_string(),
                cause: cause.to_owned(),
            },
        )
    }

    fn send(&self, message: &ToBackend) -> Result<(), CoreError> {
        let sent = locked(&self.writer)
            .as_ref()
            .map(|w| w.send(line_of(message)));
        match sent {
            Some(Ok(())) if self.gone().is_none() => Ok(()),
            _ => {
                let cause = self
                    .gone()
                    .unwrap_or_else(|| "its socket is closed".to_owned());
                Err(self.gone_error(&cause))
            }
        }
    }

    fn register(&self, pending: Pending) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        locked(&self.shared.pending).insert(id, pending);
        id
    }
}

/// The writer thread: writes each line; when the channel is dropped (or the socket
/// fails), hangs up, which tells the backend to end.
fn write_lines(mut conn: StdUnixStream, lines: &mpsc::Receiver<Vec<u8>>) {
    while let Ok(line) = lines.recv() {
        if conn.write_all(&line).is_err() {
            break;
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// The reader thread: replies to their callers, events to their subscribers; at the
/// end, the backend is gone. A line over the limit, or one that is no message, breaks
/// the protocol: the backend is killed. A reply whose call can be told but whose body
/// cannot be read fails that call at once.
fn read_replies(conn: StdUnixStream, shared: &Shared) {
    let mut reader = BufReader::new(conn);
    loop {
        let line = match read_line(&mut reader, MAX_MESSAGE) {
            Ok(Some(line)) => line,
            Ok(None) | Err(LineError::Io(_)) => break,
            Err(LineError::TooLong(seen)) => {
                return shared.broken(&format!(
                    "a line of {seen} bytes or more, over the {MAX_MESSAGE}-byte limit"
                ));
            }
        };
        match serde_json::from_slice::<ToHost>(&line) {
            Ok(ToHost::Reply { id, reply }) => {
                if let Some(pending) = locked(&shared.pending).remove(&id) {
                    pending.send(Ok(reply));
                }
            }
            Ok(ToHost::Event(message)) => {
                let feed = locked(&shared.subscribers).get(&message.instance).cloned();
                if let Some(feed) = feed {
                    feed.publish(message.event);
                }
            }
            Err(e) => match reply_id(&line) {
                Some(id) => {
                    if let Some(pending) = locked(&shared.pending).remove(&id) {
                        pending.send(Err(format!("an unreadable reply: {e}")));
                    }
                }
                None => {
                    return shared.broken(&format!(
                        "a line that is no message ({e}): {}",
                        shown(&line)
                    ));
                }
            },
        }
    }
    let cause = shared.how_it_ended();
    shared.fail_all(cause);
}

/// The call id of a reply line whose body is unreadable, if the line says it.
fn reply_id(line: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    value.get("reply")?.get("id")?.as_u64()
}

/// The start of a line, for an error.
fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned()
}

impl ProcessChannel {
    /// The reply in `answer`, or the error that stands for its absence.
    fn answer(&self, op: &str, answer: Option<Answered>) -> vmkit_core::Result<Reply> {
        match answer {
            Some(Ok(reply)) => Ok(reply),
            Some(Err(what)) => Err(CoreError::backend(
                op.to_owned(),
                Error::Protocol {
                    origin: self.origin.to_string(),
                    what,
                },
            )),
            None => {
                let cause = self.gone().unwrap_or_else(|| "it dropped the call".into());
                Err(self.gone_error(&cause))
            }
        }
    }

    fn timeout(&self, op: &str, after: Duration) -> CoreError {
        CoreError::Timeout {
            op: format!("{op}: no answer from the backend process ({})", self.origin),
            after,
        }
    }
}

#[async_trait]
impl Channel for ProcessChannel {
    async fn call(
        &self,
        request: Request,
        deadline: Option<Duration>,
    ) -> vmkit_core::Result<Reply> {
        if let Some(cause) = self.gone() {
            return Err(self.gone_error(&cause));
        }
        let op = request.name();
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Async(tx));
        // Dropping this future (the caller gave up, or its deadline passed) cancels the
        // call in the backend.
        struct Forget<'a>(&'a ProcessChannel, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                if locked(&self.0.shared.pending).remove(&self.1).is_some() {
                    let _ = self.0.send(&ToBackend::Cancel { id: self.1 });
                }
            }
        }
        let _forget = Forget(self, id);
        self.send(&ToBackend::Call { id, request })?;
        let answer = match deadline {
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(answer) => answer,
                Err(_) => return Err(self.timeout(op, limit)),
            },
            None => rx.await,
        };
        self.answer(op, answer.ok())
    }

    fn call_blocking(&self, request: Request, deadline: Duration) -> vmkit_core::Result<Reply> {
        if let Some(cause) = self.gone() {
            return Err(self.gone_error(&cause));
        }
        let op = request.name();
        let (tx, rx) = mpsc::channel();
        let id = self.register(Pending::Blocking(tx));
        if let Err(e) = self.send(&ToBackend::Call { id, request }) {
            locked(&self.shared.pending).remove(&id);
            return Err(e);
        }
        match rx.recv_timeout(deadline) {
            Ok(answer) => self.answer(op, Some(answer)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if locked(&self.shared.pending).remove(&id).is_some() {
                    let _ = self.send(&ToBackend::Cancel { id });
                }
                Err(self.timeout(op, deadline))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => self.answer(op, None),
        }
    }

    fn notify(&self, request: Request) {
        if let Request::Destroy { instance } = &request {
            locked(&self.shared.subscribers).remove(instance);
        }
        // Its reply, if any, finds no caller and is dropped.
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.send(&ToBackend::Call { id, request });
    }

    fn subscribe(&self, instance: InstanceId, feed: Arc<InstanceFeed>) {
        if let Some(cause) = self.gone() {
            feed.lost(&cause);
            return;
        }
        locked(&self.shared.subscribers).insert(instance, Arc::clone(&feed));
        let _ = self.send(&ToBackend::Subscribe { instance });
        // Gone while subscribing: `fail_all` may have passed this feed by.
        if let Some(cause) = self.gone() {
            feed.lost(&cause);
        }
    }

    fn gone(&self) -> Option<String> {
        locked(&self.shared.gone).clone()
    }

    fn origin(&self) -> &Origin {
        &self.origin
    }
}

impl Drop for ProcessChannel {
    fn drop(&mut self) {
        // Hanging up tells the backend to drop its instances and exit; one that does
        // not within EXIT_GRACE is killed. Reaped on a thread: a drop does not wait.
        drop(locked(&self.writer).take());
        let shared = Arc::clone(&self.shared);
        let reaper = move || {
            let deadline = Instant::now() + EXIT_GRACE;
            loop {
                let mut child = locked(&shared.child);
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    Ok(None) => {}
                }
                drop(child);
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        if std::thread::Builder::new()
            .name("vmkit-backend-reaper".into())
            .spawn(reaper)
            .is_err()
        {
            let mut child = locked(&self.shared.child);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of `docs/plugin-protocol.md`, by direction.
    fn examples(direction: &str) -> Vec<String> {
        let page = include_str!("../../../docs/plugin-protocol.md");
        let fence = format!("```json {direction}\n");
        page.split(fence.as_str())
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .map(|block| block.trim().to_owned())
            .collect()
    }

    #[test]
    fn the_protocol_page_is_the_protocol() {
        let to_backend = examples("to-backend");
        let to_host = examples("to-host");
        assert!(to_backend.len() >= 5 && to_host.len() >= 5);
        for line in &to_backend {
            assert!(!line.contains('\n'), "one message a line: {line}");
            if let Err(e) = serde_json::from_str::<ToBackend>(line) {
                panic!("the page's host message does not parse: {e}\n{line}");
            }
        }
        for line in &to_host {
            assert!(!line.contains('\n'), "one message a line: {line}");
            if let Err(e) = serde_json::from_str::<ToHost>(line) {
                panic!("the page's backend message does not parse: {e}\n{line}");
            }
        }
        // Every operation of the schema is on the page, and a message this side writes
        // reads back as itself.
        let page = include_str!("../../../docs/plugin-protocol.md");
        let ops = [
            Request::Describe,
            Request::Create {
                config: Box::new(vmkit_core::InstanceConfig::new("vm", "/run/vm", "/k")),
            },
            Request::Destroy { instance: 1 },
            Request::Start {
                instance: 1,
                timeout_ms: None,
            },
            Request::Shutdown { instance: 1 },
            Request::Pause { instance: 1 },
            Request::Resume { instance: 1 },
            Request::Wait { instance: 1 },
            Request::State { instance: 1 },
            Request::VmInfo { instance: 1 },
            Request::Hotpluggers { instance: 1 },
            Request::AddDevice {
                instance: 1,
                spec: vmkit_core::DiskConfig::new("d", "/d.img").into(),
            },
            Request::HotplugDevice {
                instance: 1,
                spec: vmkit_core::NicConfig::tap("n", "tap0", None).into(),
            },
            Request::Devices { instance: 1 },
            Request::Unplug {
                instance: 1,
                id: "d".into(),
            },
            Request::QueryCpus { instance: 1 },
            Request::HotplugCpu { instance: 1 },
            Request::HotplugCpuAt {
                instance: 1,
                at: vmkit_core::CpuTopology {
                    socket: 0,
                    core: 1,
                    thread: 0,
                },
            },
            Request::UnplugCpu {
                instance: 1,
                index: 1,
            },
            Request::SetVcpus {
                instance: 1,
                count: 2,
            },
            Request::QueryMemory { instance: 1 },
            Request::HotplugMemory {
                instance: 1,
                size_mib: 128,
            },
            Request::UnplugMemory {
                instance: 1,
                id: "m".into(),
            },
        ];
        for request in ops {
            let tag = request.tag();
            assert!(
                page.contains(&format!("`{tag}`")),
                "docs/plugin-protocol.md does not name the operation {tag}"
            );
            let line = line_of(&ToBackend::Call { id: 3, request });
            let json = std::str::from_utf8(&line).unwrap();
            assert!(
                json.contains(&format!("\"op\":\"{tag}\"")),
                "{tag} is tagged by its name: {json}"
            );
            assert!(serde_json::from_slice::<ToBackend>(&line).is_ok(), "{json}");
        }
    }
}
