//! The per-VM supervisor behind `vmkit run --detach`: a process of its own that holds
//! the instance, reports its start on stdout (JSON lines: progress, then `ready` or
//! `error`), answers the control protocol on the entry's socket, and when the VM ends
//! (stopped, powered off, crashed) records how in the entry and exits.
//!
//! It holds the entry's lock for its whole life, so a supervisor that dies is seen as
//! gone at once; its VMM dies with it (vmkit's children get `PR_SET_PDEATHSIG`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use vmkit_core::{ExitInfo, ExitReason, Instance, ShutdownStage, StartOptions, VmEvent};

use crate::control::{self, Ended, Reply, Request, Status};
use crate::error::{Error, Result};
use crate::launch::Launch;
use crate::runtime_dir::Entry;

/// What the supervisor tells the `vmkit run --detach` that started it, one JSON line
/// each on its stdout.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Report {
    /// A start phase passed.
    Progress {
        /// The phase.
        step: String,
        /// Since the start began.
        elapsed_ms: u64,
    },
    /// The agent answered: the VM runs.
    Ready(Box<Status>),
    /// The start failed.
    Error {
        /// Why.
        message: String,
    },
}

/// What every answer about this VM needs to know.
#[derive(Debug, Clone)]
struct Context {
    name: String,
    started_at: u64,
    console_log: std::path::PathBuf,
    vmm_log: std::path::PathBuf,
}

/// A stop, handed from the connection that asked for it to the supervisor's main loop.
struct StopOrder {
    grace: Option<Duration>,
    force: bool,
    reply_to: OwnedWriteHalf,
}

/// Runs the supervisor of `entry`; returns when its VM has ended.
pub(crate) async fn supervise(entry: Entry) -> Result<()> {
    let _lock = entry.lock()?;
    let launch: Launch = read_launch(&entry)?;
    let layout = launch.config.layout();
    let ctx = Context {
        name: entry.name().to_owned(),
        started_at: unix_now(),
        console_log: layout.console_log(),
        vmm_log: layout.vmm_log(),
    };
    let vm: Arc<dyn Instance> = match launch.create() {
        Ok(vm) => Arc::from(vm),
        Err(e) => {
            report(&Report::Error {
                message: e.to_string(),
            })
            .await;
            record(
                &entry,
                &launch,
                ExitInfo::new(ExitReason::StartFailed).with_message(e.to_string()),
            );
            return Err(e);
        }
    };
    let socket = entry.control_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::io(format!("listen on {}", socket.display()), e))?;

    let progress = forward_progress(vm.as_ref());
    let started = vm.start(StartOptions::new()).await;
    progress.abort();
    if let Err(e) = started {
        report(&Report::Error {
            message: e.to_string(),
        })
        .await;
        let exit = vm.wait().await;
        record(&entry, &launch, exit);
        let _ = std::fs::remove_file(&socket);
        return Err(Error::vm("start", e));
    }
    let status = status(&ctx, vm.as_ref()).await;
    report(&Report::Ready(Box::new(status))).await;

    let exit = serve(&ctx, vm, listener).await;
    record(&entry, &launch, exit);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn read_launch(entry: &Entry) -> Result<Launch> {
    let path = entry.launch_file();
    let text =
        std::fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| Error::ConfigFile {
        path,
        message: e.to_string(),
    })
}

/// Prints the VM's start progress as report lines while it starts.
fn forward_progress(vm: &dyn Instance) -> tokio::task::JoinHandle<()> {
    let mut events = vm.events();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let VmEvent::StartProgress { step, elapsed_ms } = event {
                report(&Report::Progress {
                    step: step.to_string(),
                    elapsed_ms,
                })
                .await;
            }
        }
    })
}

/// One report line on stdout. A parent that went away is not an error: the VM runs on.
async fn report(report: &Report) {
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        let mut out = tokio::io::stdout();
        let _ = out.write_all(&line).await;
        let _ = out.flush().await;
    }
}

/// Answers requests until the VM ends; returns how it ended.
async fn serve(ctx: &Context, vm: Arc<dyn Instance>, listener: UnixListener) -> ExitInfo {
    let (stop_tx, mut stop_rx) = mpsc::channel::<StopOrder>(4);
    let mut connections = JoinSet::new();
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate());
    let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt());
    let order = loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let (vm, stop_tx, ctx) = (vm.clone(), stop_tx.clone(), ctx.clone());
                    connections.spawn(async move {
                        answer(stream, vm.as_ref(), &stop_tx, &ctx).await;
                    });
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            order = stop_rx.recv() => break order,
            exit = vm.wait() => return exit,
            _ = recv(&mut terminate) => break None,
            _ = recv(&mut interrupt) => break None,
        }
    };
    let (grace, force, reply_to) = match order {
        Some(o) => (o.grace, o.force, Some(o.reply_to)),
        None => (None, false, None),
    };
    let exit = stop(vm, connections, grace, force).await;
    if let Some(mut reply_to) = reply_to {
        let reply = Reply::Ok {
            value: serde_json::to_value(&exit).unwrap_or_default(),
        };
        if let Ok(mut line) = serde_json::to_vec(&reply) {
            line.push(b'\n');
            let _ = reply_to.write_all(&line).await;
        }
    }
    exit
}

