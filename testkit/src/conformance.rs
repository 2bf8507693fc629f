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
//! | `devices_before_start_only` | cold devices are accepted in `New` only, a duplicate id is `InvalidConfig`, and `devices()` lists each as given (cold, attached); with `FS_SHARE` a share is accepted and listed, without it `Unsupported` |
//! | `capabilities_are_honest` | a reported capability works; a hot-plugger is `Some` exactly when its capability is reported; with `GUEST_AGENT`, `vm_info().guest` is where a client dialled by vmkit-vsock answers `Ping` |
//! | `wait_after_a_crash` | a VM that dies resolves `wait()` with `Crashed` and ends in `Shutdown` (with [`Target::crash`]) |
//! | `start_timeout` | a slow start given a short deadline (`StartOptions::with_timeout`) fails with `Timeout` by it, ends in `Shutdown` and leaves nothing (with [`Target::slow_start`]) |
//! | `concurrent_calls` | two `start`s at once: exactly one succeeds, the other is `InvalidState`; then many reads and agent calls at once all answer |
//! | `device_hotplug` | with `DISK_HOTPLUG`: a hot-plugged disk is accepted, a duplicate id is `BadArgument`, its unplug succeeds (with `DeviceDeleted` published), a second unplug is `NotFound`, and `devices()` lists the disk (hot) in between and not after; without it, `hotplug_disk` is `Unsupported`. The same for a NIC ([`Target::nic`]) with `NIC_HOTPLUG`; a share with `FS_SHARE` is plugged, listed and unplugged, or `Unsupported` (a cold-only transport), and `Unsupported` without it |
//! | `resource_hotplug` | with `CPU_HOTPLUG`: `set_vcpus(n + 1)` reaches it and `query_cpus` shows it; with `MEMORY_HOTPLUG`: `hotplug_memory` adds to `query_memory`'s plugged memory |
//! | `guest_calls_and_streams` | with `GUEST_AGENT`: calls at once on one client answer; with `GUEST_STREAMS`: a stream to the agent's stream port echoes 256 KiB byte-exact; with both: a process runs end to end through the agent's process service (`cat` echoes its stdin, an exit code comes back) |
//! | `two_runs_in_a_row` | a second VM on the same config (its state dir) starts and stops after the first |
//! | `cancelled_start` | a `start` whose future is dropped midway (with [`Target::slow_start`]) ends like a failed one: `Shutdown` within 5 s, `Exited` published, nothing left |
//! | `nothing_left` | after `shutdown` and the instance's drop: no process names the state dir (the VMM, its helpers), none holds a file in it, no Unix socket is bound or left in it, its lock is free, the reported VMM process is gone, a TAP it created is gone, a CID it reported is not leased ([`Target::held_outside`]) — where it cannot look (no `/proc`, no `/sys/class/net`, a CID the target cannot check), the check fails instead of passing |
//!
//! Every call a check makes has a deadline from the config's timeouts (a `start`:
//! `timeouts.start`; a `shutdown`: [`vmkit_core::Timeouts::shutdown_bound`]; two seconds
//! more each): a backend that hangs fails the check that called it, naming the call.
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
use std::time::Duration;

use async_trait::async_trait;
use vmkit_core::{
    Backend, Capabilities, DeviceInfo, DeviceSpec, DeviceState, DiskConfig, Error, ExitReason,
    Instance, InstanceConfig, ShareConfig, ShareVia, StartOptions, VmEvent, VmState,
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

    /// A NIC named `id` the backend can hot-plug on this host (a TAP where the backend
    /// needs one). `None` (the default): `device_hotplug` leaves NICs out, and its note
    /// says so.
    fn nic(&self, _id: &str) -> Option<vmkit_core::NicConfig> {
        None
    }

    /// Makes a running `vm` die as a crashed VMM would; `false` when the target cannot
    /// (the crash check is then skipped, and says so).
    async fn crash(&self, vm: &dyn Instance) -> bool;

    /// A config for a test VM named `id` whose `start` takes a second or more, so that a
    /// check can drop it midway (a real guest's boot; a fake with a start delay).
    /// `None` (the default): the `cancelled_start` check is skipped, and says so.
    fn slow_start(&self, _id: &str) -> Option<InstanceConfig> {
        None
    }

    /// What a VM that reported `info` may still hold outside its state dir, which only
    /// the target knows where to look for — a kernel-vsock CID lease — each as a
    /// sentence, once it has ended (`nothing_left` asks). The default looks for nothing,
    /// and so fails, saying it cannot look, for a VM that reported a CID.
    ///
    /// # Errors
    /// What cannot be looked for.
    fn held_outside(&self, info: &vmkit_core::VmInfo) -> Result<Vec<String>, String> {
        match info.cid {
            Some(cid) => Err(format!(
                "the VM reported CID {cid}, and the target does not say how to look for its \
                 lease (implement Target::held_outside)"
            )),
            None => Ok(Vec::new()),
        }
    }

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
    "start_timeout",
    "concurrent_calls",
    "device_hotplug",
    "resource_hotplug",
    "guest_calls_and_streams",
    "two_runs_in_a_row",
    "cancelled_start",
    "nothing_left",
];

