//! `start`: `New → Starting → Running`, as a short sequence of phases — prepare (the
//! state dir, the vsock link, the command line), spawn QEMU (directly, stdin closed,
//! stderr to the log dir, dying with us), connect QMP, and wait for the guest: its
//! agent's answer to `Ping`, or without an agent the ready line on the serial console —
//! all before one deadline. Any failure kills and reaps QEMU (and the daemon), releases
//! what the boot took and ends in `Shutdown` with an error naming the phase and cause.

mod console;
mod daemon_watch;
mod prepare;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};
use vmkit_core::{Error as CoreError, ExitInfo, ExitReason, StartOptions};
use vmkit_qmp::{QmpClient, QmpOptions};

use crate::error::Error;
use crate::guest;
use crate::locks::lock;
use crate::monitor::{spawn_event_pump, spawn_monitor};
use crate::process::Process;
use crate::vm::Vm;

/// How long a killed QEMU may take to be reaped after a failed start.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after the start's deadline the outer bound fires (see [`start`]).
const PHASE_MARGIN: Duration = Duration::from_millis(250);

/// The phases of a start, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepare,
    Spawn,
    Qmp,
    Ready,
    Agent,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Prepare => "preparing the state dir and command line",
            Phase::Spawn => "spawning QEMU",
            Phase::Qmp => "waiting for QEMU's QMP socket",
            Phase::Ready => "waiting for the guest's ready line on the serial console",
            Phase::Agent => "waiting for the guest agent to answer Ping",
        }
    }
}

/// A start's progress: the phase it is in (named by a timeout) and its
/// [`vmkit_core::VmEvent::StartProgress`] reports.
pub(crate) struct Progress<'a> {
    vm: &'a Vm,
    phase: Mutex<Phase>,
    started: std::time::Instant,
}

impl Progress<'_> {
    fn enter(&self, phase: Phase) {
        *lock(&self.phase) = phase;
    }

    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Publishes a step done.
    pub(crate) fn report(&self, step: String) {
        let elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.vm
            .publish(vmkit_core::VmEvent::StartProgress { step, elapsed_ms });
    }
}

pub(crate) async fn start(vm: &Arc<Vm>, opts: StartOptions) -> vmkit_core::Result<()> {
    // Refused before anything is taken: the VM stays New and may be started again from
    // a runtime that has what QMP, vsock and deadlines need.
    crate::runtime::check("start")?;
    // Dropped before it finishes (the caller dropped this future), the attempt ends
    // the VM: QEMU and everything the boot took go, as after a failed start.
    let attempt = vm.life().begin_start("start")?;
    let timeout = opts.timeout.unwrap_or(vm.config().timeouts.start);
    let deadline = Instant::now() + timeout;
    let progress = Progress {
        vm,
        phase: Mutex::new(Phase::Prepare),
        started: std::time::Instant::now(),
    };
    let outcome = tokio::select! {
        // The agent phase ends at `deadline` by itself, with what its dials saw; the
        // margin keeps this outer bound from racing it and losing those details.
        result = timeout_at(deadline + PHASE_MARGIN, boot(vm, &progress, deadline, timeout)) => match result {
            Ok(outcome) => outcome,
            Err(_) => Err(CoreError::Timeout {
                op: format!("start: {}", progress.phase().describe()),
                after: timeout,
            }),
        },
        () = vm.life().cancelled() => Err(CoreError::backend(
            format!("start: {}", progress.phase().describe()),
            Error::Cancelled,
        )),
    };
    if let Err(error) = outcome {
        fail(vm, &error).await;
        attempt.failed();
        return Err(error);
    }
    // Running only if QEMU is still there: an exit that happened while we were
    // Starting was left to us by the monitor (see `spawn_monitor`).
    attempt.running()?;
    if let Some(exit) = vm.process().and_then(|p| p.exited()) {
        let info = vm.unrequested_exit(exit).await;
        vm.end(info).await;
    }
    tracing::info!(vm = %vm.id(), elapsed_ms = progress.started.elapsed().as_millis(), "VM running");
    Ok(())
}

/// The work of a start, phase by phase; bounded by the caller's deadline.
async fn boot(
    vm: &Arc<Vm>,
    progress: &Progress<'_>,
    deadline: Instant,
    timeout: Duration,
) -> vmkit_core::Result<()> {
    let prepared = prepare::prepare(vm, progress).await?;
    progress.enter(Phase::Spawn);
    tracing::debug!(vm = %vm.id(), binary = %vm.options().binary.display(), args = ?prepared.args, "spawning QEMU");
    let process = Arc::new(
        Process::spawn(
            &vm.options().binary,
            prepared.args,
            prepared.stderr,
            &prepared.keep_fds,
        )
        .await
        .map_err(|e| CoreError::backend("start: spawn QEMU", e))?,
    );
    vm.with_running(|r| r.set_process(Arc::clone(&process), prepared.taps));
    spawn_monitor(vm, Arc::clone(&process));
    progress.report(format!("spawned QEMU (pid {})", process.pid()));

    progress.enter(Phase::Qmp);
    connect_qmp(vm, &process, deadline).await?;
    match vm.link_info() {
        Some((_, addr)) => {
            progress.enter(Phase::Agent);
            reach_agent(vm, &process, progress, addr, (deadline, timeout)).await?;
            progress.report("guest agent answered".to_owned());
        }
        None => {
            progress.enter(Phase::Ready);
            let console = vm.config().layout().console_log();
            tokio::select! {
                ready = console::wait_ready_line(&console, &vm.options().ready_line) => {
                    ready.map_err(|e| CoreError::io("start: read the serial console", e))?;
                }
                exit = process.wait() => return Err(console::exited_early(vm, exit).await),
            }
            progress.report("guest ready".to_owned());
        }
    }
    restrict_sockets(vm).await
}

