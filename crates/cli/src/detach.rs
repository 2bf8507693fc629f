//! `vmkit run --detach`: the VM's entry is made, its launch written there, and a
//! supervisor process (this binary, `vmkit supervise`) started in a process group of
//! its own; this command prints the supervisor's start progress and returns once the
//! guest agent answered (or the start failed).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::error::{Error, Result};
use crate::launch::Launch;
use crate::output::Output;
use crate::runtime_dir::Entry;
use crate::supervisor::Report;

/// Beyond the VM's own start deadline, how long the supervisor may take to report.
const MARGIN: Duration = Duration::from_secs(30);

/// `vmkit supervise <entry>`, its stderr into `log_path`, in a process group of its own.
fn spawn_supervisor(entry: &Entry, log_path: &std::path::Path) -> Result<tokio::process::Child> {
    let log = vmkit_core::state_dir::create_private_file(log_path)
        .map_err(|e| Error::io(format!("create {}", log_path.display()), e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("find the vmkit binary", e))?;
    tokio::process::Command::new(exe)
        .arg("supervise")
        .arg(entry.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own group: a Ctrl-C meant for this command does not reach the VM.
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("start the VM's supervisor", e))
}

/// Starts `launch` under a supervisor for `entry` (already created) and waits for it.
pub(crate) async fn run(entry: &Entry, launch: &Launch, out: &Output) -> Result<()> {
    let path = entry.launch_file();
    let text = serde_json::to_vec_pretty(launch)
        .map_err(|e| Error::io("write the launch", std::io::Error::other(e)))?;
    std::fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    let log_path = entry.supervisor_log();
    let mut child = spawn_supervisor(entry, &log_path)?;
    let reports = child
        .stdout
        .take()
        .ok_or_else(|| Error::io("read the supervisor", std::io::Error::other("no stdout")))?;
    let mut lines = tokio::io::BufReader::new(reports).lines();
    let deadline = launch.config.timeouts.start + MARGIN;
    let outcome = tokio::time::timeout(deadline, async {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Report>(&line) {
                Ok(Report::Progress { step, elapsed_ms }) => {
                    if !out.json {
                        eprintln!("  start +{elapsed_ms} ms: {step}");
                    }
                }
                Ok(Report::Ready(status)) => return Ok(*status),
                Ok(Report::Error { message }) => return Err((message, false)),
                Err(_) => {}
            }
        }
        Err((
            format!(
                "the supervisor ended without a word (its log: {})",
                log_path.display()
            ),
            false,
        ))
    })
    .await
    .unwrap_or_else(|_| {
        Err((
            format!("no answer from the supervisor within {deadline:?}"),
            true,
        ))
    });
    let console = launch.config.layout().console_log();
    match outcome {
        Ok(status) => {
            if out.json {
                out.json(&status)
            } else {
                out.line(&format!(
                    "{}: running (pid {}, backend {}); `vmkit exec {} -- CMD` runs a command, `vmkit stop {}` ends it",
                    status.name,
                    status.info.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    status.info.backend,
                    status.name,
                    status.name
                ));
                Ok(())
            }
        }
        Err((message, hung)) => {
            // A supervisor that hangs is not left behind: its VM goes with it. One that
            // reported the failure records it and ends by itself.
            if hung {
                let _ = child.start_kill();
            }
            let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
            Err(Error::StartFailed {
                vm: entry.name().to_owned(),
                message: format!(
                    "{message}; `vmkit logs {}` shows it, `vmkit rm {}` forgets it",
                    entry.name(),
                    entry.name()
                ),
                console: Some(console),
            })
        }
    }
}