/// Shuts the VM down: gracefully within `grace` (else the config's stages), or at once
/// by dropping the instance, which ends its VMM and releases all it holds.
async fn stop(
    vm: Arc<dyn Instance>,
    mut connections: JoinSet<()>,
    grace: Option<Duration>,
    force: bool,
) -> ExitInfo {
    if !force {
        let graceful = vm.shutdown();
        let ended = match grace {
            Some(grace) => tokio::time::timeout(grace, graceful).await.ok(),
            None => Some(graceful.await),
        };
        match ended {
            Some(Ok(exit)) => return exit,
            Some(Err(e)) => {
                return ExitInfo::new(ExitReason::HostShutdown)
                    .with_message(format!("shut down; cleanup failed: {e}"));
            }
            None => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    // The last reference: dropping it ends the VMM and releases its sockets and fds.
    drop(vm);
    ExitInfo::new(ExitReason::HostShutdown)
        .with_stage(ShutdownStage::Kill)
        .with_message(if force {
            "stopped by force (vmkit stop --force)"
        } else {
            "stopped by force: the guest did not power off in the time given (vmkit stop -t)"
        })
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).ok()
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads one request from `stream` and answers it.
async fn answer(
    stream: tokio::net::UnixStream,
    vm: &dyn Instance,
    stop_tx: &mpsc::Sender<StopOrder>,
    ctx: &Context,
) {
    let (read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout(Duration::from_secs(10), control::read_line(read)).await
    {
        Ok(Ok(Some(line))) => match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Stop { grace_secs, force }) => {
                let order = StopOrder {
                    grace: grace_secs.map(Duration::from_secs),
                    force,
                    reply_to: write,
                };
                // The main loop answers once the VM is down.
                let _ = stop_tx.send(order).await;
                return;
            }
            Ok(req) => carry_out(req, vm, ctx).await,
            Err(e) => Reply::Failed {
                message: format!("a malformed request: {e}"),
            },
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Reply::Failed {
            message: format!("read the request: {e}"),
        },
        Err(_) => Reply::Failed {
            message: "no request within 10 s".into(),
        },
    };
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = write.write_all(&line).await;
    }
}

async fn carry_out(req: Request, vm: &dyn Instance, ctx: &Context) -> Reply {
    let done = |value: serde_json::Value| Reply::Ok { value };
    let result: std::result::Result<serde_json::Value, String> = match req {
        Request::Status => serde_json::to_value(status(ctx, vm).await).map_err(|e| e.to_string()),
        Request::SetCpus { count } => match vm.cpu_hotplugger() {
            None => Err("vCPU hot-plug: this VM's backend or machine does not offer it".into()),
            Some(cpus) => match cpus.set_vcpus(count).await {
                Ok(resize) => match resize.failures.first() {
                    Some(f) => Err(format!("set_vcpus {count}: cpu{}: {}", f.index, f.error)),
                    None => Ok(serde_json::json!({
                        "requested": resize.requested,
                        "before": resize.before,
                        "achieved": resize.achieved,
                    })),
                },
                Err(e) => Err(e.to_string()),
            },
        },
        Request::AddMemory { mib } => match vm.memory_hotplugger() {
            None => Err(
                "memory hot-plug: this VM has no hot-plug slots (run it with --max-memory)".into(),
            ),
            Some(memory) => memory
                .hotplug_memory(mib)
                .await
                .map(|id| serde_json::json!({ "id": id, "mib": mib }))
                .map_err(|e| e.to_string()),
        },
        Request::AddDevice { device } => {
            let id = device.id().to_owned();
            vm.hotplug_device(device)
                .await
                .map(|()| serde_json::json!({ "id": id }))
                .map_err(|e| e.to_string())
        }
        Request::Unplug { id } => unplug(vm, &id).await,
        Request::Pause => vm
            .pause()
            .await
            .map(|()| serde_json::Value::Null)
            .map_err(|e| e.to_string()),
        Request::Resume => vm
            .resume()
            .await
            .map(|()| serde_json::Value::Null)
            .map_err(|e| e.to_string()),
        Request::Stop { .. } => Err("stop is answered by the supervisor itself".into()),
    };
    match result {
        Ok(value) => done(value),
        Err(message) => Reply::Failed { message },
    }
}

/// A device by id, else hot-plugged memory by id.
async fn unplug(vm: &dyn Instance, id: &str) -> std::result::Result<serde_json::Value, String> {
    if vm.devices().iter().any(|d| d.spec.id() == id) {
        return vm
            .unplug(id)
            .await
            .map(|()| serde_json::Value::Null)
            .map_err(|e| e.to_string());
    }
    match vm.memory_hotplugger() {
        Some(memory) => memory
            .unplug_memory(id)
            .await
            .map(|()| serde_json::Value::Null)
            .map_err(|e| e.to_string()),
        None => Err(format!("unplug {id}: no device or memory of that id")),
    }
}

/// What `inspect` and `ps` show.
async fn status(ctx: &Context, vm: &dyn Instance) -> Status {
    let vcpus = match vm.cpu_hotplugger() {
        Some(cpus) => cpus.query_cpus().await.ok().map(|c| c.len()),
        None => None,
    };
    let memory = match vm.memory_hotplugger() {
        Some(memory) => memory.query_memory().await.ok(),
        None => None,
    };
    Status {
        name: ctx.name.clone(),
        info: vm.vm_info(),
        devices: vm.devices(),
        vcpus,
        memory,
        supervisor_pid: std::process::id(),
        started_at: ctx.started_at,
        console_log: ctx.console_log.clone(),
        vmm_log: ctx.vmm_log.clone(),
    }
}

/// Leaves the exit record in the entry.
fn record(entry: &Entry, launch: &Launch, exit: ExitInfo) {
    let layout = launch.config.layout();
    let ended = Ended {
        exit,
        at: unix_now(),
        console_log: layout.console_log(),
        vmm_log: layout.vmm_log(),
    };
    let path = entry.exit_file();
    let written = serde_json::to_vec_pretty(&ended)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&path, text));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "cannot record how the VM ended");
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
