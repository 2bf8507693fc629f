//! Running a program to completion for the `Exec` call, and spawning one for an exec
//! stream. Both spawn through the process service's reaper, and both kill their program
//! when their caller goes away.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use vmkit_platform::child::Exit;
use vmkit_proto::agent::{ExecRequest, ExecResponse};

use crate::process::Reaper;
use crate::process::reaper::{ExitWatch, exit_fields};
use crate::process::spawn::{SpawnError, Spec, Stdio3, start};

/// Output kept per stream; more is read and dropped, and the response says so.
pub(crate) const MAX_OUTPUT: usize = 1 << 20;
/// The timeout when the request gives none.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A program spawned for `Exec` or an exec stream: its pipes, and a guard that kills it
/// (`SIGKILL`) unless it has exited when the guard is dropped.
pub(crate) struct Spawned {
    pub(crate) stdin: pipe::Sender,
    pub(crate) stdout: pipe::Receiver,
    pub(crate) stderr: pipe::Receiver,
    pub(crate) guard: KillOnDrop,
}

/// Kills a program that has not exited when dropped.
pub(crate) struct KillOnDrop {
    reaper: Reaper,
    pid: u32,
    exit: ExitWatch,
}

impl KillOnDrop {
    /// Waits for the program's exit.
    pub(crate) async fn wait(&mut self) -> Option<Exit> {
        self.exit
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|e| *e)
    }

    /// Kills the program now.
    pub(crate) fn kill(&self) {
        let _ = self.reaper.signal(self.pid, libc::SIGKILL);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.exit.borrow().is_none() {
            self.kill();
        }
    }
}

/// Spawns `argv` with `env` in `cwd`, on pipes.
pub(crate) fn spawn(
    reaper: &Reaper,
    argv: &[String],
    env: &[String],
    cwd: &str,
) -> Result<Spawned, SpawnError> {
    let spec = Spec::plain(argv.to_vec(), env, cwd)?;
    let started = start(&spec, reaper)?;
    let guard = KillOnDrop {
        reaper: reaper.clone(),
        pid: started.pid,
        exit: started.exit,
    };
    match started.stdio {
        Stdio3::Pipes {
            stdin,
            stdout,
            stderr,
        } => Ok(Spawned {
            stdin,
            stdout,
            stderr,
            guard,
        }),
        // A plain spec never asks for a TTY.
        Stdio3::Tty(_) => Err(SpawnError::Failed("exec: spawned on a tty".into())),
    }
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

/// Runs the request to completion (or its timeout).
pub(crate) async fn run(reaper: &Reaper, req: &ExecRequest) -> Result<ExecResponse, SpawnError> {
    let Spawned {
        mut stdin,
        stdout,
        stderr,
        mut guard,
    } = spawn(reaper, &req.argv, &req.env, &req.cwd)?;
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let input = req.stdin.clone();
    let feed = async move {
        // A program that exits without reading its input is not an error.
        let _ = stdin.write_all(&input).await;
    }; // dropping stdin closes it
    let mut resp = ExecResponse::new();
    let work = async { tokio::join!(feed, drain(stdout), drain(stderr), guard.wait()) };
    let (out, err, status) = match tokio::time::timeout(timeout, work).await {
        Ok(((), out, err, status)) => (out, err, status),
        Err(_) => {
            guard.kill();
            resp.timed_out = true;
            ((Vec::new(), false), (Vec::new(), false), guard.wait().await)
        }
    };
    (resp.stdout, resp.stdout_truncated) = out;
    (resp.stderr, resp.stderr_truncated) = err;
    // No status: the reaper is gone (the agent is stopping); -1 as for a signal.
    (resp.exit_code, resp.signal) = status.map_or((-1, 0), exit_fields);
    Ok(resp)
}