fn checks() -> [(&'static str, Check); 16] {
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
        ("start_timeout", |t| Box::pin(start_timeout(t))),
        ("concurrent_calls", |t| Box::pin(concurrent_calls(t))),
        ("device_hotplug", |t| Box::pin(device_hotplug(t))),
        ("resource_hotplug", |t| Box::pin(resource_hotplug(t))),
        ("guest_calls_and_streams", |t| {
            Box::pin(guest_calls_and_streams(t))
        }),
        ("two_runs_in_a_row", |t| Box::pin(two_runs_in_a_row(t))),
        ("cancelled_start", |t| Box::pin(cancelled_start(t))),
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
    create_from(target, target.config(id))
}

/// A VM of `config` (which the check keeps, to look at its state dir afterwards).
fn create_from(target: &dyn Target, config: InstanceConfig) -> Result<Box<dyn Instance>, String> {
    let id = config.id.clone();
    target
        .backend()
        .create(config)
        .map_err(|e| format!("create {id}: {e}"))
}

/// What the suite adds to a call's own deadline before it calls the call hung.
const GRACE: Duration = Duration::from_secs(2);

/// `call`'s result, or an error naming `what` when it does not return within `limit`.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(limit, call).await.map_err(|_| {
        format!("{what} did not return within {limit:?}: a call must end at its deadline")
    })
}

/// How long a `start` and a `shutdown` of the target's VMs may take.
fn limits(target: &dyn Target) -> (Duration, Duration) {
    let t = target.config("limits").timeouts;
    (t.start + GRACE, t.shutdown_bound() + GRACE)
}

async fn start(target: &dyn Target, vm: &dyn Instance) -> Result<(), String> {
    let (limit, _) = limits(target);
    bounded("start", limit, vm.start(StartOptions::new()))
        .await?
        .map_err(|e| format!("start: {e}"))
}

async fn shutdown(target: &dyn Target, vm: &dyn Instance) -> Result<vmkit_core::ExitInfo, String> {
    let (_, limit) = limits(target);
    bounded("shutdown", limit, vm.shutdown())
        .await?
        .map_err(|e| format!("shutdown: {e}"))
}

