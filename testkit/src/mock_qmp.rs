//! [`MockQmpServer`]: a QMP server on a Unix socket, scripted from tests. It speaks
//! enough QMP for a client to connect (greeting, `qmp_capabilities`) and answers each
//! command as scripted: a result, a QMP error, after a delay, never, raw bytes (garbage),
//! or by hanging up half-way through the reply. Events can be sent at any moment, and
//! every command received is recorded.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmkit_testkit::{MockQmpServer, MockReply};
//!
//! # async fn run() -> std::io::Result<()> {
//! let server = MockQmpServer::start("/tmp/test-qmp.sock").await?;
//! server.on("query-status", MockReply::ok(serde_json::json!({"running": true, "status": "running"})));
//! server.on("stop", MockReply::ok(serde_json::json!({})).then_event("STOP", serde_json::json!({})));
//! server.on("cont", MockReply::never()); // the client's deadline must get it out
//! server.on("device_add", MockReply::error("GenericError", "Bus 'rp0' is full").delayed(Duration::from_millis(50)));
//! // … run the code under test against "/tmp/test-qmp.sock" …
//! assert_eq!(server.received()[0].name, "query-status");
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A handler that computes the reply from the command.
type ReplyFn = Arc<dyn Fn(&ReceivedCommand) -> MockReply + Send + Sync>;

/// How the server answers one command.
#[derive(Clone)]
pub struct MockReply {
    kind: ReplyKind,
    delay: Duration,
    overtakable: bool,
    events_after: Vec<(String, Value)>,
}

#[derive(Clone)]
enum ReplyKind {
    Ok(Value),
    Error { class: String, desc: String },
    Never,
    Raw(Vec<u8>),
    DisconnectMidReply,
    Disconnect,
    Dynamic(ReplyFn),
}

impl std::fmt::Debug for MockReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            ReplyKind::Ok(v) => format!("Ok({v})"),
            ReplyKind::Error { class, desc } => format!("Error({class}: {desc})"),
            ReplyKind::Never => "Never".into(),
            ReplyKind::Raw(b) => format!("Raw({} bytes)", b.len()),
            ReplyKind::DisconnectMidReply => "DisconnectMidReply".into(),
            ReplyKind::Disconnect => "Disconnect".into(),
            ReplyKind::Dynamic(_) => "Dynamic".into(),
        };
        f.debug_struct("MockReply")
            .field("kind", &kind)
            .field("delay", &self.delay)
            .field("overtakable", &self.overtakable)
            .field("events_after", &self.events_after)
            .finish()
    }
}

impl MockReply {
    fn new(kind: ReplyKind) -> Self {
        MockReply {
            kind,
            delay: Duration::ZERO,
            overtakable: false,
            events_after: Vec::new(),
        }
    }

    /// `{"return": value, "id": …}`.
    pub fn ok(value: Value) -> Self {
        MockReply::new(ReplyKind::Ok(value))
    }

    /// `{"error": {"class": class, "desc": desc}, "id": …}`.
    pub fn error(class: &str, desc: &str) -> Self {
        MockReply::new(ReplyKind::Error {
            class: class.to_owned(),
            desc: desc.to_owned(),
        })
    }

    /// No reply at all (a hung QEMU).
    pub fn never() -> Self {
        MockReply::new(ReplyKind::Never)
    }

    /// These bytes instead of a reply, sent as they are (add `\n` yourself): garbage,
    /// an oversized line, a reply with a foreign id.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        MockReply::new(ReplyKind::Raw(bytes.into()))
    }

    /// Half of a reply, then the connection closes.
    pub fn disconnect_mid_reply() -> Self {
        MockReply::new(ReplyKind::DisconnectMidReply)
    }

    /// Close the connection instead of replying.
    pub fn disconnect() -> Self {
        MockReply::new(ReplyKind::Disconnect)
    }

    /// Compute the reply from the command (its arguments, id, sequence number).
    pub fn from_fn(f: impl Fn(&ReceivedCommand) -> MockReply + Send + Sync + 'static) -> Self {
        MockReply::new(ReplyKind::Dynamic(Arc::new(f)))
    }

    /// Send the reply after `delay`. Like QEMU with in-band commands, replies stay in
    /// order: later commands are answered only after this one.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Let later commands' replies overtake this delayed one (as QEMU's out-of-band
    /// commands may): replies then arrive out of order.
    pub fn out_of_order(mut self) -> Self {
        self.overtakable = true;
        self
    }

    /// After the reply, emit this event.
    pub fn then_event(mut self, name: &str, data: Value) -> Self {
        self.events_after.push((name.to_owned(), data));
        self
    }
}

