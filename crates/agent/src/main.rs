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
mod online;
mod power;
mod service;
mod streams;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    let (ttrpc_addr, stream_listener) = match &listen {
        Listen::Vsock => (
            format!("vsock://-1:{AGENT_PORT}"),
            streams::Listener::vsock(STREAM_PORT)
                .map_err(|e| format!("listen on vsock port {STREAM_PORT}: {e}"))?,
        ),
        Listen::Unix(dir) => {
            let agent = dir.join("agent.sock");
            let stream = dir.join("stream.sock");
            for path in [&agent, &stream] {
                let _ = std::fs::remove_file(path);
            }
            (
                format!("unix://{}", agent.display()),
                streams::Listener::unix(&stream)
                    .map_err(|e| format!("listen on {}: {e}", stream.display()))?,
            )
        }
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&ttrpc_addr)
        .map_err(|e| format!("listen on {ttrpc_addr}: {e}"))?
        .register_service(vmkit_proto::create_agent(service));
    server
        .start()
        .await
        .map_err(|e| format!("serve {ttrpc_addr}: {e}"))?;
    eprintln!("vmkit-agent: serving TTRPC on {ttrpc_addr}, streams on {stream_listener}");
    tokio::spawn(stream_listener.serve());
    // Serve until killed; in a guest the agent lives as long as the guest.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("watch SIGTERM: {e}"))?;
    term.recv().await;
    let _ = server.shutdown().await;
    Ok(())
}
