//! A command in the guest with this terminal's stdio attached: stdin passed on (when
//! asked), stdout and stderr kept apart, or one terminal in raw mode; the command's exit
//! code returned (128 + the signal for one killed by a signal). Ctrl-C without a
//! terminal is passed on to the command as SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use vmkit_core::GuestCommunicator;
use vmkit_process::{Command, ExitStatus, Processes};

use crate::error::{Error, Result};

/// How long a spawn or a control call may take.
const CALL: Duration = Duration::from_secs(30);
/// The signal Ctrl-C passes on (Linux's and macOS's number).
const SIGINT: i32 = 2;
/// One round of waiting for the command to end (then another).
const WAIT_ROUND: Duration = Duration::from_secs(3600);

/// What to run and how to attach it.
#[derive(Debug, Clone)]
pub(crate) struct Attach {
    /// The argv.
    pub(crate) argv: Vec<String>,
    /// `KEY=VALUE` entries.
    pub(crate) env: Vec<(String, String)>,
    /// The working directory.
    pub(crate) cwd: Option<String>,
    /// Pass stdin on.
    pub(crate) stdin: bool,
    /// Give it a terminal.
    pub(crate) tty: bool,
}

/// Runs `attach` in the guest behind `guest` and returns its exit code.
pub(crate) async fn run(guest: Arc<dyn GuestCommunicator>, attach: &Attach) -> Result<i32> {
    let mut cmd = Command::new(attach.argv.iter().map(String::as_str));
    for (key, value) in &attach.env {
        cmd = cmd.env(key, value);
    }
    if let Some(cwd) = &attach.cwd {
        cmd = cmd.cwd(cwd);
    }
    let raw = if attach.tty {
        let (rows, cols) = terminal_size();
        cmd = cmd.tty(rows, cols);
        RawMode::enter()
    } else {
        None
    };
    let op = format!("exec {:?}", attach.argv);
    let process_error = |source| Error::Process {
        op: op.clone(),
        source: Box::new(source),
    };
    let processes = Processes::new(guest);
    let mut process = processes.spawn(&cmd, CALL).await.map_err(process_error)?;
    let (outputs, input) = if let Some(tty) = process.take_tty() {
        let (read, write) = tokio::io::split(tty);
        let input = attach.stdin.then(|| pump(tokio::io::stdin(), write, true));
        (vec![pump(read, tokio::io::stdout(), false)], input)
    } else {
        let input = process
            .take_stdin()
            .and_then(|stdin| attach.stdin.then(|| pump(tokio::io::stdin(), stdin, true)));
        if !attach.stdin {
            process.close_stdin(CALL).await.map_err(process_error)?;
        }
        let outputs = [
            process
                .take_stdout()
                .map(|out| pump(out, tokio::io::stdout(), false)),
            process
                .take_stderr()
                .map(|err| pump(err, tokio::io::stderr(), false)),
        ];
        (outputs.into_iter().flatten().collect(), input)
    };
    let mut interrupts = (!attach.tty)
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok())
        .flatten();
    let status = loop {
        tokio::select! {
            status = process.wait(WAIT_ROUND) => match status {
                // A command may run for as long as it likes: wait another round.
                Err(vmkit_process::Error::Timeout { .. }) => {}
                other => break other.map_err(process_error)?,
            },
            Some(()) = async { match interrupts.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                process.kill(SIGINT, CALL).await.map_err(process_error)?;
            }
        }
    };
    // Output drains before the exit is reported; stdin no longer matters.
    if let Some(input) = input {
        input.abort();
    }
    for output in outputs {
        let _ = tokio::time::timeout(Duration::from_secs(10), output).await;
    }
    drop(raw);
    Ok(match status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal(signal) => 128 + signal,
    })
}

/// Copies `from` to `to` until end of file; at the end, `to` is shut down when
/// `close_at_end` (stdin reaching its end closes the command's stdin).
fn pump(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    close_at_end: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.flush().await;
        if close_at_end {
            let _ = to.shutdown().await;
        }
    })
}

/// This terminal's size, else 24 x 80.
fn terminal_size() -> (u16, u16) {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .filter(|w| w.ws_row > 0 && w.ws_col > 0)
        .map_or((24, 80), |w| (w.ws_row, w.ws_col))
}

/// The local terminal in raw mode (keys go to the guest's terminal as typed) until
/// dropped; `None` when stdin is not a terminal.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
