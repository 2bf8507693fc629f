//! A stand-in for the hybrid vsock daemon (`vhost-device-vsock`): a process that takes
//! its command line (`--guest-cid N --socket VHOST --uds-path UDS`), creates the
//! vhost-user socket QEMU would connect to, and answers the host's hybrid vsock dials on
//! `UDS` (`CONNECT <port>\n` → `OK <n>\n`) by handing each connection to a real
//! vmkit-agent serving a [`FakeGuest`]: port 1025 to its
//! TTRPC service, port 1026 to its streams, any other port is closed as a guest with no
//! listener does.
//!
//! With the fake QEMU (`fake_qemu`) it gives the QEMU backend a guest agent
//! behind a fake VM: point the backend's `vhost_vsock_binary` option at a binary that
//! calls [`main`]. It creates the fake guest's directory (beside the vhost-user socket)
//! and removes it, with its sockets, on SIGTERM; after SIGKILL the next start replaces
//! it.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmkit_proto::{AGENT_PORT, STREAM_PORT};

use crate::fake_guest::FakeGuest;

/// The longest `CONNECT <port>` line accepted.
const MAX_LINE: usize = 32;

/// The daemon's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// `--guest-cid`.
    pub guest_cid: u32,
    /// `--socket`: the vhost-user socket for QEMU.
    pub socket: PathBuf,
    /// `--uds-path`: the hybrid vsock socket for the host.
    pub uds_path: PathBuf,
}

impl DaemonArgs {
    /// Reads vhost-device-vsock's single-VM options (`--name value` or `--name=value`).
    ///
    /// # Errors
    /// An unknown or incomplete option, or one missing.
    pub fn parse(args: &[String]) -> Result<DaemonArgs, String> {
        let (mut cid, mut socket, mut uds) = (None, None, None);
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, value) = match arg.split_once('=') {
                Some((n, v)) => (n, v.to_owned()),
                None => (
                    arg.as_str(),
                    it.next()
                        .cloned()
                        .ok_or_else(|| format!("{arg} needs a value"))?,
                ),
            };
            match name {
                "--guest-cid" => {
                    cid = Some(
                        value
                            .parse()
                            .map_err(|_| format!("--guest-cid {value:?}: not a number"))?,
                    );
                }
                "--socket" => socket = Some(PathBuf::from(value)),
                "--uds-path" => uds = Some(PathBuf::from(value)),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(DaemonArgs {
            guest_cid: cid.ok_or("--guest-cid is missing")?,
            socket: socket.ok_or("--socket is missing")?,
            uds_path: uds.ok_or("--uds-path is missing")?,
        })
    }
}

/// Runs the stand-in with this process's arguments; returns the exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match DaemonArgs::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-vsock: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-vsock: no runtime: {e}");
            return 2;
        }
    };
    match runtime.block_on(serve(&args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fake-vsock: {e}");
            1
        }
    }
}

fn named(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

async fn serve(args: &DaemonArgs) -> Result<(), String> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(named("watch SIGTERM".into()))?;
    let root = FakeGuest::root_for(&args.socket);
    let guest = FakeGuest::create(&root).map_err(named(format!("create {}", root.display())))?;
    let agent_dir = guest.agent_dir();
    std::fs::create_dir_all(&agent_dir)
        .map_err(named(format!("create {}", agent_dir.display())))?;
    let agent = vmkit_agent::start_with_root(
        &vmkit_agent::Listen::Unix(agent_dir.clone()),
        vmkit_agent::Limits::default(),
        guest.root(),
    )
    .map_err(named("start the agent".into()))?;
    let host = UnixListener::bind(&args.uds_path)
        .map_err(named(format!("listen on {}", args.uds_path.display())))?;
    // Last, as vhost-device-vsock does: its socket says the daemon is ready.
    let vhost = UnixListener::bind(&args.socket)
        .map_err(named(format!("listen on {}", args.socket.display())))?;
    let mut qemu = Vec::new();
    let mut next_port = 1024u32;
    loop {
        tokio::select! {
            conn = host.accept() => {
                if let Ok((conn, _)) = conn {
                    next_port = next_port.wrapping_add(1);
                    tokio::spawn(bridge(conn, agent_dir.clone(), next_port));
                }
            }
            conn = vhost.accept() => {
                // Held, never spoken to: the fake QEMU needs no vrings.
                if let Ok((conn, _)) = conn {
                    qemu.push(conn);
                }
            }
            _ = sigterm.recv() => break,
        }
    }
    drop(agent);
    for path in [&args.uds_path, &args.socket] {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir_all(guest.root());
    Ok(())
}

/// Reads the `CONNECT <port>` line byte by byte (nothing after it is consumed).
async fn connect_line(conn: &mut UnixStream) -> Option<u32> {
    let mut line = Vec::new();
    while line.len() < MAX_LINE {
        let byte = conn.read_u8().await.ok()?;
        if byte == b'\n' {
            let text = String::from_utf8(line).ok()?;
            return text.strip_prefix("CONNECT ")?.trim().parse().ok();
        }
        line.push(byte);
    }
    None
}

/// Hands one host connection to the agent listening for its port.
async fn bridge(mut conn: UnixStream, agent_dir: PathBuf, local_port: u32) {
    let Some(port) = connect_line(&mut conn).await else {
        return;
    };
    let target = match port {
        AGENT_PORT => vmkit_agent::Listen::ttrpc_socket(&agent_dir),
        STREAM_PORT => vmkit_agent::Listen::stream_socket(&agent_dir),
        // No listener on that port in the guest: the connection is reset.
        _ => return,
    };
    let Ok(mut guest) = UnixStream::connect(Path::new(&target)).await else {
        return;
    };
    if conn
        .write_all(format!("OK {local_port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_daemons_options_are_read_in_both_spellings() {
        let args = DaemonArgs::parse(&strings(&[
            "--guest-cid",
            "3",
            "--socket=/a",
            "--uds-path",
            "/b",
        ]))
        .unwrap();
        assert_eq!(
            args,
            DaemonArgs {
                guest_cid: 3,
                socket: "/a".into(),
                uds_path: "/b".into()
            }
        );
        assert_eq!(
            DaemonArgs::parse(&strings(&["--socket", "/a", "--uds-path", "/b"])).unwrap_err(),
            "--guest-cid is missing"
        );
        assert_eq!(
            DaemonArgs::parse(&strings(&["--vm", "x"])).unwrap_err(),
            "unknown option \"--vm\""
        );
    }
}