/// A command the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedCommand {
    /// The command name (`execute` or `exec-oob`).
    pub name: String,
    /// Its `arguments` (`null` when absent).
    pub arguments: Value,
    /// Its `id`, if it had one.
    pub id: Option<Value>,
    /// 0 for the first command the server ever received, and so on.
    pub seq: usize,
    /// The exact line received, without the newline.
    pub line: String,
}

/// What the server says first.
#[derive(Debug, Clone)]
pub enum Greeting {
    /// A QEMU 10.0.2 greeting, offering `oob` or not.
    Qemu {
        /// Offer the `oob` capability.
        oob: bool,
    },
    /// This line instead (add no newline).
    Raw(String),
    /// Nothing: the client must time out.
    None,
}

struct State {
    script: HashMap<String, VecDeque<MockReply>>,
    defaults: HashMap<String, MockReply>,
    received: Vec<ReceivedCommand>,
    connection: Option<mpsc::UnboundedSender<Out>>,
    connections: usize,
}

enum Out {
    Line(Vec<u8>),
    Close,
}

/// A scripted QMP server. Dropping it stops it and removes its socket.
pub struct MockQmpServer {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    connected: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MockQmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockQmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for MockQmpServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(tx) = self.lock().connection.take() {
            let _ = tx.send(Out::Close);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MockQmpServer {
    /// Listens on `path` with a QEMU 10 greeting that offers `oob`. Out of the box it
    /// answers `qmp_capabilities`, `query-status` (running) and `quit` (then closes);
    /// other commands get QEMU's `CommandNotFound` error until scripted.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn start(path: impl AsRef<Path>) -> std::io::Result<MockQmpServer> {
        MockQmpServer::with_greeting(path, Greeting::Qemu { oob: true }).await
    }

