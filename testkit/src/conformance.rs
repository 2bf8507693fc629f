//! The backend conformance suite: the checks every backend must pass to keep the one
//! [`Instance`] contract — today's QEMU backend, [`crate::fake_backend::FakeBackend`],
//! and any backend of yours.
//!
//! Give [`run`] a [`Target`]: the backend, a config for a test VM, and (optionally) how
//! to crash one. Each check creates its own instances and reports what it saw; a failed
//! check names itself and the difference ([`Report::assert_passed`] panics with all of
//! them).
//!
//! | check | what must hold |
//! | --- | --- |
//! | `life_cycle` | `New → Starting → Running → Paused → Running → Shutdown` through the calls, `state()` after each, the same `StateChanged` events in order, then `Exited` |
//! | `wrong_state_calls` | every call outside its states is refused with the exact `InvalidState { op, state }` (New, Running, Paused, Shutdown) |
//! | `start_twice` | a second `start` is `InvalidState` and changes nothing |
//! | `shutdown_twice_and_at_once` | concurrent and repeated `shutdown`s return the same `ExitInfo`, as `wait()` does |
//! | `shutdown_before_start` | `NeverStarted`, straight to `Shutdown` |
//! | `devices_before_start_only` | cold devices are accepted in `New` only |
//! | `capabilities_are_honest` | a reported capability works; a hot-plugger is `Some` exactly when its capability is reported; with `GUEST_AGENT`, `vm_info().guest` is where a client dialled by vmkit-vsock answers `Ping` |
//! | `wait_after_a_crash` | a VM that dies resolves `wait()` with `Crashed` and ends in `Shutdown` (with [`Target::crash`]) |
//! | `nothing_left` | after `shutdown` no socket the VM reported exists and its process is gone |
//!
//! ```no_run
//! use vmkit_core::{Instance, InstanceConfig};
//! use vmkit_testkit::conformance::{self, Target};
//! use vmkit_testkit::fake_backend::FakeBackend;
//!
//! struct Fake(tempfile::TempDir);
//!
//! #[async_trait::async_trait]
//! impl Target for Fake {
//!     fn backend(&self) -> &dyn vmkit_core::Backend { &FakeBackend }
//!     fn config(&self, id: &str) -> InstanceConfig {
//!         let kernel = self.0.path().join("vmlinuz");
//!         std::fs::write(&kernel, b"").unwrap();
//!         InstanceConfig::new(id, self.0.path().join(id), kernel)
//!     }
//!     async fn crash(&self, vm: &dyn Instance) -> bool {
//!         vmkit_testkit::fake_backend::crash(&vm.vm_info().id).await
//!     }
//! }
//!
//! # async fn run() {
//! conformance::run(&Fake(tempfile::tempdir().unwrap())).await.assert_passed();
//! # }
//! ```

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use vmkit_core::{
    Backend, Capabilities, DiskConfig, Error, ExitReason, Instance, InstanceConfig, StartOptions,
    VmEvent, VmState,
};

/// What the suite runs against.
#[async_trait]
pub trait Target: Send + Sync {
    /// The backend under test.
    fn backend(&self) -> &dyn Backend;

    /// A config for a test VM named `id` that starts on this host (its own state dir).
    fn config(&self, id: &str) -> InstanceConfig;

