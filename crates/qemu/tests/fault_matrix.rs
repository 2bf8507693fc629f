//! The start/stop fault matrix, against a fake QEMU (`vmkit_testkit::fake_qemu`) for the
//! faults a real QEMU cannot be made to produce on demand, plus the orphan test with a
//! real QEMU. Each fault must end in `Shutdown` with a typed error naming the cause and
//! leave no child process, socket or fd behind.
//!
//! A custom harness: this binary is also the fake QEMU (when `VMKIT_FAKE_QEMU_SELF` is
//! set), the fake vsock daemon (when `VMKIT_FAKE_VSOCK_SELF` is set) and the host
//! process the orphan test kills (when `VMKIT_ORPHAN_HOST` is set).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a test binary

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use vmkit_core::{
    Error as CoreError, ExitReason, Instance, InstanceConfig, ShutdownStage, StartOptions, VmEvent,
    VmState,
};
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::fake_qemu;
use vmkit_testkit::leaks::{children, open_fds};

type TestFn = fn(&tokio::runtime::Runtime);

fn main() -> ExitCode {
    if std::env::var_os("VMKIT_FAKE_QEMU_SELF").is_some() {
        std::process::exit(fake_qemu::main());
    }
    if std::env::var_os("VMKIT_FAKE_VSOCK_SELF").is_some() {
        std::process::exit(vmkit_testkit::fake_vsock::main());
    }
    if std::env::var_os("VMKIT_ORPHAN_HOST").is_some() {
        orphan_host();
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: &[(&str, TestFn)] = &[
        ("missing_binary", missing_binary),
        (
            "exits_at_once_with_its_message",
            exits_at_once_with_its_message,
        ),
        ("never_creates_the_qmp_socket", never_creates_the_qmp_socket),
        ("hangs_on_qmp_commands", hangs_on_qmp_commands),
        ("ignores_sigterm", ignores_sigterm),
        ("crashes_while_running", crashes_while_running),
        (
            "pause_that_hangs_times_out_and_stays_running",
            pause_that_hangs_times_out_and_stays_running,
        ),
        (
            "a_thousand_cycles_leak_nothing",
            a_thousand_cycles_leak_nothing,
        ),
        (
            "a_start_from_a_runtime_without_io_spares_every_other_vm",
            a_start_from_a_runtime_without_io_spares_every_other_vm,
        ),
        (
            "a_live_state_dir_is_refused_to_a_second_instance",
            a_live_state_dir_is_refused_to_a_second_instance,
        ),
        (
            "a_dead_owners_state_dir_is_taken_over",
            a_dead_owners_state_dir_is_taken_over,
        ),
        (
            "dropping_a_running_instance_leaves_nothing",
            dropping_a_running_instance_leaves_nothing,
        ),
        (
            "a_log_planted_as_a_symlink_is_refused_not_followed",
            a_log_planted_as_a_symlink_is_refused_not_followed,
        ),
        (
            "disk_and_nic_hotplug_are_refused_while_paused_as_documented",
            disk_and_nic_hotplug_are_refused_while_paused_as_documented,
        ),
        (
            "the_conformance_suite_passes_with_the_fake_qemu",
            the_conformance_suite_passes_with_the_fake_qemu,
        ),
        (
            "a_pause_qemu_carries_out_after_its_timeout_is_followed",
            a_pause_qemu_carries_out_after_its_timeout_is_followed,
        ),
        (
            "a_late_resume_is_followed_and_shutdown_stays_graceful",
            a_late_resume_is_followed_and_shutdown_stays_graceful,
        ),
        (
            "a_pause_while_a_shutdown_runs_fails_at_once",
            a_pause_while_a_shutdown_runs_fails_at_once,
        ),
        (
            "an_agent_that_refuses_power_off_leaves_it_to_acpi",
            an_agent_that_refuses_power_off_leaves_it_to_acpi,
        ),
        (
            "killing_the_host_kills_its_qemu",
            killing_the_host_kills_its_qemu,
        ),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Warm up: the runtime's and the spawner's lazily created fds are not leaks.
    let warm = fake("", |_| {});
    runtime
        .block_on(warm.vm.start(StartOptions::new()))
        .unwrap();
    runtime.block_on(warm.vm.shutdown()).unwrap();
    drop(warm);
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let fds = open_fds();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            test(&runtime);
            // Everything the test opened is closed again once its VM is dropped.
            let deadline = Instant::now() + Duration::from_secs(2);
            while open_fds() != fds && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(open_fds(), fds, "fds leaked");
        }));
        if result.is_ok() {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            failed += 1;
        }
    }
    println!("\nfault matrix: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A VM whose "QEMU" is this binary acting as the fake, told `behaviour`.
struct Fake {
    _dir: tempfile::TempDir,
    vm: QemuInstance,
}

fn fake(behaviour: &str, edit: impl FnOnce(&mut InstanceConfig)) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("qemu");
    let me = std::env::current_exe().unwrap();
    fake_qemu::write_wrapper(
        &wrapper,
        &me,
        &[
            ("VMKIT_FAKE_QEMU_SELF", "1"),
            (fake_qemu::BEHAVIOUR_ENV, behaviour),
        ],
    )
    .unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel: the fake never reads it").unwrap();
    let mut config = InstanceConfig::new("fake", dir.path().join("state"), &kernel);
    config
        .backend_options
        .insert("binary".into(), wrapper.display().to_string());
    config
        .backend_options
        .insert("sandbox".into(), "off".into());
    config
        .backend_options
        .insert("ready_line".into(), "VMKIT_READY".into());
    // The fake serves QMP and prints the ready line; it has no guest agent.
    config.transport = vmkit_core::GuestTransport::None;
    config.timeouts.start = Duration::from_secs(10);
    config.timeouts.command = Duration::from_millis(500);
    config.timeouts.shutdown_grace = Duration::from_millis(500);
    edit(&mut config);
    let vm = QemuBackend.create_instance(config).unwrap();
    Fake { _dir: dir, vm }
}

