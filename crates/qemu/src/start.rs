//! `start`: `New → Starting → Running`. Sets up the guest's vsock link (a CID, or a
//! vhost-device-vsock daemon), spawns QEMU (directly, stdin closed, stderr to the log
//! dir, dying with us), connects QMP and waits for the guest: its agent's answer to
//! `Ping`, or without an agent the ready line on the serial console — all before one
//! deadline. Any failure kills and reaps QEMU (and the daemon), removes the sockets and
//! ends in `Shutdown` with an error that names the phase and the cause.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::{Instant, sleep, timeout_at};
use vmkit_core::{Error as CoreError, ExitInfo, ExitReason, NicBackend, StartOptions, VmState};
use vmkit_qmp::{QmpClient, QmpOptions};

use crate::command::{Launch, build};
use crate::error::Error;
use crate::guest::{self, VsockDevice};
use crate::instance::{STDERR_LINES, Shared, lock, spawn_event_pump, spawn_monitor};
use crate::options::{Machine, Sandbox};
use crate::process::{Process, tail};
use crate::{accel, host, kernel_cmdline};

/// How often the serial console log is checked for the ready line.
const READY_POLL: Duration = Duration::from_millis(5);
/// How long a killed QEMU may take to be reaped after a failed start.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// How long after the start's deadline the outer bound fires (see [`start`]).
const PHASE_MARGIN: Duration = Duration::from_millis(250);

pub(crate) async fn start(shared: &Arc<Shared>, opts: StartOptions) -> vmkit_core::Result<()> {
    // Refused before anything is taken: the VM stays New and may be started again from
    // a runtime that has what QMP, vsock and deadlines need.
    crate::runtime::check("start")?;
    shared.transition("start", VmState::New, VmState::Starting)?;
    let timeout = opts.timeout.unwrap_or(shared.config.timeouts.start);
    let deadline = Instant::now() + timeout;
    let phase = Mutex::new(Phase::Prepare);
    let started = std::time::Instant::now();
    let mut cancel = shared.cancel.subscribe();
    let outcome = tokio::select! {
        // The agent phase ends at `deadline` by itself, with what its dials saw; the
        // margin keeps this outer bound from racing it and losing those details.
        result = timeout_at(deadline + PHASE_MARGIN, boot(shared, &phase, deadline, timeout, started)) => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CoreError::Timeout {
                op: format!("start: {}", current(&phase).describe()),
                after: timeout,
            }),
        },
        _ = async { cancel.wait_for(|c| *c).await.map(|_| ()) } => Err(CoreError::backend(
            format!("start: {}", current(&phase).describe()),
            Error::Cancelled,
        )),
    };
    if let Err(error) = outcome {
        fail(shared, &error).await;
        return Err(error);
    }
    // Running only if QEMU is still there: an exit that happened while we were
    // Starting was left to us by the monitor (see `spawn_monitor`).
    let exited = {
        let life = shared.life();
        shared.transition("start", VmState::Starting, VmState::Running)?;
        life.process.as_ref().and_then(|p| p.exited())
    };
    if let Some(exit) = exited {
        let info = shared.unrequested_exit(exit).await;
        shared.end(info).await;
    }
    tracing::info!(vm = %shared.config.id, elapsed_ms = started.elapsed().as_millis(), "VM running");
    Ok(())
}

fn current(phase: &Mutex<Phase>) -> Phase {
    *lock(phase)
}

fn set(phase: &Mutex<Phase>, to: Phase) {
    *lock(phase) = to;
}

