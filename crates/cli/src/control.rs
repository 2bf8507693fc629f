//! The control protocol between `vmkit` commands and a detached VM's supervisor: one
//! JSON request line, one JSON reply line, over the entry's Unix socket. Every call has
//! a deadline; a line longer than [`MAX_LINE`] is refused, not buffered.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmkit_core::{DeviceInfo, DeviceSpec, ExitInfo, MemoryInfo, VmInfo};

/// Longest request or reply line.
pub(crate) const MAX_LINE: usize = 1 << 20;

/// What a command asks a supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub(crate) enum Request {
    /// The VM's status.
    Status,
    /// Set the vCPU count.
    SetCpus {
        /// How many.
        count: u32,
    },
    /// Add memory.
    AddMemory {
        /// MiB.
        mib: u64,
    },
    /// Hot-plug a device.
    AddDevice {
        /// The device.
        device: DeviceSpec,
    },
    /// Remove a hot-plugged device or memory.
    Unplug {
        /// Its id.
        id: String,
    },
    /// Stop the vCPUs.
    Pause,
    /// Restart them.
    Resume,
    /// Shut the VM down; the supervisor then ends.
    Stop {
        /// How long the guest may take to power off (`None`: the VM's config says).
        grace_secs: Option<u64>,
        /// At once, by force.
        force: bool,
    },
}

/// A supervisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub(crate) enum Reply {
    /// Done; what came of it.
    Ok {
        /// The result, shaped by the request.
        #[serde(default)]
        value: serde_json::Value,
    },
    /// Not done, and why.
    Failed {
        /// The error, as vmkit words it.
        message: String,
    },
}

/// A live VM, as its supervisor reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Status {
    /// The VM's name.
    pub(crate) name: String,
    /// vmkit's view: state, pid, sockets, guest address, capabilities.
    pub(crate) info: VmInfo,
    /// Its devices.
    pub(crate) devices: Vec<DeviceInfo>,
    /// vCPUs present, where the backend can say.
    pub(crate) vcpus: Option<usize>,
    /// Memory, where the backend can say.
    pub(crate) memory: Option<MemoryInfo>,
    /// The supervisor's pid.
    pub(crate) supervisor_pid: u32,
    /// When the VM was started, seconds since the epoch.
    pub(crate) started_at: u64,
    /// The serial console's log.
    pub(crate) console_log: PathBuf,
    /// The VMM's log.
    pub(crate) vmm_log: PathBuf,
}

/// How a VM ended, as its supervisor records it in the entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ended {
    /// vmkit's exit info.
    pub(crate) exit: ExitInfo,
    /// When, seconds since the epoch.
    pub(crate) at: u64,
    /// The serial console's log.
    pub(crate) console_log: PathBuf,
    /// The VMM's log.
    pub(crate) vmm_log: PathBuf,
}

/// Why a call to a supervisor did not get an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The socket could not be reached.
    #[error("connect {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed, or the answer was not a reply.
    #[error("{0}")]
    Protocol(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends `req` to the supervisor at `socket` and reads its reply, all within `deadline`.
pub(crate) async fn call(
    socket: &Path,
    req: &Request,
    deadline: Duration,
) -> Result<Reply, CallError> {
    let exchange = async {
        let mut stream =
            UnixStream::connect(socket)
                .await
                .map_err(|source| CallError::Connect {
                    path: socket.to_owned(),
                    source,
                })?;
        let mut line = serde_json::to_vec(req).map_err(|e| CallError::Protocol(e.to_string()))?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .await
            .map_err(|e| CallError::Protocol(format!("send: {e}")))?;
        let (read, _write) = stream.into_split();
        let reply = read_line(read)
            .await
            .map_err(|e| CallError::Protocol(format!("read the answer: {e}")))?
            .ok_or_else(|| CallError::Protocol("closed without an answer".into()))?;
        serde_json::from_slice(&reply)
            .map_err(|e| CallError::Protocol(format!("a malformed answer: {e}")))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| CallError::Timeout(deadline))?
}

/// One line (without its `\n`), at most [`MAX_LINE`] bytes; `None` at end of stream.
pub(crate) async fn read_line(read: impl AsyncRead + Unpin) -> std::io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_line_too_long_is_refused_and_a_short_one_read() {
        let long = vec![b'x'; MAX_LINE + 10];
        let err = read_line(&long[..]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let line = read_line(&b"{\"op\":\"status\"}\nmore"[..]).await.unwrap();
        assert_eq!(line.unwrap(), b"{\"op\":\"status\"}");
        assert_eq!(read_line(&b""[..]).await.unwrap(), None);
    }

    #[test]
    fn requests_round_trip_as_json() {
        for req in [
            Request::Status,
            Request::SetCpus { count: 2 },
            Request::Stop {
                grace_secs: Some(3),
                force: false,
            },
        ] {
            let text = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        }
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#"{"op":"pause"}"#
        );
    }

    #[tokio::test]
    async fn a_silent_supervisor_times_out_and_a_missing_one_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.sock");
        let err = call(&path, &Request::Status, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::Connect { .. }), "{err}");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let err = call(&path, &Request::Status, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::Timeout(_)), "{err}");
    }
}