/// Gives the fake VM a guest agent: hybrid vsock through the fake vsock daemon (this
/// binary again).
fn with_fake_agent(config: &mut InstanceConfig) {
    let dir = config.state_dir.parent().unwrap().to_owned();
    let wrapper = dir.join("vhost-device-vsock");
    let me = std::env::current_exe().unwrap();
    fake_qemu::write_wrapper(&wrapper, &me, &[("VMKIT_FAKE_VSOCK_SELF", "1")]).unwrap();
    config
        .backend_options
        .insert("vhost_vsock_binary".into(), wrapper.display().to_string());
    config.transport = vmkit_core::GuestTransport::HybridVsock {
        uds: None,
        port: vmkit_proto::AGENT_PORT,
    };
    config.timeouts.command = Duration::from_secs(2);
}

/// The VM ended cleanly: `Shutdown`, no QEMU child, no socket, no lock file.
fn assert_released(f: &Fake) {
    assert_eq!(f.vm.state(), VmState::Shutdown);
    let layout = f.vm.config().layout();
    for (what, socket) in layout.sockets() {
        assert!(!socket.exists(), "{what} {} left behind", socket.display());
    }
    assert!(!layout.lock_file().exists(), "lock file left behind");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !children().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(children(), Vec::<u32>::new(), "child processes left");
}

fn missing_binary(rt: &tokio::runtime::Runtime) {
    let f = fake("", |c| {
        c.backend_options
            .insert("binary".into(), "/nonexistent/qemu-system-x86_64".into());
    });
    let err = rt.block_on(f.vm.start(StartOptions::new())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "start: spawn QEMU: spawn /nonexistent/qemu-system-x86_64: No such file or directory (os error 2)"
    );
    let exit = rt.block_on(f.vm.wait());
    assert_eq!(exit.reason, ExitReason::StartFailed);
    assert_eq!(exit.message.as_deref(), Some(err.to_string().as_str()));
    assert_released(&f);
}