/// The work of a start; bounded by the caller's deadline.
async fn boot(
    shared: &Arc<Shared>,
    phase: &Mutex<Phase>,
    deadline: Instant,
    timeout: Duration,
    started: std::time::Instant,
) -> vmkit_core::Result<()> {
    let progress = |step: String| {
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ = shared
            .events
            .send(vmkit_core::VmEvent::StartProgress { step, elapsed_ms });
    };
    let config = &shared.config;
    let options = &shared.options;
    let layout = config.layout();
    let op = |what: &str| format!("start: {what}");

    // Prepare: the state dir, accelerator, sandbox, command line.
    take_state_dir(shared).await?;
    let accel =
        accel::resolve(config.accel).map_err(|e| CoreError::backend(op("accelerator"), e))?;
    {
        let mut life = shared.life();
        life.accel = Some(accel);
        life.vcpu_threads = config.resources.boot_vcpus;
    }
    let sandbox = match options.sandbox {
        Sandbox::On => true,
        Sandbox::Off => false,
        Sandbox::Auto => has_seccomp(&options.binary).await,
    };
    // Only microvm needs the TSC frequency (a /proc/cpuinfo read).
    let tsc_khz = (options.machine == Machine::Microvm)
        .then(host::tsc_khz)
        .flatten();
    let cmdline = kernel_cmdline::build(options.machine, tsc_khz, &config.kernel.cmdline)?;
    let devices = shared.devices().clone();
    // vmkit opens every TAP itself (a TAP it creates vanishes with the VM); QEMU
    // inherits the fds.
    let mut nics: Vec<(vmkit_core::NicConfig, RawFd)> = Vec::new();
    let mut opened: Vec<OwnedFd> = Vec::new();
    for nic in &devices.nics {
        let fd = match &nic.backend {
            NicBackend::Tap { name } => {
                let fd = host::open_tap(name).map_err(|e| {
                    CoreError::io(op(&format!("open TAP {name} for NIC {}", nic.id)), e)
                })?;
                let raw = fd.as_raw_fd();
                opened.push(fd);
                raw
            }
            NicBackend::TapFd { fd } => *fd,
        };
        nics.push((nic.clone(), fd));
    }
    let mut keep_fds: Vec<RawFd> = nics.iter().map(|(_, fd)| *fd).collect();
    let plan = guest::Plan::for_config(config);
    let vsock = match guest::establish(&plan, config, options).await {
        Ok(Some((link, device))) => {
            if let VsockDevice::Kernel { vhostfd, .. } = &device {
                keep_fds.push(*vhostfd);
            }
            progress(match link.daemon_pid() {
                Some(pid) => format!("vhost-device-vsock up (pid {pid})"),
                None => format!("guest CID {} reserved", link.cid),
            });
            shared.life().link = Some(link);
            Some(device)
        }
        Ok(None) => None,
        Err(e) => return Err(CoreError::backend(op("set up the guest's vsock"), e)),
    };
    let args = build(&Launch {
        config,
        options,
        accel,
        cmdline: &cmdline,
        sandbox,
        disks: &devices.disks,
        nics: &nics,
        vsock: vsock.as_ref(),
    });
    let vmm_log = layout.vmm_log();
    let stderr = vmkit_core::state_dir::create_private_file(&vmm_log)
        .map_err(|e| CoreError::io(op(&format!("create {}", vmm_log.display())), e))?;
    tracing::debug!(vm = %config.id, binary = %options.binary.display(), ?args, "spawning QEMU");

    // Spawn.
    set(phase, Phase::Spawn);
    let process = Arc::new(
        Process::spawn(&options.binary, args, stderr, &keep_fds)
            .await
            .map_err(|e| CoreError::backend(op("spawn QEMU"), e))?,
    );
    {
        let mut life = shared.life();
        life.process = Some(Arc::clone(&process));
        life.tap_fds = opened;
    }
    spawn_monitor(shared, Arc::clone(&process));
    progress(format!("spawned QEMU (pid {})", process.pid()));

    // QMP.
    set(phase, Phase::Qmp);
    let qmp_opts = QmpOptions {
        // The start's own deadline ends this wait (and names the phase); the margin
        // keeps the client's deadline from racing it.
        connect_timeout: deadline.saturating_duration_since(Instant::now())
            + Duration::from_secs(1),
        command_timeout: config.timeouts.command,
        ..QmpOptions::default()
    };
    let qmp = tokio::select! {
        qmp = QmpClient::connect(layout.control_socket(), qmp_opts) => {
            qmp.map_err(|e| CoreError::backend(op("connect QMP"), Error::from(e)))?
        }
        exit = process.wait() => return Err(exited_early(shared, exit).await),
    };
    shared.life().qmp = Some(qmp.clone());
    spawn_event_pump(shared, &qmp);
    progress(format!("QMP connected (QEMU {})", qmp.version()));

    // The guest: its agent's answer, or without one the console's ready line.
    let agent_addr = shared.life().link.as_ref().map(|l| l.agent.clone());
    if let Some(addr) = agent_addr {
        set(phase, Phase::Agent);
        let agent = tokio::select! {
            agent = guest::wait_for_agent(&addr, deadline) => agent,
            exit = process.wait() => return Err(exited_early(shared, exit).await),
        };
        let agent = match agent {
            Ok(agent) => agent,
            // The dial used up the start's time: a start timeout, with what the dial saw.
            Err(Error::Vsock(vmkit_vsock::Error::DialTimeout { attempts, last, .. })) => {
                let server = shared.life().link.as_ref().and_then(|l| l.vhost_server());
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
                return Err(CoreError::Timeout {
                    op: format!(
                        "start: {} ({attempts} dials of {addr}; last: {last}{why})",
                        Phase::Agent.describe()
                    ),
                    after: timeout,
                });
            }
            Err(other) => {
                return Err(CoreError::backend(
                    op(&format!("reach the agent at {addr}")),
                    other,
                ));
            }
        };
        shared.life().agent = Some(agent);
        progress("guest agent answered".to_owned());
    } else {
        set(phase, Phase::Ready);
        let console = layout.console_log();
        tokio::select! {
            ready = wait_ready_line(&console, &options.ready_line) => {
                ready.map_err(|e| CoreError::io(op("read the serial console"), e))?;
            }
            exit = process.wait() => return Err(exited_early(shared, exit).await),
        }
        progress("guest ready".to_owned());
    }
    restrict_sockets(shared).await
}

