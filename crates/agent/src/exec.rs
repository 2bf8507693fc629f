//! Running a program to completion for the `Exec` call, and spawning one for an exec
//! stream.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use vmkit_proto::agent::{ExecRequest, ExecResponse};

/// Output kept per stream; more is read and dropped, and the response says so.
pub(crate) const MAX_OUTPUT: usize = 1 << 20;
/// The timeout when the request gives none.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The PATH programs see unless the request sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a request could not be run.
#[derive(Debug)]
pub(crate) enum ExecError {
    /// The request itself is malformed.
    Invalid(String),
    /// The program could not be started.
    Spawn(String),
}

/// A command for `argv` with a minimal environment plus `env` ("KEY=VALUE"), in `cwd`
/// (or "/"), killed when dropped.
pub(crate) fn command(argv: &[String], env: &[String], cwd: &str) -> Result<Command, ExecError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| ExecError::Invalid("argv is empty".into()))?;
    if program.is_empty() {
        return Err(ExecError::Invalid("argv[0] is empty".into()));
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/")
        .current_dir(if cwd.is_empty() { "/" } else { cwd })
        .kill_on_drop(true);
    for (i, entry) in env.iter().enumerate() {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                cmd.env(key, value);
            }
            _ => {
                return Err(ExecError::Invalid(format!(
                    "env[{i}] {entry:?} is not KEY=VALUE"
                )));
            }
        }
    }
    Ok(cmd)
}

/// Reads all of `from`, keeping the first [`MAX_OUTPUT`] bytes. Returns them and
/// whether anything was dropped.
async fn drain(mut from: impl AsyncRead + Unpin) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = MAX_OUTPUT - kept.len();
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn spawn(mut cmd: Command, argv0: &str) -> Result<Child, ExecError> {
    cmd.spawn()
        .map_err(|e| ExecError::Spawn(format!("exec {argv0}: {e}")))
}

/// Runs the request to completion (or its timeout).
pub(crate) async fn run(req: &ExecRequest) -> Result<ExecResponse, ExecError> {
    let mut cmd = command(&req.argv, &req.env, &req.cwd)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd, &req.argv[0])?;
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let stdin = child.stdin.take();
    let input = req.stdin.clone();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A program that exits without reading its input is not an error.
            let _ = stdin.write_all(&input).await;
        } // dropping stdin closes it
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .ok_or_else(|| ExecError::Spawn("no stdout pipe".into()))?,
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .ok_or_else(|| ExecError::Spawn("no stderr pipe".into()))?,
    );
    let work = async { tokio::join!(feed, stdout, stderr, child.wait()) };
    let mut resp = ExecResponse::new();
    match tokio::time::timeout(timeout, work).await {
        Ok(((), (out, out_cut), (err, err_cut), status)) => {
            let status =
                status.map_err(|e| ExecError::Spawn(format!("wait for {}: {e}", req.argv[0])))?;
            resp.stdout = out;
            resp.stdout_truncated = out_cut;
            resp.stderr = err;
            resp.stderr_truncated = err_cut;
            set_status(&mut resp, status);
        }
        Err(_) => {
            let _ = child.start_kill();
            if let Ok(status) = child.wait().await {
                set_status(&mut resp, status);
            }
            resp.timed_out = true;
        }
    }
    Ok(resp)
}

fn set_status(resp: &mut ExecResponse, status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => resp.exit_code = code,
        (None, signal) => {
            resp.exit_code = -1;
            resp.signal = signal.unwrap_or(0);
        }
    }
}

/// Spawns `argv` for an exec stream: stdin, stdout and stderr piped.
pub(crate) fn spawn_for_stream(argv: &[String]) -> Result<Child, ExecError> {
    let mut cmd = command(argv, &[], "/")?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd, &argv[0])
}