fn exits_at_once_with_its_message(rt: &tokio::runtime::Runtime) {
    let f = fake("crash-at-start", |_| {});
    let err = rt.block_on(f.vm.start(StartOptions::new())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "start: QEMU exited during start (exit code 1): fake-qemu: -device bogus: crashing at start as told"
    );
    assert!(matches!(err, CoreError::Backend { .. }));
    let exit = rt.block_on(f.vm.wait());
    assert_eq!(
        (exit.reason, exit.exit_code),
        (ExitReason::StartFailed, Some(1))
    );
    assert_released(&f);
}

fn never_creates_the_qmp_socket(rt: &tokio::runtime::Runtime) {
    let f = fake("no-socket", |c| {
        c.timeouts.start = Duration::from_millis(1500)
    });
    let began = Instant::now();
    let err = rt.block_on(f.vm.start(StartOptions::new())).unwrap_err();
    let took = began.elapsed();
    match &err {
        CoreError::Timeout { op, after } => {
            assert_eq!(op, "start: waiting for QEMU's QMP socket");
            assert_eq!(*after, Duration::from_millis(1500));
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let exit = rt.block_on(f.vm.wait());
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert_released(&f);
}

fn hangs_on_qmp_commands(rt: &tokio::runtime::Runtime) {
    let f = fake("hang-on=system_powerdown,hang-on=quit", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let began = Instant::now();
    let exit = rt.block_on(f.vm.shutdown()).unwrap();
    assert_eq!(exit.stage, Some(ShutdownStage::Terminate), "{exit:?}");
    assert_eq!(exit.reason, ExitReason::HostShutdown);
    // powerdown (0.5 s command timeout) + quit (0.5 s) + SIGTERM: well under 3 s.
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_released(&f);
}

fn ignores_sigterm(rt: &tokio::runtime::Runtime) {
    let f = fake("ignore-sigterm,ignore-powerdown,hang-on=quit", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let exit = rt.block_on(f.vm.shutdown()).unwrap();
    assert_eq!(exit.stage, Some(ShutdownStage::Kill), "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    let log = std::fs::read_to_string(f.vm.config().layout().vmm_log()).unwrap();
    assert!(log.contains("ignoring SIGTERM as told"), "{log}");
    assert_released(&f);
}

fn crashes_while_running(rt: &tokio::runtime::Runtime) {
    let f = fake("crash-after-ready=300", |_| {});
    let mut events = f.vm.events();
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let exit = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), f.vm.wait()).await })
        .expect("wait() resolves when QEMU dies");
    assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
    assert_eq!(exit.exit_code, Some(3));
    assert_eq!(exit.stage, None);
    let message = exit.message.clone().unwrap();
    assert!(
        message.contains("fake-qemu: crashing after ready as told"),
        "{message}"
    );
    let mut saw_exit = false;
    while let Ok(event) = events.try_recv() {
        saw_exit |= event == VmEvent::Exited(exit.clone());
    }
    assert!(saw_exit, "no Exited event");
    assert_eq!(
        rt.block_on(f.vm.shutdown()).unwrap(),
        exit,
        "shutdown after a crash reports it"
    );
    assert_released(&f);
}

fn pause_that_hangs_times_out_and_stays_running(rt: &tokio::runtime::Runtime) {
    let f = fake("hang-on=stop", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let err = rt.block_on(f.vm.pause()).unwrap_err().to_string();
    assert_eq!(
        err,
        "pause: stop: stop: no reply within 500ms (command #0 on this connection)"
    );
    assert_eq!(f.vm.state(), VmState::Running);
    rt.block_on(f.vm.shutdown()).unwrap();
    assert_released(&f);
}

/// The soak (issue 12): 1,000 start/stop cycles, each a new instance in a new state
/// dir, leave no child process (nor zombie), fd, socket or lock file behind.
fn a_thousand_cycles_leak_nothing(rt: &tokio::runtime::Runtime) {
    // Warm up once: lazily created runtime and spawner resources are not leaks.
    let f = fake("", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    rt.block_on(f.vm.shutdown()).unwrap();
    drop(f);
    let fds = open_fds();
    let began = Instant::now();
    for i in 0..SOAK_CYCLES {
        let f = fake("", |_| {});
        rt.block_on(f.vm.start(StartOptions::new()))
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let exit = rt.block_on(f.vm.shutdown()).unwrap();
        assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "cycle {i}");
        assert_released(&f);
        drop(f);
    }
    assert_eq!(open_fds(), fds, "fds leaked over {SOAK_CYCLES} cycles");
    assert!(children().is_empty());
    println!(
        "soak: {SOAK_CYCLES} start/stop cycles in {:.1} s, nothing left",
        began.elapsed().as_secs_f64()
    );
}

/// How many cycles the soak runs.
const SOAK_CYCLES: usize = 1000;

/// Issue 12, defect 3: a start from a runtime without the IO driver used to panic the
/// shared spawner thread, so every QEMU it had forked died by the parent-death signal
/// and every later start failed. Now that start alone is refused, with the reason,
/// before it takes anything.
fn a_start_from_a_runtime_without_io_spares_every_other_vm(rt: &tokio::runtime::Runtime) {
    let healthy = fake("", |_| {});
    rt.block_on(healthy.vm.start(StartOptions::new())).unwrap();
    let pid = healthy.vm.vm_info().pid.unwrap();

    let careless = fake("", |_| {});
    let no_io = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let err = no_io
        .block_on(careless.vm.start(StartOptions::new()))
        .unwrap_err();
    assert!(matches!(err, CoreError::Runtime { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("start: the tokio runtime has no IO driver; build the runtime with"),
        "{err}"
    );
    assert_eq!(careless.vm.state(), VmState::New, "nothing was taken");
    drop(no_io);

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthy.vm.state(), VmState::Running);
    assert!(
        is_alive(Path::new(&format!("/proc/{pid}"))),
        "QEMU {pid} died"
    );
    // The refused instance starts from a proper runtime, and so does a new one.
    rt.block_on(careless.vm.start(StartOptions::new())).unwrap();
    let next = fake("", |_| {});
    rt.block_on(next.vm.start(StartOptions::new())).unwrap();
    for f in [&healthy, &careless, &next] {
        let exit = rt.block_on(f.vm.shutdown()).unwrap();
        assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
    }
    for f in [&healthy, &careless, &next] {
        assert_released(f);
    }
}

/// Issue 12, defect 4: a second instance on a live state dir used to delete the first
/// one's QMP socket and bind its own there. Now its start is refused, naming the dir and
/// its holder, and the first VM keeps its sockets and its QMP.
fn a_live_state_dir_is_refused_to_a_second_instance(rt: &tokio::runtime::Runtime) {
    let first = fake("", |_| {});
    rt.block_on(first.vm.start(StartOptions::new())).unwrap();
    let state_dir = first.vm.config().state_dir.clone();
    let socket = first.vm.config().layout().control_socket();
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&socket).unwrap());

    let second = fake("", |c| c.state_dir = state_dir.clone());
    let err = rt
        .block_on(second.vm.start(StartOptions::new()))
        .unwrap_err();
    assert!(matches!(err, CoreError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "start: state dir {} is in use by pid {} (vm \"fake\")",
            state_dir.display(),
            std::process::id()
        )
    );
    assert_eq!(second.vm.state(), VmState::Shutdown);
    let after = std::fs::metadata(&socket).expect("the first VM's QMP socket is still there");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&after),
        inode,
        "and it is the same one"
    );
    // The first VM is still reachable through it.
    rt.block_on(first.vm.pause()).unwrap();
    rt.block_on(first.vm.resume()).unwrap();
    rt.block_on(first.vm.shutdown()).unwrap();
    assert_released(&first);
    assert!(
        !first.vm.config().layout().lock_file().exists(),
        "lock file left"
    );
}