/// Sets every socket QEMU and the vsock daemon made to 0600. They spawn with umask 077
/// (so a socket is 0700 at once, in a 0700 dir), but the owner's read and write are
/// all a Unix socket needs.
async fn restrict_sockets(shared: &Shared) -> vmkit_core::Result<()> {
    let mut sockets: Vec<PathBuf> = shared
        .config
        .layout()
        .sockets()
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    if let Some(link) = shared.life().link.as_ref() {
        sockets.extend(link.sockets().iter().cloned());
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

/// Makes the state and log dirs private, takes this VM's hold on the state dir, and
/// removes what an earlier owner left (its QMP socket, its console log). Nothing in the
/// dir is touched before the hold is taken: it may be another live VM's.
async fn take_state_dir(shared: &Shared) -> vmkit_core::Result<()> {
    let layout = shared.config.layout();
    let holder = format!("vm {:?}", shared.config.id);
    let prepared = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || {
            layout.prepare("start")?;
            layout.lock("start", &holder)
        })
        .await
    };
    let lock = match prepared {
        Ok(lock) => lock?,
        Err(join) => {
            return Err(CoreError::io(
                "start: prepare the state dir",
                std::io::Error::other(join.to_string()),
            ));
        }
    };
    shared.life().state_lock = Some(lock);
    for stale in [layout.control_socket(), layout.console_log()] {
        unless_missing(tokio::fs::remove_file(&stale).await)
            .map_err(|e| CoreError::io(format!("start: remove stale {}", stale.display()), e))?;
    }
    Ok(())
}

/// Why QEMU exited before the VM was running: a guest kernel panic (its line on the
/// console), a guest reset (QEMU's SHUTDOWN event said so), or QEMU's own failure (its
/// stderr).
async fn exited_early(shared: &Shared, exit: crate::process::ProcessExit) -> CoreError {
    let layout = shared.config.layout();
    let status = exit.to_string();
    let console = tail(&layout.console_log(), CONSOLE_SCAN_LINES).await;
    let reset = shared
        .life()
        .last_shutdown
        .as_ref()
        .is_some_and(|(guest, reason)| *guest && reason == "guest-reset");
    let error = if let Some(console) = panic_report(&console) {
        Error::GuestPanickedAtStart { status, console }
    } else if reset {
        let lines: Vec<&str> = console.lines().collect();
        Error::GuestResetAtStart {
            status,
            console: lines[lines.len().saturating_sub(PANIC_CONTEXT_LINES)..].join("\n"),
        }
    } else {
        Error::ExitedEarly {
            status,
            stderr: tail(&layout.vmm_log(), STDERR_LINES).await,
        }
    };
    CoreError::backend("start", error)
}

/// How many of the console's last lines are searched for a panic.
const CONSOLE_SCAN_LINES: usize = 200;
/// How many console lines a start error quotes.
const PANIC_CONTEXT_LINES: usize = 8;

/// The console lines that end with the guest kernel's last panic line (`Kernel panic -
/// not syncing: …`), with the lines before it that say what led there; `None` when the
/// console shows no panic.
fn panic_report(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.contains("Kernel panic - not syncing") && !l.contains("---[ end "))?;
    let from = (at + 1).saturating_sub(PANIC_CONTEXT_LINES);
    Some(lines[from..=at].join("\n"))
}

/// Kills and reaps QEMU, releases everything, and ends in `Shutdown` with `error` as
/// the exit's message.
async fn fail(shared: &Arc<Shared>, error: &CoreError) {
    let process = shared.life().process.clone();
    let mut exit = None;
    if let Some(process) = process {
        process.signal(libc::SIGKILL);
        exit = process.wait_timeout(REAP_TIMEOUT).await;
        if exit.is_none() {
            tracing::error!(
                pid = process.pid(),
                "QEMU not reaped {REAP_TIMEOUT:?} after SIGKILL"
            );
        }
    }
    tracing::warn!(vm = %shared.config.id, %error, "start failed");
    shared
        .end(ExitInfo {
            reason: ExitReason::StartFailed,
            stage: None,
            exit_code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            message: Some(error.to_string()),
        })
        .await;
}