/// Connects QMP (QEMU makes the socket a little after it starts) and starts the event
/// pump.
async fn connect_qmp(vm: &Arc<Vm>, process: &Process, deadline: Instant) -> vmkit_core::Result<()> {
    let qmp_opts = QmpOptions {
        // The start's own deadline ends this wait (and names the phase); the margin
        // keeps the client's deadline from racing it.
        connect_timeout: deadline.saturating_duration_since(Instant::now())
            + Duration::from_secs(1),
        command_timeout: vm.config().timeouts.command,
        ..QmpOptions::default()
    };
    let socket = vm.config().layout().control_socket();
    let qmp = tokio::select! {
        qmp = QmpClient::connect(socket, qmp_opts) => {
            qmp.map_err(|e| CoreError::backend("start: connect QMP", Error::from(e)))?
        }
        exit = process.wait() => return Err(console::exited_early(vm, exit).await),
    };
    vm.with_running(|r| r.set_qmp(qmp.clone()));
    spawn_event_pump(vm, &qmp);
    Ok(())
}

/// Waits for the guest agent at `addr` to answer `Ping`, and caches its connection. A
/// hybrid-vsock daemon that lost the guest's device is replaced, once
/// ([`daemon_watch`]).
async fn reach_agent(
    vm: &Vm,
    process: &Process,
    progress: &Progress<'_>,
    addr: vmkit_vsock::GuestAddr,
    (deadline, timeout): (Instant, Duration),
) -> vmkit_core::Result<()> {
    // Only a device on a hot-plug port can be replaced (not microvm's).
    let mut watched = match &addr {
        vmkit_vsock::GuestAddr::HybridVsock { uds, port } if vm.options().machine.has_pci() => {
            Some((uds.clone(), *port))
        }
        _ => None,
    };
    let agent = loop {
        let watch = async {
            match &watched {
                Some((uds, port)) => daemon_watch::daemon_lost(vm, uds, *port).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            agent = guest::wait_for_agent(&addr, deadline) => break agent,
            exit = process.wait() => return Err(console::exited_early(vm, exit).await),
            () = watch => {}
        }
        watched = None;
        tracing::warn!(vm = %vm.id(), %addr, "the vsock daemon drops every dial although the guest started its device; replacing both");
        let replaced = crate::relink::repair(vm).await;
        vm.open_link(true);
        replaced.map_err(|e| {
            CoreError::backend(
                "start: replace the vsock daemon that lost the guest's device",
                e,
            )
        })?;
        progress.report("replaced the vsock daemon that lost the guest's device".to_owned());
    };
    match agent {
        Ok(agent) => {
            vm.with_running(|r| r.set_agent(agent));
            Ok(())
        }
        // The dial used up the start's time: a start timeout, with what the dial saw.
        Err(Error::Vsock(vmkit_vsock::Error::DialTimeout { attempts, last, .. })) => {
            let server = vm.with_link(|l| l.vhost_server()).flatten();
            let restarted = match server {
                Some(server) => guest::daemon_restarted(&server).await,
                None => false,
            };
            let why = if restarted {
                "; vhost-device-vsock lost QEMU's vhost-user connection and restarted \
                 its server, so the guest's vsock is unreachable"
            } else {
                ""
            };
            let device = daemon_watch::device_state(vm).await;
            Err(CoreError::Timeout {
                op: format!(
                    "start: {} ({attempts} dials of {addr}; last: {last}{why}{device})",
                    Phase::Agent.describe()
                ),
                after: timeout,
            })
        }
        Err(other) => Err(CoreError::backend(
            format!("start: reach the agent at {addr}"),
            other,
        )),
    }
}

/// Sets every socket QEMU and the vsock daemon made to 0600. They spawn with umask 077
/// (so a socket is 0700 at once, in a 0700 dir), but the owner's read and write are
/// all a Unix socket needs.
async fn restrict_sockets(vm: &Vm) -> vmkit_core::Result<()> {
    let mut sockets: Vec<PathBuf> = vm
        .config()
        .layout()
        .sockets()
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    if let Some(link_sockets) = vm.with_link(|l| l.sockets().to_vec()) {
        sockets.extend(link_sockets);
    }
    // The link's hybrid socket is usually the layout's own: tighten each path once.
    sockets.sort();
    sockets.dedup();
    for socket in sockets {
        unless_missing(
            tokio::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).await,
        )
        .map_err(|e| CoreError::io(format!("start: chmod 0600 {}", socket.display()), e))?;
    }
    Ok(())
}

/// `result`, with "no such file" counting as done (a file that is not there needs no
/// removing or tightening).
fn unless_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Kills and reaps QEMU, releases everything, and ends in `Shutdown` with `error` as
/// the exit's message.
async fn fail(vm: &Vm, error: &CoreError) {
    let mut exit = None;
    if let Some(process) = vm.process() {
        process.signal(libc::SIGKILL);
        exit = process.wait_timeout(REAP_TIMEOUT).await;
        if exit.is_none() {
            tracing::error!(
                pid = process.pid(),
                "QEMU not reaped {REAP_TIMEOUT:?} after SIGKILL"
            );
        }
    }
    tracing::warn!(vm = %vm.id(), %error, "start failed");
    vm.end(ExitInfo {
        reason: ExitReason::StartFailed,
        stage: None,
        exit_code: exit.and_then(|e| e.code),
        signal: exit.and_then(|e| e.signal),
        message: Some(error.to_string()),
    })
    .await;
}