    /// As [`MockQmpServer::start`], with another greeting.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn with_greeting(
        path: impl AsRef<Path>,
        greeting: Greeting,
    ) -> std::io::Result<MockQmpServer> {
        let path = path.as_ref().to_owned();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let mut defaults = HashMap::new();
        defaults.insert("qmp_capabilities".to_owned(), MockReply::ok(json!({})));
        defaults.insert(
            "query-status".to_owned(),
            MockReply::ok(json!({"running": true, "status": "running"})),
        );
        defaults.insert(
            "quit".to_owned(),
            MockReply::ok(json!({})).then_event(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            ),
        );
        let state = Arc::new(Mutex::new(State {
            script: HashMap::new(),
            defaults,
            received: Vec::new(),
            connection: None,
            connections: 0,
        }));
        let (connected_tx, connected) = watch::channel(0);
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&state),
            greeting,
            connected_tx,
        ));
        Ok(MockQmpServer {
            path,
            state,
            connected,
            task,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer every later `command` with `reply` (replaces the previous default).
    pub fn on(&self, command: &str, reply: MockReply) {
        self.lock().defaults.insert(command.to_owned(), reply);
    }

    /// Answer only the next `command` with `reply`; queued replies are used in order
    /// before the default.
    pub fn on_once(&self, command: &str, reply: MockReply) {
        self.lock()
            .script
            .entry(command.to_owned())
            .or_default()
            .push_back(reply);
    }

    /// Every command received so far (including `qmp_capabilities`), in order.
    pub fn received(&self) -> Vec<ReceivedCommand> {
        self.lock().received.clone()
    }

    /// The received commands other than `qmp_capabilities`.
    pub fn received_commands(&self) -> Vec<ReceivedCommand> {
        self.received()
            .into_iter()
            .filter(|c| c.name != "qmp_capabilities")
            .collect()
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Waits until at least `n` connections were accepted, at most `timeout`.
    /// Returns whether they were.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sends an event on the current connection (with a current timestamp).
    /// Returns `false` when no client is connected.
    pub fn emit_event(&self, name: &str, data: Value) -> bool {
        self.send_raw(event_line(name, &data))
    }

    /// Sends raw bytes on the current connection (garbage, oversized lines, …).
    /// Returns `false` when no client is connected.
    pub fn send_raw(&self, bytes: impl Into<Vec<u8>>) -> bool {
        match &self.lock().connection {
            Some(tx) => tx.send(Out::Line(bytes.into())).is_ok(),
            None => false,
        }
    }

    /// Closes the current connection.
    pub fn disconnect(&self) {
        if let Some(tx) = self.lock().connection.take() {
            let _ = tx.send(Out::Close);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Test scaffolding: a panicked holder leaves plain data behind, still usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn event_line(name: &str, data: &Value) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut line = json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
    .to_string()
    .into_bytes();
    line.push(b'\n');
    line
}

async fn accept_loop(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    greeting: Greeting,
    connected: watch::Sender<usize>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let (tx, rx) = mpsc::unbounded_channel();
        let count = {
            let mut s = lock(&state);
            if let Some(old) = s.connection.replace(tx.clone()) {
                let _ = old.send(Out::Close);
            }
            s.connections += 1;
            s.connections
        };
        connected.send_replace(count);
        tokio::spawn(serve(stream, Arc::clone(&state), greeting.clone(), tx, rx));
    }
}

async fn serve(
    stream: UnixStream,
    state: Arc<Mutex<State>>,
    greeting: Greeting,
    tx: mpsc::UnboundedSender<Out>,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Line(bytes) => {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Out::Close => break,
            }
        }
        let _ = write.shutdown().await;
    });
    match greeting {
        Greeting::Qemu { oob } => {
            let caps = if oob { json!(["oob"]) } else { json!([]) };
            let mut line = json!({"QMP": {
                "version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "vmkit-testkit mock"},
                "capabilities": caps,
            }})
            .to_string()
            .into_bytes();
            line.push(b'\n');
            let _ = tx.send(Out::Line(line));
        }
        Greeting::Raw(text) => {
            let _ = tx.send(Out::Line(format!("{text}\n").into_bytes()));
        }
        Greeting::None => {}
    }
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let command = {
            let mut s = lock(&state);
            let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let name = parsed
                .get("execute")
                .or_else(|| parsed.get("exec-oob"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let command = ReceivedCommand {
                name,
                arguments: parsed.get("arguments").cloned().unwrap_or(Value::Null),
                id: parsed.get("id").cloned(),
                seq: s.received.len(),
                line,
            };
            s.received.push(command.clone());
            command
        };
        let reply = resolve(next_reply(&state, &command), &command);
        let tx = tx.clone();
        if reply.overtakable && !reply.delay.is_zero() {
            tokio::spawn(async move {
                tokio::time::sleep(reply.delay).await;
                deliver(&tx, &command, reply);
            });
        } else {
            tokio::time::sleep(reply.delay).await;
            deliver(&tx, &command, reply);
        }
    }
    let _ = tx.send(Out::Close);
    let _ = writer.await;
}

fn next_reply(state: &Mutex<State>, command: &ReceivedCommand) -> MockReply {
    let mut s = lock(state);
    if let Some(reply) = s
        .script
        .get_mut(&command.name)
        .and_then(VecDeque::pop_front)
    {
        return reply;
    }
    s.defaults.get(&command.name).cloned().unwrap_or_else(|| {
        MockReply::error(
            "CommandNotFound",
            &format!("The command {} has not been found", command.name),
        )
    })
}

/// Turns a computed reply into the reply it computes, keeping the outer delay, order
/// and events and adding the inner ones.
fn resolve(mut reply: MockReply, command: &ReceivedCommand) -> MockReply {
    while let ReplyKind::Dynamic(f) = &reply.kind {
        let next = f(command);
        reply = MockReply {
            kind: next.kind,
            delay: reply.delay + next.delay,
            overtakable: reply.overtakable || next.overtakable,
            events_after: [reply.events_after.clone(), next.events_after].concat(),
        };
    }
    reply
}

fn deliver(tx: &mpsc::UnboundedSender<Out>, command: &ReceivedCommand, reply: MockReply) {
    let with_id = |mut body: serde_json::Map<String, Value>| {
        if let Some(id) = &command.id {
            body.insert("id".to_owned(), id.clone());
        }
        let mut line = Value::Object(body).to_string().into_bytes();
        line.push(b'\n');
        line
    };
    let line = match reply.kind {
        ReplyKind::Ok(value) => with_id(serde_json::Map::from_iter([("return".to_owned(), value)])),
        ReplyKind::Error { class, desc } => with_id(serde_json::Map::from_iter([(
            "error".to_owned(),
            json!({"class": class, "desc": desc}),
        )])),
        ReplyKind::Never => return,
        ReplyKind::Raw(bytes) => bytes,
        ReplyKind::DisconnectMidReply => {
            let full = with_id(serde_json::Map::from_iter([(
                "return".to_owned(),
                json!({"status": "running", "running": true}),
            )]));
            let _ = tx.send(Out::Line(full[..full.len() / 2].to_vec()));
            let _ = tx.send(Out::Close);
            return;
        }
        ReplyKind::Disconnect => {
            let _ = tx.send(Out::Close);
            return;
        }
        // Resolved by `resolve` before delivery.
        ReplyKind::Dynamic(_) => return,
    };
    let _ = tx.send(Out::Line(line));
    for (name, data) in reply.events_after {
        let _ = tx.send(Out::Line(event_line(&name, &data)));
    }
    if command.name == "quit" {
        let _ = tx.send(Out::Close);
    }
}