/// Waits until a line of the file at `path` starts with `ready`. The file may not exist
/// yet (QEMU creates it). Unbounded: the caller's deadline bounds it.
async fn wait_ready_line(path: &Path, ready: &str) -> std::io::Result<()> {
    let mut file = loop {
        match tokio::fs::File::open(path).await {
            Ok(file) => break file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => sleep(READY_POLL).await,
            Err(e) => return Err(e),
        }
    };
    let mut scanner = LineScanner::new(ready);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            sleep(READY_POLL).await;
            continue;
        }
        if scanner.feed(&buf[..n]) {
            return Ok(());
        }
    }
}

/// Finds a line starting with a marker in a byte stream fed in arbitrary pieces.
struct LineScanner {
    marker: Vec<u8>,
    /// The start of the current line, up to the marker's length.
    line: Vec<u8>,
    /// The current line is already longer than the marker and did not match.
    skip: bool,
    /// The current line starts with the marker; it counts once it is complete.
    matched: bool,
}

impl LineScanner {
    fn new(marker: &str) -> Self {
        LineScanner {
            marker: marker.as_bytes().to_vec(),
            line: Vec::new(),
            skip: false,
            matched: false,
        }
    }

    /// `true` once a whole line (ended by a newline) started with the marker, so the
    /// line the guest printed is complete in the log when `start` returns.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                if self.matched {
                    return true;
                }
                self.line.clear();
                self.skip = false;
                continue;
            }
            if self.skip {
                continue;
            }
            self.line.push(b);
            if self.line == self.marker {
                self.matched = true;
                self.skip = true;
                continue;
            }
            if !self.marker.starts_with(&self.line) {
                self.skip = true;
            }
        }
        false
    }
}

/// Whether `binary` was built with seccomp (`-sandbox` in its `-help`). Asked once per
/// binary per process; a binary that cannot be asked gets no sandbox (its start will
/// report the real problem).
async fn has_seccomp(binary: &Path) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(known) = lock(cache).get(binary) {
        return *known;
    }
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("-help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let has = match tokio::time::timeout(Duration::from_secs(10), command.output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("-sandbox ")),
        _ => false,
    };
    lock(cache).insert(binary.to_owned(), has);
    has
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_panic_is_quoted_with_what_led_to_it() {
        let console = "[    0.5] Run /bin/false as init process\n\
                       [    0.6] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
                       [    0.6] CPU: 0 PID: 1 Comm: false\n\
                       [    0.6] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---";
        let report = panic_report(console).unwrap();
        assert!(
            report.starts_with("[    0.5] Run /bin/false as init process\n"),
            "{report}"
        );
        assert!(
            report.ends_with(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
            ),
            "{report}"
        );
        assert_eq!(panic_report("[ 0.1] booting\nVMKIT_READY\n"), None);
    }

    #[test]
    fn the_marker_must_start_a_line() {
        let mut s = LineScanner::new("VMKIT_READY");
        assert!(!s.feed(b"[    0.1] booting\nnot VMKIT_READY here\n"));
        assert!(s.feed(b"VMKIT_READY uptime=1.2\n"));
        let mut s = LineScanner::new("VMKIT_READY");
        assert!(
            !s.feed(b"VMKIT_READY up"),
            "not before the line is complete"
        );
        assert!(s.feed(b"time=1\n"), "the very first line counts");
    }

    proptest! {
        /// However the console output is cut into reads, the marker is found exactly
        /// when some line starts with it.
        #[test]
        fn found_whatever_the_chunking(
            before in proptest::collection::vec("[a-zA-Z _]{0,20}", 0..5),
            with_marker in any::<bool>(),
            cuts in proptest::collection::vec(1usize..8, 1..40),
        ) {
            let mut text = before.join("\n");
            if with_marker {
                text.push_str("\r\nVMKIT_READY x=1\n");
            }
            let bytes = text.as_bytes();
            let segments: Vec<&str> = text.split(['\n', '\r']).collect();
            let complete = &segments[..segments.len() - 1];
            let expected = complete.iter().any(|l| l.starts_with("VMKIT_READY"));
            let mut s = LineScanner::new("VMKIT_READY");
            let mut found = false;
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= bytes.len() { break; }
                let end = (at + cut).min(bytes.len());
                found |= s.feed(&bytes[at..end]);
                at = end;
            }
            prop_assert_eq!(found, expected, "{:?}", text);
        }
    }
}