    /// A disk image a test VM may cold-plug (`None`: the device checks use none).
    fn disk(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Makes a running `vm` die as a crashed VMM would; `false` when the target cannot
    /// (the crash check is then skipped, and says so).
    async fn crash(&self, vm: &dyn Instance) -> bool;

    /// Whether a check's failure text is a known fault of the target's environment,
    /// not of the backend (e.g. a vsock daemon that never serves its guest): such a
    /// check is run once more, and its outcome says so. `false` by default.
    fn environment_fault(&self, _failure: &str) -> bool {
        false
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The check's name (see the module's table).
    pub check: &'static str,
    /// `Ok` when it held (with a note, e.g. "skipped: …"), else what it saw.
    pub result: Result<String, String>,
}

/// Every check's outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In the order run.
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// The checks that passed only because they were skipped (their note says why).
    pub fn skipped(&self) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| {
                o.result
                    .as_ref()
                    .is_ok_and(|note| note.starts_with("skipped"))
            })
            .collect()
    }

    /// Panics unless every check of [`CHECKS`] ran and passed, none of them skipped:
    /// what a target that offers everything the suite needs must reach.
    ///
    /// # Panics
    /// When a check is missing, failed or was skipped.
    pub fn assert_complete(&self) {
        assert_eq!(
            self.outcomes.len(),
            CHECKS.len(),
            "not every check ran: {self:?}"
        );
        self.assert_passed();
        assert!(
            self.skipped().is_empty(),
            "checks skipped: {:?}",
            self.skipped()
        );
    }

    /// Panics naming every failed check and what it saw.
    ///
    /// # Panics
    /// When a check failed.
    pub fn assert_passed(&self) {
        let failures = self.failures();
        if failures.is_empty() {
            return;
        }
        let mut text = format!(
            "{} of {} conformance checks failed:",
            failures.len(),
            self.outcomes.len()
        );
        for f in failures {
            let _ = write!(
                text,
                "\n- {}: {}",
                f.check,
                f.result.as_ref().err().map_or("", String::as_str)
            );
        }
        #[allow(clippy::panic)] // the point of an assertion helper
        {
            panic!("{text}");
        }
    }
}

type Check =
    for<'a> fn(&'a dyn Target) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// The checks, by name, in the order [`run`] runs them.
pub const CHECKS: &[&str] = &[
    "life_cycle",
    "wrong_state_calls",
    "start_twice",
    "shutdown_twice_and_at_once",
    "shutdown_before_start",
    "devices_before_start_only",
    "capabilities_are_honest",
    "wait_after_a_crash",
    "nothing_left",
];

