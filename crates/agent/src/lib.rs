//! # vmkit-agent
//!
//! The guest agent: a static binary the test guest's `/init` starts. It serves the
//! `vmkit.agent.v1.Agent` TTRPC service (see `vmkit-proto`) on vsock port 1025 and raw
//! streams on port 1026, and never panics on a bad request: each gets an error with a
//! reason, and the agent keeps serving. A guest without vsock runs it on a
//! virtio-serial port instead ([`Listen::Serial`]): the same two ports, as channels of
//! a `vmkit-serial` link that survives the host reconnecting and the agent restarting.
//!
//! It is a library too: [`start`] serves the same code on Unix sockets in a directory
//! ([`Listen::Unix`], the host test mode, where `PowerOff` is refused), in the caller's
//! tokio runtime, until the returned [`Serving`] is dropped. vmkit-testkit's fake
//! backend gives its fake VMs a real agent this way.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let dir = std::path::PathBuf::from("/tmp/agent-test");
//! let serving = vmkit_agent::start(&vmkit_agent::Listen::Unix(dir.clone()), vmkit_agent::Limits::default())?;
//! // … dial unix://{dir}/agent.sock with a TTRPC client …
//! drop(serving); // every listener and connection ends
//! # Ok(())
//! # }
//! ```

mod exec;
mod info;
mod limits;
mod listen;
mod mount;
mod online;
mod process;
mod root;
mod rpc;
mod serial;
mod service;
mod streams;
mod wait;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use vmkit_proto::{AGENT_PORT, STREAM_PORT};

pub use limits::Limits;
use listen::Listener;
pub use serial::SerialEnd;

/// Writes `line` and a newline to stderr in one write. In a guest stderr is the serial
/// console, shared with `/init`: `eprintln!` writes its pieces one by one, and the ready
/// line `/init` prints could land in the middle of them, where the host does not see it
/// as a line of its own.
pub fn log_line(line: &str) {
    use std::io::Write;
    let mut whole = String::with_capacity(line.len() + 1);
    whole.push_str(line);
    whole.push('\n');
    let _ = std::io::stderr().write_all(whole.as_bytes());
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Kernel vsock, any CID: ports 1025 (TTRPC) and 1026 (streams). In a guest.
    Vsock,
    /// Unix sockets `agent.sock` (TTRPC) and `stream.sock` (streams) in this directory:
    /// the host test mode, where `PowerOff` is refused.
    Unix(PathBuf),
    /// The channels of a virtio-serial link (ports 1025 and 1026 as on vsock), for a
    /// guest without vsock. `PowerOff` is served on a real port, refused on the test
    /// mode's socket.
    Serial(SerialEnd),
}

impl Listen {
    /// The TTRPC socket of [`Listen::Unix`].
    pub fn ttrpc_socket(dir: &std::path::Path) -> PathBuf {
        dir.join(vmkit_proto::AGENT_SOCKET)
    }

    /// The stream socket of [`Listen::Unix`].
    pub fn stream_socket(dir: &std::path::Path) -> PathBuf {
        dir.join(vmkit_proto::STREAM_SOCKET)
    }
}

/// The agent serving. Dropping it ends every listener and connection (their tasks stop
/// at their next await) and removes the Unix sockets it made.
#[derive(Debug)]
pub struct Serving {
    stop: watch::Sender<bool>,
    sockets: Vec<PathBuf>,
    what: String,
}

impl Serving {
    /// What it listens on, e.g. `unix:///tmp/a/agent.sock, streams on unix:///tmp/a/stream.sock`.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Ends a task's future when its [`Serving`] is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Stop(watch::Receiver<bool>);

impl Stop {
    /// `work`, cut short once serving stops.
    pub(crate) fn bounding(
        &self,
        work: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.0.clone();
        async move {
            tokio::select! {
                () = work => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        }
    }
}

/// Listens as `listen` says and serves on the current tokio runtime (which needs the
/// IO and time drivers) until the [`Serving`] is dropped.
///
/// # Errors
/// A listener cannot be bound (the socket's directory is missing, the port is taken).
pub fn start(listen: &Listen, limits: Limits) -> std::io::Result<Serving> {
    start_with_root(listen, limits, std::path::Path::new("/"))
}

/// [`start`], reading the guest's kernel state (`/proc/meminfo`,
/// `/sys/devices/system/cpu/online`, `/sys/block`, …) under `root` instead of `/`: a
/// fake guest keeps those files in a directory, and the agent reports and onlines what
/// they say (vmkit-testkit's fake QEMU does this).
///
/// # Errors
/// A listener cannot be bound (the socket's directory is missing, the port is taken).
pub fn start_with_root(
    listen: &Listen,
    limits: Limits,
    root: &std::path::Path,
) -> std::io::Result<Serving> {
    // In a guest: power off for real, and reap every child, orphans included.
    let in_guest = matches!(listen, Listen::Vsock | Listen::Serial(SerialEnd::Device(_)));
    if in_guest
        && std::process::id() != 1
        && let Err(e) = vmkit_platform::process::become_subreaper()
    {
        log_line(&format!("vmkit-agent: become a child subreaper: {e}"));
    }
    let processes = Arc::new(process::Processes::new(
        process::Reaper::start(in_guest),
        limits.max_processes,
        limits.output_buffer,
    ));
    let service = Arc::new(service::AgentService::new(
        in_guest,
        root::Root::at(root),
        Arc::clone(&processes),
    ));
    let named = |what: &str, listener: std::io::Result<Listener>| {
        listener.map_err(|e| std::io::Error::new(e.kind(), format!("listen for {what}: {e}")))
    };
    let mut router = None;
    let (rpc, streams, sockets) = match listen {
        Listen::Serial(end) => {
            let (rpc, streams, route) = serial::listeners(end);
            router = Some(route);
            (rpc, streams, Vec::new())
        }
        Listen::Vsock => (
            named("TTRPC", Listener::vsock(AGENT_PORT))?,
            named("streams", Listener::vsock(STREAM_PORT))?,
            Vec::new(),
        ),
        Listen::Unix(dir) => {
            let (ttrpc, stream) = (Listen::ttrpc_socket(dir), Listen::stream_socket(dir));
            (
                named("TTRPC", Listener::unix(&ttrpc))?,
                named("streams", Listener::unix(&stream))?,
                vec![ttrpc, stream],
            )
        }
    };
    let what = format!("TTRPC on {rpc}, streams on {streams}");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Stop(stop_rx);
    if let Some(route) = router {
        tokio::spawn(stop.bounding(route));
    }
    tokio::spawn(stop.bounding(streams::serve(
        streams,
        limits::Gate::new(limits.max_streams),
        stop.clone(),
        processes,
    )));
    let gate = limits::Gate::new(limits.max_connections);
    let budget = limits::Budget::new(limits.body_budget);
    let per_connection = stop.clone();
    tokio::spawn(stop.bounding(async move {
        loop {
            let conn = rpc.accept_or_pause().await;
            // Over the limit: closed at once, so no caller can hold every fd.
            let Some(admitted) = gate.admit() else {
                drop(conn);
                continue;
            };
            let served = rpc::serve(conn, Arc::clone(&service), limits.clone(), budget.clone());
            tokio::spawn(per_connection.bounding(async move {
                served.await;
                drop(admitted);
            }));
        }
    }));
    Ok(Serving {
        stop: stop_tx,
        sockets,
        what,
    })
}