/// A state dir whose owner died (a lock file nobody holds, sockets left behind) is taken
/// over by the next start.
fn a_dead_owners_state_dir_is_taken_over(rt: &tokio::runtime::Runtime) {
    let f = fake("", |_| {});
    let layout = f.vm.config().layout();
    std::fs::create_dir_all(layout.state_dir()).unwrap();
    std::fs::write(layout.lock_file(), "pid 4194000 (vm \"gone\")\n").unwrap();
    let stale = std::os::unix::net::UnixListener::bind(layout.control_socket()).unwrap();
    drop(stale); // the socket file stays, as a killed owner leaves it
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let holder = std::fs::read_to_string(layout.lock_file()).unwrap();
    assert_eq!(
        holder,
        format!("pid {} (vm \"fake\")\n", std::process::id())
    );
    rt.block_on(f.vm.shutdown()).unwrap();
    assert_released(&f);
    assert!(!layout.lock_file().exists());
}

/// Issue 12, defect 8: dropping a running instance killed QEMU but left its sockets.
fn dropping_a_running_instance_leaves_nothing(rt: &tokio::runtime::Runtime) {
    let f = fake("", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let layout = f.vm.config().layout();
    assert!(layout.control_socket().exists());
    let Fake { _dir: dir, vm } = f;
    drop(vm);
    for (what, socket) in layout.sockets() {
        assert!(!socket.exists(), "{what} {} left", socket.display());
    }
    assert!(!layout.lock_file().exists(), "lock file left");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !children().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(children(), Vec::<u32>::new(), "child processes left");
    drop(dir);
}

/// Issue 12, defect 6: `vmm.log` was opened with create-and-truncate, so a symlink
/// planted at its name truncated the link's target (as root, any file). Now the open
/// refuses the link (`O_NOFOLLOW`): the start fails, saying so, and the target is whole.
fn a_log_planted_as_a_symlink_is_refused_not_followed(rt: &tokio::runtime::Runtime) {
    use std::os::unix::fs::PermissionsExt;
    let f = fake("", |_| {});
    let layout = f.vm.config().layout();
    std::fs::create_dir_all(layout.log_dir()).unwrap();
    std::fs::set_permissions(layout.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(layout.log_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = layout.state_dir().with_file_name("precious");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, layout.vmm_log()).unwrap();
    let err = rt.block_on(f.vm.start(StartOptions::new())).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "start: create {}: Too many levels of symbolic links (os error 40)",
            layout.vmm_log().display()
        )
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_released(&f);
}

/// Issue 12, defect 8: the contract said disk and NIC hot-plug were allowed while
/// Paused, the code refused them. The contract now says `Running` only (the call waits
/// for the guest to see the device): a paused VM refuses both with `InvalidState`.
fn disk_and_nic_hotplug_are_refused_while_paused_as_documented(rt: &tokio::runtime::Runtime) {
    use vmkit_core::DeviceConfigurator as _;
    let f = fake("", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    rt.block_on(f.vm.pause()).unwrap();
    let image = f.vm.config().state_dir.with_file_name("hot.img");
    std::fs::write(&image, b"").unwrap();
    let disk = rt
        .block_on(f.vm.hotplug_disk(vmkit_core::DiskConfig::new("hot", &image)))
        .unwrap_err();
    assert!(
        matches!(
            disk,
            CoreError::InvalidState {
                state: VmState::Paused,
                ..
            }
        ),
        "{disk:?}"
    );
    assert_eq!(
        disk.to_string(),
        "hotplug_disk: not allowed while the VM is paused"
    );
    let nic = rt
        .block_on(f.vm.hotplug_nic(vmkit_core::NicConfig::tap("net9", "vmkit-none", None)))
        .unwrap_err();
    assert_eq!(
        nic.to_string(),
        "hotplug_nic: not allowed while the VM is paused"
    );
    rt.block_on(f.vm.resume()).unwrap();
    rt.block_on(f.vm.shutdown()).unwrap();
    assert_released(&f);
}

/// The run-state changes a subscriber saw.
fn state_changes(
    events: &mut tokio::sync::broadcast::Receiver<VmEvent>,
) -> Vec<(VmState, VmState)> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let VmEvent::StateChanged { from, to } = event {
            seen.push((from, to));
        }
    }
    seen
}