async fn started(target: &dyn Target, id: &str) -> Result<Box<dyn Instance>, String> {
    let vm = create(target, id)?;
    let (limit, _) = limits(target);
    bounded(&format!("start {id}"), limit, vm.start(StartOptions::new()))
        .await?
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
    start(target, vm.as_ref()).await?;
    expect_state(vm.as_ref(), VmState::Running, "start")?;
    let pause = reports(vm.as_ref(), Capabilities::PAUSE);
    if pause {
        vm.pause().await.map_err(|e| format!("pause: {e}"))?;
        expect_state(vm.as_ref(), VmState::Paused, "pause")?;
        vm.resume().await.map_err(|e| format!("resume: {e}"))?;
        expect_state(vm.as_ref(), VmState::Running, "resume")?;
    }
    let exit = shutdown(target, vm.as_ref()).await?;
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
    start(target, vm.as_ref()).await?;
    let running = VmState::Running;
    refused(vm.start(StartOptions::new()).await, "start", running)?;
    refused(vm.resume().await, "resume", running)?;
    if let Some(disk) = target.disk() {
        refused(
            vm.add_disk(DiskConfig::new("late", disk)),
            "add_device",
            running,
        )?;
    }
    if reports(vm.as_ref(), Capabilities::PAUSE) {
        vm.pause().await.map_err(|e| format!("pause: {e}"))?;
        refused(vm.pause().await, "pause", VmState::Paused)?;
        refused(
            vm.start(StartOptions::new()).await,
            "start",
            VmState::Paused,
        )?;
    }
    shutdown(target, vm.as_ref()).await?;
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
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

async fn shutdown_twice_and_at_once(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-shutdowns").await?;
    let (a, b) = tokio::join!(shutdown(target, vm.as_ref()), shutdown(target, vm.as_ref()));
    let (a, b) = (a?, b?);
    ensure(a == b, || {
        format!("concurrent shutdowns differ: {a:?} vs {b:?}")
    })?;
    let c = shutdown(target, vm.as_ref()).await?;
    ensure(c == a, || {
        format!("a later shutdown differs: {c:?} vs {a:?}")
    })?;
    let w = bounded("wait after shutdown", GRACE, vm.wait()).await?;
    ensure(w == a, || {
        format!("wait() differs from shutdown: {w:?} vs {a:?}")
    })?;
    Ok(String::new())
}

async fn shutdown_before_start(target: &dyn Target) -> Result<String, String> {
    let vm = create(target, "conf-never")?;
    let exit = shutdown(target, vm.as_ref()).await?;
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
    let data = DiskConfig::new("data", &disk);
    vm.add_disk(data.clone())
        .map_err(|e| format!("add_disk in New: {e}"))?;
    match vm.add_disk(DiskConfig::new("data", &disk)) {
        Err(Error::InvalidConfig { .. }) => {}
        other => {
            return Err(format!(
                "a duplicate disk id: {other:?}, expected InvalidConfig"
            ));
        }
    }
    listed(vm.as_ref(), "data", Some(&DeviceSpec::Disk(data)), false)?;
    let shared = tempfile::tempdir().map_err(|e| format!("a directory to share: {e}"))?;
    let share = ShareConfig::new("conf-share", "conf-share", shared.path());
    let added = vm.add_device(DeviceSpec::Share(share.clone()));
    if reports(vm.as_ref(), Capabilities::FS_SHARE) {
        added.map_err(|e| format!("add_device of a share with FS_SHARE: {e}"))?;
        listed(vm.as_ref(), "conf-share", Some(&share.into()), false)?;
    } else {
        unsupported_without("add_device of a share", "FS_SHARE", added)?;
    }
    start(target, vm.as_ref()).await?;
    refused(
        vm.add_disk(DiskConfig::new("late", &disk)),
        "add_device",
        VmState::Running,
    )?;
    listed(vm.as_ref(), "late", None, false)?;
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

/// Whether `listed` is the device `given`, with what a backend decides filled in: a
/// share asked for with transport `Auto` is listed with the transport it got.
fn as_given(given: &DeviceSpec, listed: &DeviceSpec) -> bool {
    match (given, listed) {
        (DeviceSpec::Share(g), DeviceSpec::Share(l)) if g.via == ShareVia::Auto => {
            ShareConfig {
                via: ShareVia::Auto,
                ..l.clone()
            } == *g
        }
        _ => given == listed,
    }
}

/// `vm.devices()` lists `id` once as `spec` (hot or cold as `hot`, attached), or, with
/// no `spec`, does not list it.
fn listed(vm: &dyn Instance, id: &str, spec: Option<&DeviceSpec>, hot: bool) -> Result<(), String> {
    let devices = vm.devices();
    let found: Vec<&DeviceInfo> = devices.iter().filter(|d| d.id() == id).collect();
    match (spec, found.as_slice()) {
        (None, []) => Ok(()),
        (Some(spec), [one])
            if as_given(spec, &one.spec)
                && one.hot == hot
                && one.state == DeviceState::Attached =>
        {
            Ok(())
        }
        (Some(spec), _) => Err(format!(
            "devices() lists {found:?} for {id:?}, expected one attached {} (hot: {hot}): {spec:?}",
            spec.kind()
        )),
        (None, _) => Err(format!("devices() still lists {found:?} for {id:?}")),
    }
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
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

/// A VM with an agent says where it listens (`vm_info().guest`), and a client dialled
/// there by vmkit-vsock, not by the backend, answers `Ping`: what a host-side adapter of
/// a plugin relies on.
async fn guest_address_answers(vm: &dyn Instance) -> Result<(), String> {
    let Some(addr) = vm.vm_info().guest else {
        return Err("GUEST_AGENT reported but vm_info().guest is None while running".into());
    };
    let client = vmkit_vsock::connect_ttrpc_with_retry(&addr, AGENT_CALL)
        .await
        .map_err(|e| format!("dial vm_info().guest {addr}: {e}"))?;
    agent_ping(client)
        .await
        .map_err(|e| format!("Ping at vm_info().guest {addr}: {e}"))
}

async fn wait_after_a_crash(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-crash").await?;
    if !target.crash(vm.as_ref()).await {
        shutdown(target, vm.as_ref()).await?;
        return Ok("skipped: the target cannot crash a VM".into());
    }
    let exit = tokio::time::timeout(std::time::Duration::from_secs(10), vm.wait())
        .await
        .map_err(|_| "wait() did not resolve within 10 s of the crash".to_owned())?;
    ensure(exit.reason == ExitReason::Crashed, || {
        format!("wait() after a crash: {exit:?}")
    })?;
    expect_state(vm.as_ref(), VmState::Shutdown, "a crash")?;
    let again = shutdown(target, vm.as_ref()).await?;
    ensure(again == exit, || {
        format!("shutdown after a crash: {again:?}, expected {exit:?}")
    })?;
    Ok(String::new())
}

async fn start_timeout(target: &dyn Target) -> Result<String, String> {
    let Some(config) = target.slow_start("conf-deadline") else {
        return Ok("skipped: the target gives no slow start".into());
    };
    let vm = create_from(target, config.clone())?;
    let deadline = Duration::from_millis(200);
    let began = std::time::Instant::now();
    let result = bounded(
        "a start with a 200ms deadline",
        deadline + GRACE,
        vm.start(StartOptions::with_timeout(deadline)),
    )
    .await?;
    let took = began.elapsed();
    match result {
        Err(Error::Timeout { .. }) => {}
        Err(other) => {
            return Err(format!(
                "a start past its deadline: {other}, expected Timeout"
            ));
        }
        Ok(()) => {
            let _ = shutdown(target, vm.as_ref()).await;
            return Err(format!(
                "a start with a {deadline:?} deadline returned Ok after {took:?}: it must end \
                 by its deadline"
            ));
        }
    }
    expect_state(vm.as_ref(), VmState::Shutdown, "a start that timed out")?;
    drop(vm);
    let left = leftovers(&config, None).await?;
    ensure(left.is_empty(), || {
        format!("a start that timed out left: {}", left.join("; "))
    })?;
    Ok(String::new())
}

async fn concurrent_calls(target: &dyn Target) -> Result<String, String> {
    let vm = create(target, "conf-concurrent")?;
    let (limit, _) = limits(target);
    let (a, b) = tokio::join!(
        bounded("start", limit, vm.start(StartOptions::new())),
        bounded("start", limit, vm.start(StartOptions::new())),
    );
    let (a, b) = (a?, b?);
    let wrong = |r: &vmkit_core::Result<()>| matches!(r, Err(Error::InvalidState { .. }));
    ensure((a.is_ok() && wrong(&b)) || (b.is_ok() && wrong(&a)), || {
        format!("two starts at once: {a:?} and {b:?}; exactly one must start the VM")
    })?;
    let reads = (0..8).map(|_| async { vm.vm_info().state });
    let states = futures_join_all(reads).await;
    ensure(states.iter().all(|s| *s == VmState::Running), || {
        format!("vm_info() at once: {states:?}")
    })?;
    if reports(vm.as_ref(), Capabilities::GUEST_AGENT) {
        let pings = (0..4).map(|_| async {
            let client = vm.client().await.map_err(|e| format!("client(): {e}"))?;
            ping(client).await
        });
        for result in futures_join_all(pings).await {
            result?;
        }
    }
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

/// Runs every future at once and returns their outputs in order.
async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// How long an agent call (or a dial of the agent) a check makes may take.
const AGENT_CALL: Duration = Duration::from_secs(10);

/// One `Ping` on `client`, within [`AGENT_CALL`].
pub(crate) async fn agent_ping(client: vmkit_core::GuestClient) -> Result<(), ttrpc::Error> {
    let nanos = i64::try_from(AGENT_CALL.as_nanos()).unwrap_or(i64::MAX);
    vmkit_proto::AgentClient::new(client)
        .ping(
            ttrpc::context::with_timeout(nanos),
            &vmkit_proto::agent::PingRequest::new(),
        )
        .await
        .map(drop)
}

/// [`agent_ping`], its error as a check's.
async fn ping(client: vmkit_core::GuestClient) -> Result<(), String> {
    agent_ping(client).await.map_err(|e| format!("Ping: {e}"))
}

async fn device_hotplug(target: &dyn Target) -> Result<String, String> {
    let Some(image) = target.disk() else {
        return Ok("skipped: the target gives no disk image".into());
    };
    let vm = started(target, "conf-hotplug").await?;
    let hotplug = target.config("limits").timeouts.hotplug + GRACE;
    let disk = DiskConfig::new("conf-hot", &image);
    let plugged = bounded("hotplug_disk", hotplug, vm.hotplug_disk(disk.clone())).await?;
    if !reports(vm.as_ref(), Capabilities::DISK_HOTPLUG) {
        shutdown(target, vm.as_ref()).await?;
        return unsupported_without("hotplug_disk", "DISK_HOTPLUG", plugged);
    }
    plugged.map_err(|e| format!("hotplug_disk with DISK_HOTPLUG: {e}"))?;
    listed(vm.as_ref(), "conf-hot", Some(&disk.clone().into()), true)?;
    let again = bounded("hotplug_disk", hotplug, vm.hotplug_disk(disk)).await?;
    refused_as_duplicate("disk", again)?;
    let mut events = vm.events();
    bounded("unplug", hotplug, vm.unplug("conf-hot"))
        .await?
        .map_err(|e| format!("unplug a hot-plugged disk: {e}"))?;
    let deleted = bounded("DeviceDeleted after unplug", GRACE, async {
        loop {
            match events.recv().await {
                Ok(VmEvent::DeviceDeleted { .. }) => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    ensure(deleted, || {
        "unplug succeeded but no DeviceDeleted was published".into()
    })?;
    listed(vm.as_ref(), "conf-hot", None, true)?;
    match bounded("unplug", hotplug, vm.unplug("conf-hot")).await? {
        Err(Error::NotFound { .. }) => {}
        other => return Err(format!("a second unplug: {other:?}, expected NotFound")),
    }
    let mut note = nic_hotplug(target, vm.as_ref(), hotplug).await?;
    note += &share_hotplug(vm.as_ref(), hotplug).await?;
    shutdown(target, vm.as_ref()).await?;
    Ok(note)
}

/// Whether `vm` reports `cap`.
fn reports(vm: &dyn Instance, cap: Capabilities) -> bool {
    vm.vm_info().capabilities.contains(cap)
}

/// A hot-plug `call` of a VM without capability `cap` must say `Unsupported`.
fn unsupported_without(
    call: &str,
    cap: &str,
    plugged: vmkit_core::Result<()>,
) -> Result<String, String> {
    match plugged {
        Err(Error::Unsupported { .. }) => Ok(String::new()),
        other => Err(format!(
            "{call} without {cap}: {other:?}, expected Unsupported"
        )),
    }
}

/// A second hot-plug of a `what` under the same id must say `BadArgument`.
fn refused_as_duplicate(what: &str, again: vmkit_core::Result<()>) -> Result<(), String> {
    match again {
        Err(Error::BadArgument { .. }) => Ok(()),
        other => Err(format!(
            "a duplicate {what} id: {other:?}, expected BadArgument"
        )),
    }
}

/// A NIC hot-plugged, refused a second time under its id, and unplugged (or
/// `Unsupported` without `NIC_HOTPLUG`). The note says when the target gave no NIC.
async fn nic_hotplug(
    target: &dyn Target,
    vm: &dyn Instance,
    hotplug: Duration,
) -> Result<String, String> {
    let Some(nic) = target.nic("conf-nic") else {
        return Ok("NICs left out: the target gives no NIC (Target::nic)".into());
    };
    let plugged = bounded("hotplug_nic", hotplug, vm.hotplug_nic(nic.clone())).await?;
    if !reports(vm, Capabilities::NIC_HOTPLUG) {
        return unsupported_without("hotplug_nic", "NIC_HOTPLUG", plugged);
    }
    plugged.map_err(|e| format!("hotplug_nic with NIC_HOTPLUG: {e}"))?;
    let again = bounded("hotplug_nic", hotplug, vm.hotplug_nic(nic)).await?;
    refused_as_duplicate("NIC", again)?;
    bounded("unplug", hotplug, vm.unplug("conf-nic"))
        .await?
        .map_err(|e| format!("unplug a hot-plugged NIC: {e}"))?;
    Ok(String::new())
}

/// With `FS_SHARE`, a share hot-plugged is listed and unplugged, or `Unsupported`
/// (a share's transport may be cold only); without, `Unsupported`.
async fn share_hotplug(vm: &dyn Instance, hotplug: Duration) -> Result<String, String> {
    let shared = tempfile::tempdir().map_err(|e| format!("a directory to share: {e}"))?;
    let spec = DeviceSpec::Share(ShareConfig::new(
        "conf-hshare",
        "conf-hshare",
        shared.path(),
    ));
    let plugged = bounded("hotplug_device", hotplug, vm.hotplug_device(spec.clone())).await?;
    if !reports(vm, Capabilities::FS_SHARE) {
        return unsupported_without("hotplug_device of a share", "FS_SHARE", plugged);
    }
    match plugged {
        Err(Error::Unsupported { .. }) => {
            return Ok(" (shares: cold only here)".into());
        }
        Err(e) => return Err(format!("hotplug_device of a share with FS_SHARE: {e}")),
        Ok(()) => {}
    }
    listed(vm, "conf-hshare", Some(&spec), true)?;
    bounded("unplug", hotplug, vm.unplug("conf-hshare"))
        .await?
        .map_err(|e| format!("unplug a hot-plugged share: {e}"))?;
    listed(vm, "conf-hshare", None, true)?;
    Ok(String::new())
}

async fn resource_hotplug(target: &dyn Target) -> Result<String, String> {
    let vm = started(target, "conf-resources").await?;
    let hotplug = target.config("limits").timeouts.hotplug + GRACE;
    if let Some(cpus) = vm.cpu_hotplugger() {
        let before = bounded("query_cpus", hotplug, cpus.query_cpus())
            .await?
            .map_err(|e| format!("query_cpus: {e}"))?
            .len();
        let want = u32::try_from(before + 1).unwrap_or(u32::MAX);
        let resize = bounded("set_vcpus", hotplug, cpus.set_vcpus(want))
            .await?
            .map_err(|e| format!("set_vcpus({want}) with CPU_HOTPLUG: {e}"))?;
        let after = bounded("query_cpus", hotplug, cpus.query_cpus())
            .await?
            .map_err(|e| format!("query_cpus: {e}"))?
            .len();
        ensure(resize.achieved == want && after == before + 1, || {
            format!(
                "set_vcpus({want}) from {before}: achieved {}, query_cpus shows {after}",
                resize.achieved
            )
        })?;
    }
    if let Some(memory) = vm.memory_hotplugger() {
        let before = bounded("query_memory", hotplug, memory.query_memory())
            .await?
            .map_err(|e| format!("query_memory: {e}"))?;
        bounded("hotplug_memory", hotplug, memory.hotplug_memory(128))
            .await?
            .map_err(|e| format!("hotplug_memory(128) with MEMORY_HOTPLUG: {e}"))?;
        let after = bounded("query_memory", hotplug, memory.query_memory())
            .await?
            .map_err(|e| format!("query_memory: {e}"))?;
        ensure(after.plugged_mib == before.plugged_mib + 128, || {
            format!(
                "hotplug_memory(128): plugged {} MiB before, {} after",
                before.plugged_mib, after.plugged_mib
            )
        })?;
    }
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

async fn guest_calls_and_streams(target: &dyn Target) -> Result<String, String> {
    let vm: std::sync::Arc<dyn Instance> = started(target, "conf-guest").await?.into();
    let caps = vm.vm_info().capabilities;
    if caps.contains(Capabilities::GUEST_AGENT) {
        let client = vm.client().await.map_err(|e| format!("client(): {e}"))?;
        let calls = (0..4).map(|_| ping(client.clone()));
        for result in futures_join_all(calls).await {
            result.map_err(|e| format!("calls at once on one client: {e}"))?;
        }
    }
    if caps.contains(Capabilities::GUEST_STREAMS) {
        echo(vm.as_ref())
            .await
            .map_err(|e| format!("a stream with GUEST_STREAMS: {e}"))?;
    }
    if caps.contains(Capabilities::GUEST_AGENT | Capabilities::GUEST_STREAMS) {
        process_end_to_end(&vm)
            .await
            .map_err(|e| format!("a process with GUEST_AGENT and GUEST_STREAMS: {e}"))?;
    }
    shutdown(target, vm.as_ref()).await?;
    Ok(String::new())
}

/// A process through the guest's process service (`vmkit-process`): `cat` echoes its
/// stdin and exits 0 once it is closed; `sh -c 'exit 42'` is reported as exit code 42.
async fn process_end_to_end(vm: &std::sync::Arc<dyn Instance>) -> Result<(), String> {
    use crate::process_checks::run;
    use vmkit_process::{Command, ExitStatus, Processes};
    let deadline = Duration::from_secs(30);
    let processes = Processes::new(vm.clone());
    let work = async {
        let line = b"through the process service\n";
        let cat = run(&processes, &Command::new(["cat"]), line, deadline).await?;
        ensure(cat.stdout == line, || {
            format!("cat echoed {:?}", String::from_utf8_lossy(&cat.stdout))
        })?;
        ensure(cat.status == ExitStatus::Code(0), || {
            format!("cat ended with {}", cat.status)
        })?;
        let exits = run(
            &processes,
            &Command::new(["sh", "-c", "exit 42"]),
            b"",
            deadline,
        )
        .await?;
        ensure(exits.status == ExitStatus::Code(42), || {
            format!("`sh -c 'exit 42'` ended with {}", exits.status)
        })
    };
    bounded("the process", Duration::from_secs(60), work).await?
}

/// 256 KiB through an echo stream on the agent's stream port, byte-exact.
async fn echo(vm: &dyn Instance) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    let raw = vm
        .start_stream(vmkit_proto::STREAM_PORT)
        .await
        .map_err(|e| format!("start_stream: {e}"))?;
    let stream = vmkit_vsock::begin_stream(
        raw,
        &vmkit_proto::StreamHeader::Echo,
        Duration::from_secs(10),
        "the guest",
    )
    .await
    .map_err(|e| e.to_string())?;
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await?;
        w.shutdown().await
    };
    let reader = async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.map(|_| back)
    };
    let (written, back) = bounded("the echo", Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await?;
    written.map_err(|e| format!("write: {e}"))?;
    let back = back.map_err(|e| format!("read: {e}"))?;
    ensure(back == data, || {
        format!(
            "{} bytes sent, {} came back, not the same",
            data.len(),
            back.len()
        )
    })
}

async fn two_runs_in_a_row(target: &dyn Target) -> Result<String, String> {
    for run in ["first", "second"] {
        let vm = started(target, "conf-again")
            .await
            .map_err(|e| format!("the {run} run: {e}"))?;
        shutdown(target, vm.as_ref())
            .await
            .map_err(|e| format!("the {run} run: {e}"))?;
    }
    Ok(String::new())
}

async fn cancelled_start(target: &dyn Target) -> Result<String, String> {
    let Some(config) = target.slow_start("conf-cancel") else {
        return Ok("skipped: the target gives no slow start to cancel".into());
    };
    let vm = create_from(target, config.clone())?;
    let mut events = vm.events();
    let midway = Duration::from_millis(300);
    if let Ok(done) = tokio::time::timeout(midway, vm.start(StartOptions::new())).await {
        let _ = shutdown(target, vm.as_ref()).await;
        return Err(format!(
            "the slow start ended within {midway:?} ({done:?}): nothing to cancel"
        ));
    }
    // Dropped: the start must end as a failed one.
    let within = Duration::from_secs(5);
    let began = std::time::Instant::now();
    while vm.state() != VmState::Shutdown {
        if began.elapsed() > within {
            return Err(format!(
                "a start dropped after {midway:?} left the VM {} {within:?} later (a dropped \
                 start must end the VM, as a failed one does)",
                vm.state()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = bounded("wait after a cancelled start", GRACE, vm.wait()).await?;
    let mut exited = None;
    while let Ok(event) = events.try_recv() {
        if let VmEvent::Exited(info) = event {
            exited = Some(info);
        }
    }
    ensure(exited.as_ref() == Some(&exit), || {
        format!("a cancelled start: Exited event {exited:?}, wait() {exit:?}")
    })?;
    drop(vm);
    let left = leftovers(&config, None).await?;
    ensure(left.is_empty(), || {
        format!("a cancelled start left: {}", left.join("; "))
    })?;
    Ok(String::new())
}

async fn nothing_left(target: &dyn Target) -> Result<String, String> {
    let config = target.config("conf-left");
    let new_taps = taps_to_create(&config)?;
    let vm = create_from(target, config.clone())?;
    start(target, vm.as_ref()).await?;
    let info = vm.vm_info();
    shutdown(target, vm.as_ref()).await?;
    ensure(vm.vm_info().pid.is_none(), || {
        "vm_info() still reports a pid after shutdown".into()
    })?;
    drop(vm);
    let mut left = leftovers(&config, Some(&info)).await?;
    left.extend(target.held_outside(&info)?);
    for tap in new_taps {
        if std::path::Path::new(NET_DEVICES).join(&tap).exists() {
            left.push(format!("the TAP {tap} the VM created is left"));
        }
    }
    ensure(left.is_empty(), || left.join("; "))?;
    Ok(String::new())
}

/// For [`Target::held_outside`]: the CID `info` reported, when `in_use` says it is
/// still leased (e.g. `vmkit_qemu::cid_in_use`), as `nothing_left` reports it.
pub fn cid_still_leased(info: &vmkit_core::VmInfo, in_use: impl Fn(u32) -> bool) -> Vec<String> {
    info.cid
        .filter(|cid| in_use(*cid))
        .map(|cid| format!("CID {cid} is still leased"))
        .into_iter()
        .collect()
}

/// Where Linux lists network interfaces.
const NET_DEVICES: &str = "/sys/class/net";

/// The TAPs `config`'s NICs name that do not exist yet: the VM creates them, and they
/// must go with it. `Err` when the host offers no way to look.
fn taps_to_create(config: &InstanceConfig) -> Result<Vec<String>, String> {
    let taps: Vec<&String> = config
        .nics
        .iter()
        .filter_map(|nic| match &nic.backend {
            vmkit_core::NicBackend::Tap { name } => Some(name),
            _ => None,
        })
        .collect();
    if !taps.is_empty() && !std::path::Path::new(NET_DEVICES).is_dir() {
        return Err(format!(
            "cannot look for leaked TAPs: this host has no {NET_DEVICES}"
        ));
    }
    Ok(taps
        .into_iter()
        .filter(|tap| !std::path::Path::new(NET_DEVICES).join(tap).exists())
        .cloned()
        .collect())
}

/// What a VM of `config` (that reported `info` while it ran) left behind, looked for
/// for up to two seconds (a killed process takes a moment to go): processes naming its
/// state dir, files in it held open, Unix sockets bound or left in it, its lock held,
/// its VMM process. `Err` when this host offers no way to look.
async fn leftovers(
    config: &InstanceConfig,
    info: Option<&vmkit_core::VmInfo>,
) -> Result<Vec<String>, String> {
    if !std::path::Path::new("/proc/self/fd").is_dir() {
        return Err(
            "cannot look for leaked processes, fds and sockets: this host has no /proc".into(),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left = crate::leaks::left_by(config, info);
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
