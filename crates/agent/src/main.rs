//! # vmkit-agent
//!
//! The guest agent: a static binary the test guest's `/init` starts. It serves the
//! `vmkit.agent.v1.Agent` TTRPC service (see `vmkit-proto`) on vsock port 1025 and raw
//! streams on port 1026, and never panics on a bad request: each gets an error with a
//! reason, and the agent keeps serving.
//!
//! ```text
//! vmkit-agent                 # in a guest: vsock ports 1025 (TTRPC) and 1026 (streams)
//! vmkit-agent --unix DIR      # anywhere, for tests: DIR/agent.sock and DIR/stream.sock;
//!                             # PowerOff is refused in this mode
//! ```

mod exec;
mod info;
mod listen;
mod online;
mod power;
mod rpc;
mod service;
mod streams;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use listen::Listener;
use vmkit_proto::{AGENT_PORT, STREAM_PORT};

/// Where the agent listens.
#[derive(Debug, Clone)]
enum Listen {
    /// Kernel vsock, any CID.
    Vsock,
    /// Unix sockets in this directory (tests on the host).
    Unix(PathBuf),
}

const USAGE: &str = "usage: vmkit-agent [--unix DIR]";

fn parse_args() -> Result<Listen, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = Listen::Vsock;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--unix" => {
                let dir = args.next().ok_or("--unix needs a directory")?;
                listen = Listen::Unix(dir.into());
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(listen)
}

fn main() -> ExitCode {
    let listen = match parse_args() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmkit-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmkit-agent: start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmkit-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: Listen) -> Result<(), String> {
    let power_off = matches!(listen, Listen::Vsock);
    let service = Arc::new(service::AgentService::new(power_off));
    let open = |what: &str, listener: std::io::Result<Listener>| {
        listener.map_err(|e| format!("listen for {what}: {e}"))
    };
    let (rpc, streams) = match &listen {
        Listen::Vsock => (
            open("TTRPC", Listener::vsock(AGENT_PORT))?,
            open("streams", Listener::vsock(STREAM_PORT))?,
        ),
        Listen::Unix(dir) => (
            open("TTRPC", Listener::unix(&dir.join("agent.sock")))?,
            open("streams", Listener::unix(&dir.join("stream.sock")))?,
        ),
    };
    eprintln!("vmkit-agent: serving TTRPC on {rpc}, streams on {streams}");
    tokio::spawn(streams::serve(streams));
    tokio::spawn(async move {
        loop {
            let conn = rpc.accept_or_pause().await;
            tokio::spawn(rpc::serve(conn, Arc::clone(&service)));
        }
    });
    // Serve until killed; in a guest the agent lives as long as the guest.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("watch SIGTERM: {e}"))?;
    term.recv().await;
    Ok(())
}
