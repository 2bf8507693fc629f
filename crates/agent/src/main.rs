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
//! vmkit-agent --max-connections N --body-budget BYTES \
//!             --frame-timeout-ms MS --idle-timeout-ms MS
//!                             # the limits (see `limits`), defaults 64, 16 MiB, 30 s, 10 min
//! ```

mod exec;
mod info;
mod limits;
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

const USAGE: &str = "usage: vmkit-agent [--unix DIR] [--max-connections N] [--body-budget BYTES] \
                     [--frame-timeout-ms MS] [--idle-timeout-ms MS]";

fn parse_args() -> Result<(Listen, limits::Limits), String> {
    let mut args = std::env::args().skip(1);
    let mut listen = Listen::Vsock;
    let mut limits = limits::Limits::default();
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> Result<u64, String> {
            let value = args.next().ok_or(format!("{what} needs a number"))?;
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{what} {value:?}: not a positive whole number"))
        };
        match arg.as_str() {
            "--unix" => {
                let dir = args.next().ok_or("--unix needs a directory")?;
                listen = Listen::Unix(dir.into());
            }
            "--max-connections" => {
                limits.max_connections = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--body-budget" => {
                limits.body_budget = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--frame-timeout-ms" => {
                limits.frame_timeout = std::time::Duration::from_millis(number(&arg)?);
            }
            "--idle-timeout-ms" => {
                limits.idle_timeout = std::time::Duration::from_millis(number(&arg)?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok((listen, limits))
}

fn main() -> ExitCode {
    let (listen, limits) = match parse_args() {
        Ok(parsed) => parsed,
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
    match runtime.block_on(serve(listen, limits)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmkit-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: Listen, limits: limits::Limits) -> Result<(), String> {
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
    tokio::spawn(streams::serve(
        streams,
        limits::Gate::new(limits.max_connections),
    ));
    let gate = limits::Gate::new(limits.max_connections);
    let budget = limits::Budget::new(limits.body_budget);
    tokio::spawn(async move {
        loop {
            let conn = rpc.accept_or_pause().await;
            // Over the limit: closed at once, so no caller can hold every fd.
            let Some(admitted) = gate.admit() else {
                drop(conn);
                continue;
            };
            let served = rpc::serve(conn, Arc::clone(&service), limits.clone(), budget.clone());
            tokio::spawn(async move {
                served.await;
                drop(admitted);
            });
        }
    });
    // Serve until killed; in a guest the agent lives as long as the guest.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("watch SIGTERM: {e}"))?;
    term.recv().await;
    Ok(())
}
