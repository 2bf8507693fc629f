//! `vmkit run` in the foreground: the VM starts in this process with a progress line
//! per start phase; then either its serial console is shown until it ends, or the
//! command after `--` runs in the guest with this terminal's stdio and its exit code
//! becomes vmkit's. Ctrl-C (or SIGTERM) shuts the VM down gracefully.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmkit_core::{GuestCommunicator, Instance, StartOptions, VmEvent};

use crate::error::{Error, Result};
use crate::guest_command::{self, Attach};
use crate::launch::Launch;
use crate::output::Output;

/// Runs `launch` here; returns the exit code vmkit should end with. `scratch` holds
/// the VM's state and is removed after a clean run (kept, with its logs, after a
/// failed start).
pub(crate) async fn run(
    launch: &Launch,
    scratch: &Path,
    command: &[String],
    out: &Output,
) -> Result<i32> {
    let name = launch.config.id.clone();
    let vm: Arc<dyn Instance> = Arc::from(launch.create()?);
    let began = Instant::now();
    let progress = print_progress(vm.as_ref(), *out);
    let started = vm.start(StartOptions::new()).await;
    progress.abort();
    let console = launch.config.layout().console_log();
    if let Err(e) = started {
        return Err(Error::StartFailed {
            vm: name,
            message: format!("{e} (its files are kept in {})", scratch.display()),
            console: Some(console),
        });
    }
    out.note(&format!(
        "{name}: running after {:.3} s",
        began.elapsed().as_secs_f64()
    ));
    let code = if command.is_empty() {
        show_console(vm.as_ref(), &console).await?;
        0
    } else {
        let guest: Arc<dyn GuestCommunicator> = vm.clone();
        let attach = Attach {
            argv: command.to_vec(),
            env: Vec::new(),
            cwd: None,
            stdin: true,
            tty: false,
        };
        guest_command::run(guest, &attach).await?
    };
    let exit = vm
        .shutdown()
        .await
        .map_err(|e| Error::vm(format!("shut down VM {name:?}"), e))?;
    out.note(&format!("{name}: shut down ({:?})", exit.reason));
    drop(vm);
    let _ = std::fs::remove_dir_all(scratch);
    Ok(code)
}

/// Prints each start phase as it passes.
fn print_progress(vm: &dyn Instance, out: Output) -> tokio::task::JoinHandle<()> {
    let mut events = vm.events();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let VmEvent::StartProgress { step, elapsed_ms } = event {
                out.note(&format!("start +{elapsed_ms} ms: {step}"));
            }
        }
    })
}

/// Copies the console log to stdout as it grows, until the VM ends or Ctrl-C.
async fn show_console(vm: &dyn Instance, console: &Path) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Error::io("watch for Ctrl-C", e))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("watch for SIGTERM", e))?;
    let mut offset = 0u64;
    let mut stdout = tokio::io::stdout();
    let mut buf = Vec::new();
    loop {
        if let Ok(mut file) = tokio::fs::File::open(console).await {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Error::io(format!("read {}", console.display()), e))?;
            buf.clear();
            let n = file
                .read_to_end(&mut buf)
                .await
                .map_err(|e| Error::io(format!("read {}", console.display()), e))?;
            offset += n as u64;
            let _ = stdout.write_all(&buf).await;
            let _ = stdout.flush().await;
        }
        tokio::select! {
            _ = vm.wait() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