fn checks() -> [(&'static str, Check); 9] {
    [
        ("life_cycle", |t| Box::pin(life_cycle(t))),
        ("wrong_state_calls", |t| Box::pin(wrong_state_calls(t))),
        ("start_twice", |t| Box::pin(start_twice(t))),
        ("shutdown_twice_and_at_once", |t| {
            Box::pin(shutdown_twice_and_at_once(t))
        }),
        ("shutdown_before_start", |t| {
            Box::pin(shutdown_before_start(t))
        }),
        ("devices_before_start_only", |t| {
            Box::pin(devices_before_start_only(t))
        }),
        ("capabilities_are_honest", |t| {
            Box::pin(capabilities_are_honest(t))
        }),
        ("wait_after_a_crash", |t| Box::pin(wait_after_a_crash(t))),
        ("nothing_left", |t| Box::pin(nothing_left(t))),
    ]
}

/// A [`Target::crash`] for backends whose VMM is a process `vm_info().pid` names:
/// SIGKILLs it, as the VMM dying would. `false` when the VM reports no pid or the
/// signal cannot be sent.
pub fn kill_vmm(vm: &dyn Instance) -> bool {
    let Some(pid) = vm.vm_info().pid.and_then(|p| i32::try_from(p).ok()) else {
        return false;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

/// Runs every check against `target`, one after the other.
pub async fn run(target: &dyn Target) -> Report {
    let mut report = Report::default();
    for (check, run) in checks() {
        let result = attempt(target, run).await;
        report.outcomes.push(Outcome { check, result });
    }
    report
}

/// Runs the one check named `check` (see [`CHECKS`]); `None` for an unknown name.
pub async fn run_one(target: &dyn Target, check: &str) -> Option<Outcome> {
    let (name, run) = checks().into_iter().find(|(name, _)| *name == check)?;
    Some(Outcome {
        check: name,
        result: attempt(target, run).await,
    })
}

/// Runs `check`, and once more when its failure is one the target calls a fault of its
/// environment ([`Target::environment_fault`]).
async fn attempt(target: &dyn Target, check: Check) -> Result<String, String> {
    match check(target).await {
        Err(first) if target.environment_fault(&first) => match check(target).await {
            Ok(note) => Ok(format!(
                "passed on a second try; the first met an environment fault: {first}{note}"
            )),
            Err(again) => Err(format!(
                "{again} (a first try met an environment fault: {first})"
            )),
        },
        other => other,
    }
}

/// `Err(text)` unless `cond`.
fn ensure(cond: bool, text: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(text()) }
}

fn create(target: &dyn Target, id: &str) -> Result<Box<dyn Instance>, String> {
    target
        .backend()
        .create(target.config(id))
        .map_err(|e| format!("create {id}: {e}"))
}

async fn started(target: &dyn Target, id: &str) -> Result<Box<dyn Instance>, String> {
    let vm = create(target, id)?;
    vm.start(StartOptions::new())
        .await
        .map_err(|e| format!("start {id}: {e}"))?;
    Ok(vm)
}

/// `result` must be `InvalidState { op, state }`.
fn refused<T>(result: vmkit_core::Result<T>, op: &str, state: VmState) -> Result<(), String> {
    match result {
        Err(Error::InvalidState { op: o, state: s }) if o == op && s == state => Ok(()),
        Err(other) => Err(format!(
            "{op} in {state}: expected InvalidState, got {other}"
        )),
        Ok(_) => Err(format!("{op} in {state}: accepted, expected InvalidState")),
    }
}

fn expect_state(vm: &dyn Instance, want: VmState, after: &str) -> Result<(), String> {
    let got = vm.state();
    ensure(got == want, || {
        format!("after {after}: state {got}, expected {want}")
    })
}

async fn life_cycle(target: &dyn Target) -> Result<String, String> {
    let vm = create(target, "conf-life")?;
    let mut events = vm.events();
    expect_state(vm.as_ref(), VmState::New, "create")?;
    vm.start(StartOptions::new())
        .await
        .map_err(|e| format!("start: {e}"))?;
    expect_state(vm.as_ref(), VmState::Running, "start")?;
    let pause = vm.vm_info().capabilities.contains(Capabilities::PAUSE);
    if pause {
        vm.pause().await.map_err(|e| format!("pause: {e}"))?;
        expect_state(vm.as_ref(), VmState::Paused, "pause")?;
        vm.resume().await.map_err(|e| format!("resume: {e}"))?;
        expect_state(vm.as_ref(), VmState::Running, "resume")?;
    }
    let exit = vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    expect_state(vm.as_ref(), VmState::Shutdown, "shutdown")?;
    let (n, s, r, p, d) = (
        VmState::New,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    );
    let mut want = vec![(n, s), (s, r)];
    if pause {
        want.extend([(r, p), (p, r)]);
    }
    want.push((r, d));
    let mut seen = Vec::new();
    let mut exited = None;
    while let Ok(event) = events.try_recv() {
        match event {
            VmEvent::StateChanged { from, to } => seen.push((from, to)),
            VmEvent::Exited(info) => exited = Some(info),
            _ => {}
        }
    }
    ensure(seen == want, || {
        format!("StateChanged events {seen:?}, expected {want:?}")
    })?;
    ensure(exited.as_ref() == Some(&exit), || {
        format!("Exited event {exited:?}, expected the shutdown's {exit:?}")
    })?;
    Ok(String::new())
}

async fn wrong_state_calls(target: &dyn Target) -> Result<String, String> {
    let vm = create(target, "conf-states")?;
    let new = VmState::New;
    refused(vm.pause().await, "pause", new)?;
    refused(vm.resume().await, "resume", new)?;
    refused(vm.unplug("nothing").await, "unplug", new)?;
    vm.start(StartOptions::new())
        .await
        .map_err(|e| format!("start: {e}"))?;
    let running = VmState::Running;
    refused(vm.start(StartOptions::new()).await, "start", running)?;
    refused(vm.resume().await, "resume", running)?;
    if let Some(disk) = target.disk() {
        refused(
            vm.add_disk(DiskConfig::new("late", disk)),
            "add_disk",
            running,
        )?;
    }
    if vm.vm_info().capabilities.contains(Capabilities::PAUSE) {
        vm.pause().await.map_err(|e| format!("pause: {e}"))?;
        refused(vm.pause().await, "pause", VmState::Paused)?;
        refused(
            vm.start(StartOptions::new()).await,
            "start",
            VmState::Paused,
        )?;
    }
    vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let gone = VmState::Shutdown;
    refused(vm.start(StartOptions::new()).await, "start", gone)?;
    refused(vm.pause().await, "pause", gone)?;
    refused(vm.resume().await, "resume", gone)?;
    refused(vm.unplug("nothing").await, "unplug", gone)?;
    Ok(String::new())
}

async fn start_twice(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-twice").await?;
    let info = vm.vm_info();
    refused(
        vm.start(StartOptions::new()).await,
        "start",
        VmState::Running,
    )?;
    let after = vm.vm_info();
    ensure(
        after.pid == info.pid && after.state == VmState::Running,
        || format!("the second start changed the VM: {info:?} → {after:?}"),
    )?;
    vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    Ok(String::new())
}

async fn shutdown_twice_and_at_once(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-shutdowns").await?;
    let (a, b) = tokio::join!(vm.shutdown(), vm.shutdown());
    let (a, b) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
    ensure(a == b, || {
        format!("concurrent shutdowns differ: {a:?} vs {b:?}")
    })?;
    let c = vm.shutdown().await.map_err(|e| e.to_string())?;
    ensure(c == a, || {
        format!("a later shutdown differs: {c:?} vs {a:?}")
    })?;
    let w = vm.wait().await;
    ensure(w == a, || {
        format!("wait() differs from shutdown: {w:?} vs {a:?}")
    })?;
    Ok(String::new())
}

async fn shutdown_before_start(target: &dyn Target) -> Result<String, String> {
    let vm = create(target, "conf-never")?;
    let exit = vm.shutdown().await.map_err(|e| e.to_string())?;
    ensure(exit.reason == ExitReason::NeverStarted, || {
        format!("shutdown in New: {exit:?}, expected NeverStarted")
    })?;
    expect_state(vm.as_ref(), VmState::Shutdown, "shutdown in New")?;
    refused(
        vm.start(StartOptions::new()).await,
        "start",
        VmState::Shutdown,
    )?;
    Ok(String::new())
}

async fn devices_before_start_only(target: &dyn Target) -> Result<String, String> {
    let Some(disk) = target.disk() else {
        return Ok("skipped: the target gives no disk image".into());
    };
    let vm = create(target, "conf-devices")?;
    vm.add_disk(DiskConfig::new("data", &disk))
        .map_err(|e| format!("add_disk in New: {e}"))?;
    match vm.add_disk(DiskConfig::new("data", &disk)) {
        Err(Error::InvalidConfig { .. }) => {}
        other => {
            return Err(format!(
                "a duplicate disk id: {other:?}, expected InvalidConfig"
            ));
        }
    }
    vm.start(StartOptions::new())
        .await
        .map_err(|e| format!("start: {e}"))?;
    refused(
        vm.add_disk(DiskConfig::new("late", &disk)),
        "add_disk",
        VmState::Running,
    )?;
    vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    Ok(String::new())
}

async fn capabilities_are_honest(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-caps").await?;
    let caps = vm.vm_info().capabilities;
    ensure(
        caps.contains(Capabilities::CPU_HOTPLUG) == vm.cpu_hotplugger().is_some(),
        || {
            format!(
                "CPU_HOTPLUG reported {} but cpu_hotplugger() is {}",
                caps.contains(Capabilities::CPU_HOTPLUG),
                vm.cpu_hotplugger().is_some()
            )
        },
    )?;
    ensure(
        caps.contains(Capabilities::MEMORY_HOTPLUG) == vm.memory_hotplugger().is_some(),
        || {
            format!(
                "MEMORY_HOTPLUG reported {} but memory_hotplugger() is {}",
                caps.contains(Capabilities::MEMORY_HOTPLUG),
                vm.memory_hotplugger().is_some()
            )
        },
    )?;
    if let Some(cpus) = vm.cpu_hotplugger() {
        cpus.query_cpus()
            .await
            .map_err(|e| format!("query_cpus with CPU_HOTPLUG: {e}"))?;
    }
    if let Some(memory) = vm.memory_hotplugger() {
        memory
            .query_memory()
            .await
            .map_err(|e| format!("query_memory with MEMORY_HOTPLUG: {e}"))?;
    }
    let agent = vm.client().await;
    if caps.contains(Capabilities::GUEST_AGENT) {
        agent.map_err(|e| format!("client() with GUEST_AGENT: {e}"))?;
        guest_address_answers(vm.as_ref()).await?;
    } else {
        match agent {
            Err(Error::Unsupported { .. }) => {}
            Err(other) => {
                return Err(format!(
                    "client() without GUEST_AGENT: {other}, expected Unsupported"
                ));
            }
            Ok(_) => {
                return Err("client() without GUEST_AGENT: a client, expected Unsupported".into());
            }
        }
    }
    vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    Ok(String::new())
}

/// A VM with an agent says where it listens (`vm_info().guest`), and a client dialled
/// there by vmkit-vsock, not by the backend, answers `Ping`: what a host-side adapter of
/// a plugin relies on.
async fn guest_address_answers(vm: &dyn Instance) -> Result<(), String> {
    let Some(addr) = vm.vm_info().guest else {
        return Err("GUEST_AGENT reported but vm_info().guest is None while running".into());
    };
    let within = std::time::Duration::from_secs(10);
    let client = vmkit_vsock::connect_ttrpc_with_retry(&addr, within)
        .await
        .map_err(|e| format!("dial vm_info().guest {addr}: {e}"))?;
    let nanos = i64::try_from(within.as_nanos()).unwrap_or(i64::MAX);
    vmkit_proto::AgentClient::new(client)
        .ping(
            ttrpc::context::with_timeout(nanos),
            &vmkit_proto::agent::PingRequest::new(),
        )
        .await
        .map(drop)
        .map_err(|e| format!("Ping at vm_info().guest {addr}: {e}"))
}

async fn wait_after_a_crash(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-crash").await?;
    if !target.crash(vm.as_ref()).await {
        vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        return Ok("skipped: the target cannot crash a VM".into());
    }
    let exit = tokio::time::timeout(std::time::Duration::from_secs(10), vm.wait())
        .await
        .map_err(|_| "wait() did not resolve within 10 s of the crash".to_owned())?;
    ensure(exit.reason == ExitReason::Crashed, || {
        format!("wait() after a crash: {exit:?}")
    })?;
    expect_state(vm.as_ref(), VmState::Shutdown, "a crash")?;
    let again = vm.shutdown().await.map_err(|e| e.to_string())?;
    ensure(again == exit, || {
        format!("shutdown after a crash: {again:?}, expected {exit:?}")
    })?;
    Ok(String::new())
}

async fn nothing_left(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-left").await?;
    let info = vm.vm_info();
    vm.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    for (role, socket) in &info.sockets {
        ensure(!socket.exists(), || {
            format!("the {role} socket {} is left", socket.display())
        })?;
    }
    if let Some(pid) = info.pid {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        ensure(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            || format!("the VMM process {pid} outlived shutdown"),
        )?;
    }
    ensure(vm.vm_info().pid.is_none(), || {
        "vm_info() still reports a pid".into()
    })?;
    Ok(String::new())
}