/// Waits up to 5 s for `vm` to be in `state`.
fn await_state(vm: &QemuInstance, state: VmState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.state() != state && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vm.state(), state);
}

/// Issue 12, defect 7: a `pause` that timed out rolled the state back to Running, then
/// the stalled QEMU carried out the queued `stop`: QEMU paused, vmkit "running",
/// `resume` refused, and subscribers saw a pause that was undone. Now the state
/// follows QEMU: it stays Running while QEMU has not stopped, becomes Paused when
/// QEMU's STOP comes, and `resume` works.
fn a_pause_qemu_carries_out_after_its_timeout_is_followed(rt: &tokio::runtime::Runtime) {
    let f = fake("slow=stop:1200", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let mut events = f.vm.events();
    let err = rt.block_on(f.vm.pause()).unwrap_err().to_string();
    assert!(
        err.starts_with("pause: stop: stop: no reply within 500ms"),
        "{err}"
    );
    assert_eq!(f.vm.state(), VmState::Running, "QEMU has not stopped yet");
    await_state(&f.vm, VmState::Paused);
    rt.block_on(f.vm.resume()).unwrap();
    assert_eq!(f.vm.state(), VmState::Running);
    assert_eq!(
        state_changes(&mut events),
        [
            (VmState::Running, VmState::Paused),
            (VmState::Paused, VmState::Running)
        ],
        "only the changes QEMU made"
    );
    rt.block_on(f.vm.shutdown()).unwrap();
    assert_released(&f);
}

/// The mirror case: a `resume` that timed out left vmkit "paused" while QEMU ran, so
/// shutdown skipped the guest's graceful power-off. Now the state follows QEMU's RESUME
/// and shutdown asks QEMU before it chooses the first stage.
fn a_late_resume_is_followed_and_shutdown_stays_graceful(rt: &tokio::runtime::Runtime) {
    let f = fake("slow=cont:1200", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    rt.block_on(f.vm.pause()).unwrap();
    assert_eq!(f.vm.state(), VmState::Paused);
    let err = rt.block_on(f.vm.resume()).unwrap_err().to_string();
    assert!(
        err.starts_with("resume: cont: cont: no reply within 500ms"),
        "{err}"
    );
    assert_eq!(f.vm.state(), VmState::Paused, "QEMU has not resumed yet");
    await_state(&f.vm, VmState::Running);
    let exit = rt.block_on(f.vm.shutdown()).unwrap();
    assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
    assert_released(&f);
}

/// The conformance suite's target: the QEMU backend driving the fake QEMU, its guest
/// agent behind the fake vsock daemon (hybrid vsock), crashed by SIGKILL.
struct FakeQemuTarget {
    template: Fake,
}

#[async_trait::async_trait]
impl vmkit_testkit::conformance::Target for FakeQemuTarget {
    fn backend(&self) -> &dyn vmkit_core::Backend {
        &QemuBackend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        let mut config = self.template.vm.config().clone();
        config.id = id.to_owned();
        config.state_dir = self.template._dir.path().join(id);
        config
    }

    fn disk(&self) -> Option<PathBuf> {
        Some(self.template.vm.config().kernel.path.clone())
    }

    /// The CID the VM leased (none: the fake QEMU's guest is on hybrid vsock).
    fn held_outside(&self, info: &vmkit_core::VmInfo) -> Result<Vec<String>, String> {
        Ok(vmkit_testkit::conformance::cid_still_leased(
            info,
            vmkit_qemu::cid_in_use,
        ))
    }

    async fn crash(&self, vm: &dyn Instance) -> bool {
        vmkit_testkit::conformance::kill_vmm(vm)
    }
}

/// Issue 13: the QEMU backend keeps the contract the conformance suite checks.
fn the_conformance_suite_passes_with_the_fake_qemu(rt: &tokio::runtime::Runtime) {
    let target = FakeQemuTarget {
        template: fake("", with_fake_agent),
    };
    let report = rt.block_on(vmkit_testkit::conformance::run(&target));
    report.assert_passed();
    assert!(children().is_empty(), "a fake QEMU outlived the suite");
}

/// Issue 15: while a shutdown runs (here: waiting out the grace of a guest that
/// ignores the power button), a pause or resume fails at once saying so, rather than
/// racing the shutdown's stages.
fn a_pause_while_a_shutdown_runs_fails_at_once(rt: &tokio::runtime::Runtime) {
    let f = fake("ignore-powerdown", |_| {});
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    let vm = std::sync::Arc::new(f);
    let stopping = {
        let vm = std::sync::Arc::clone(&vm);
        rt.spawn(async move { vm.vm.shutdown().await })
    };
    std::thread::sleep(Duration::from_millis(100));
    let began = Instant::now();
    let err = rt.block_on(vm.vm.pause()).unwrap_err().to_string();
    assert!(
        began.elapsed() < Duration::from_millis(100),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(err, "pause: the VM is shutting down");
    let err = rt.block_on(vm.vm.resume()).unwrap_err().to_string();
    assert_eq!(err, "resume: the VM is shutting down");
    let exit = rt.block_on(stopping).unwrap().unwrap();
    assert_eq!(exit.stage, Some(ShutdownStage::Quit), "{exit:?}");
    assert_released(&vm);
}

/// Issue 15: shutdown asks the guest agent to power off first; an agent that refuses
/// (the host test mode behind the fake vsock daemon does) leaves it to the ACPI stage,
/// at once rather than after the grace period.
fn an_agent_that_refuses_power_off_leaves_it_to_acpi(rt: &tokio::runtime::Runtime) {
    let f = fake("", with_fake_agent);
    rt.block_on(f.vm.start(StartOptions::new())).unwrap();
    rt.block_on(vmkit_core::GuestCommunicator::client(&f.vm))
        .unwrap();
    let began = Instant::now();
    let exit = rt.block_on(f.vm.shutdown()).unwrap();
    assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
    assert!(
        began.elapsed() < f.vm.config().timeouts.shutdown_grace,
        "the refusal was not waited out: {:?}",
        began.elapsed()
    );
    assert_released(&f);
}

/// The orphan test's host: starts a real VM from a blocking-pool thread that then
/// retires, prints QEMU's pid, and waits to be killed.
fn orphan_host() -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_keep_alive(Duration::from_millis(200))
        .enable_all()
        .build()
        .unwrap();
    let image = vmkit_testkit::guest_image().expect("guest image");
    let dir = PathBuf::from(std::env::var("VMKIT_ORPHAN_HOST").unwrap());
    let vm = QemuBackend
        .create_instance(image.config("orphan", &dir))
        .unwrap();
    let handle = runtime.handle().clone();
    let vm = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            handle.block_on(vm.start(StartOptions::new())).unwrap();
            vm
        })
        .await
        .unwrap()
    });
    println!("{}", vm.vm_info().pid.unwrap());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn killing_the_host_kills_its_qemu(_rt: &tokio::runtime::Runtime) {
    if vmkit_testkit::qemu::require_qemu().is_none()
        || vmkit_testkit::require_guest_image().is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut host = std::process::Command::new(std::env::current_exe().unwrap())
        .env("VMKIT_ORPHAN_HOST", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(host.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let qemu: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("host said {line:?}"));
    let proc = PathBuf::from(format!("/proc/{qemu}"));
    // The thread that called start retires after 200 ms idle: QEMU must survive that.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        proc.exists(),
        "QEMU died with the blocking-pool thread that started it"
    );
    host.kill().unwrap();
    host.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(&proc) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!is_alive(&proc), "QEMU {qemu} outlived its host");
}

/// Alive, and not a zombie waiting for a reaper.
fn is_alive(proc: &Path) -> bool {
    std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}
