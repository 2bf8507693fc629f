//! The out-of-process transport with a real backend process: this binary, run as
//! `<me> fake serve --socket PATH` (when `VMKIT_PLUGIN_TEST_BACKEND` is set), serves
//! vmkit-testkit's FakeBackend; SIGUSR1 crashes its live VMs. The host side drives it
//! through `PluginBackend` with the conformance suite and the model-based test, and
//! kills it mid-call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a test binary

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use vmkit_core::{Backend, ExitReason, Instance, InstanceConfig, StartOptions, VmState};
use vmkit_plugin::process::ProcessChannel;
use vmkit_plugin::{PluginBackend, PluginInstance};
use vmkit_testkit::fake_backend::FakeBackend;
use vmkit_testkit::model::{self, ModelTarget};

const BACKEND_ENV: &str = "VMKIT_PLUGIN_TEST_BACKEND";
/// Set in a child that plays a host: it launches a backend, starts a VM in it, prints
/// the backend's pid and waits to be killed.
const HOST_ENV: &str = "VMKIT_PLUGIN_TEST_HOST";

mod common;
use common::{TestFn, config};

fn main() -> ExitCode {
    if std::env::var_os(BACKEND_ENV).is_some() {
        return ExitCode::from(u8::try_from(backend_main()).unwrap_or(1));
    }
    if std::env::var_os(HOST_ENV).is_some() {
        host_main();
    }
    let tests: &[(&str, TestFn)] = &[
        ("the_conformance_suite_passes_out_of_process", conformance),
        ("the_model_holds_out_of_process", model_holds),
        (
            "a_backend_killed_mid_call_fails_its_calls_and_ends_its_vms",
            killed_mid_call,
        ),
        (
            "a_backend_that_cannot_serve_is_a_launch_error",
            launch_errors,
        ),
        (
            "a_hung_backend_process_times_out_typed_and_leaves_nothing",
            hung_process,
        ),
        (
            "events_are_pushed_and_exited_arrives_with_no_call_pending",
            exited_pushed,
        ),
        ("a_backend_process_dies_with_its_host", dies_with_host),
    ];
    common::run("plugin process tests", tests)
}

/// The backend process: FakeBackend served on the socket; SIGUSR1 crashes its VMs.
fn backend_main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, serve, flag, socket] = args.as_slice() else {
        return 2;
    };
    if name != "fake" || serve != "serve" || flag != "--socket" {
        eprintln!("test backend: this executable serves \"fake\", not {name:?}");
        return 2;
    }
    vmkit_plugin::process::run_backend(Arc::new(FakeBackend), Path::new(socket), || {
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                vmkit_testkit::fake_backend::crash_all().await;
            }
        });
    })
}

/// A backend process serving FakeBackend, and the backend that drives it.
struct Served {
    channel: Arc<ProcessChannel>,
    backend: PluginBackend,
}

fn launch() -> Served {
    let channel = launch_as(&std::env::current_exe().unwrap(), "fake").unwrap();
    let backend = PluginBackend::describe(Arc::clone(&channel) as _).unwrap();
    Served { channel, backend }
}

fn launch_as(binary: &Path, name: &str) -> Result<Arc<ProcessChannel>, vmkit_plugin::Error> {
    ProcessChannel::launch(&wrapper_for(binary), name)
}

/// A script that runs `binary` as the test backend (the environment marks it).
fn wrapper_for(binary: &Path) -> PathBuf {
    static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());
    let path = DIR.path().join("backend");
    if !path.exists() {
        vmkit_testkit::fake_qemu::write_wrapper(&path, binary, &[(BACKEND_ENV, "1")]).unwrap();
    }
    path
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        signal,
    )
    .unwrap();
}

struct OutOfProcess {
    served: Served,
    dir: tempfile::TempDir,
}

#[async_trait::async_trait]
impl vmkit_testkit::conformance::Target for OutOfProcess {
    fn backend(&self) -> &dyn Backend {
        &self.served.backend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        config(self.dir.path(), id)
    }

    fn disk(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("vmlinuz"))
    }

    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        Some(vmkit_core::NicConfig::user(id))
    }

    async fn crash(&self, _vm: &dyn Instance) -> bool {
        signal(self.served.channel.pid(), nix::sys::signal::Signal::SIGUSR1);
        true
    }

    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        Some(common::slow_config(self.dir.path(), id))
    }
}

fn conformance(rt: &tokio::runtime::Runtime) {
    let target = OutOfProcess {
        served: launch(),
        dir: tempfile::tempdir().unwrap(),
    };
    let report = rt.block_on(vmkit_testkit::conformance::run(&target));
    report.assert_passed();
    report.assert_complete();
}

/// The backend process every model case uses.
static MODEL_BACKEND: LazyLock<Served> = LazyLock::new(launch);

static MODEL_RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

struct ModelOutOfProcess;

#[async_trait::async_trait]
impl ModelTarget for ModelOutOfProcess {
    type Vm = PluginInstance;

    fn create(mut config: InstanceConfig) -> PluginInstance {
        config.timeouts.command = Duration::from_millis(500);
        MODEL_BACKEND.backend.create_plugin(config).unwrap()
    }

    fn configure(config: &mut InstanceConfig, _dir: &Path) {
        config
            .backend_options
            .insert("hotplug_ports".into(), Self::HOTPLUG_PORTS.to_string());
    }

    fn nic(id: &str) -> Option<vmkit_core::NicConfig> {
        Some(vmkit_core::NicConfig::user(id))
    }

    async fn crash(_vm: &PluginInstance) {
        signal(
            MODEL_BACKEND.channel.pid(),
            nix::sys::signal::Signal::SIGUSR1,
        );
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        &MODEL_RUNTIME
    }
}

fn model_holds(_rt: &tokio::runtime::Runtime) {
    LazyLock::force(&MODEL_BACKEND);
    if let Err(failure) = model::run::<ModelOutOfProcess>(model::cases(500)) {
        panic!("{failure}");
    }
}

fn killed_mid_call(rt: &tokio::runtime::Runtime) {
    let served = launch();
    let dir = tempfile::tempdir().unwrap();
    let vm = Arc::new(
        served
            .backend
            .create_plugin(config(dir.path(), "victim"))
            .unwrap(),
    );
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    assert_eq!(vm.state(), VmState::Running);
    // A call in flight when the process dies: wait() (it waits for the VM's end).
    let waiter = {
        let vm = Arc::clone(&vm);
        rt.spawn(async move { vm.wait().await })
    };
    std::thread::sleep(Duration::from_millis(100));
    let began = Instant::now();
    signal(served.channel.pid(), nix::sys::signal::Signal::SIGKILL);
    let exit = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), waiter).await })
        .expect("the pending call failed at once")
        .unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
    let message = exit.message.clone().unwrap();
    assert!(
        message.contains("killed by signal 9"),
        "the exit names how the backend died: {message}"
    );
    // Everything after: at once, the same exit, no hang.
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(rt.block_on(vm.shutdown()).unwrap(), exit);
    let err = rt.block_on(vm.pause()).unwrap_err().to_string();
    assert!(err.contains("is gone"), "{err}");
    let err = served
        .backend
        .create_plugin(config(dir.path(), "after"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("killed by signal 9"), "{err}");
}

fn hung_process(rt: &tokio::runtime::Runtime) {
    let served = launch();
    common::hung_plugin(rt, &served.backend);
}

/// Waits (at most 3 s) on `events` alone — no call to the backend — for `Exited`.
fn exited_on(
    rt: &tokio::runtime::Runtime,
    events: &mut tokio::sync::broadcast::Receiver<vmkit_core::VmEvent>,
) -> vmkit_core::ExitInfo {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if let Ok(vmkit_core::VmEvent::Exited(exit)) = events.recv().await {
                    return exit;
                }
            }
        })
        .await
        .expect("Exited pushed with no call pending")
    })
}

/// A process-hosted VM killed from outside, then a backend killed from outside: each
/// time `Exited` reaches `events()` by itself, once.
fn exited_pushed(rt: &tokio::runtime::Runtime) {
    let served = launch();
    let dir = tempfile::tempdir().unwrap();
    let vm = served
        .backend
        .create_plugin(config(dir.path(), "pushed"))
        .unwrap();
    let mut events = vm.events();
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    // The VM dies in the backend (SIGUSR1 crashes the fake's VMs there).
    signal(served.channel.pid(), nix::sys::signal::Signal::SIGUSR1);
    let exit = exited_on(rt, &mut events);
    assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
    assert_eq!(vm.state(), VmState::Shutdown);

    // The backend process dies: its running VM ends as crashed, named.
    let other = served
        .backend
        .create_plugin(config(dir.path(), "orphaned"))
        .unwrap();
    let mut events = other.events();
    rt.block_on(other.start(StartOptions::new())).unwrap();
    signal(served.channel.pid(), nix::sys::signal::Signal::SIGKILL);
    let exit = exited_on(rt, &mut events);
    assert_eq!(exit.reason, ExitReason::Crashed, "{exit:?}");
    assert!(
        exit.message
            .as_deref()
            .is_some_and(|m| m.contains("killed by signal 9")),
        "{exit:?}"
    );
    assert_eq!(other.state(), VmState::Shutdown);
    let mut more = Vec::new();
    while let Ok(event) = events.try_recv() {
        more.push(event);
    }
    assert!(
        !more
            .iter()
            .any(|e| matches!(e, vmkit_core::VmEvent::Exited(_))),
        "Exited once: {more:?}"
    );
}

/// The host child: a backend launched, a VM running in it, the backend's pid on
/// stdout; then it waits to be killed.
fn host_main() -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let served = launch();
    let dir = std::env::var(HOST_ENV).unwrap();
    let vm = served
        .backend
        .create_plugin(config(Path::new(&dir), "hosted"))
        .unwrap();
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    println!("{}", served.channel.pid());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The host is SIGKILLed: its backend process (and the VM in it) is gone within 1 s.
fn dies_with_host(_rt: &tokio::runtime::Runtime) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut host = std::process::Command::new(std::env::current_exe().unwrap())
        .env(HOST_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(host.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let backend: i32 = line
        .trim()
        .parse()
        .expect("the host printed its backend's pid");
    let alive = |pid: i32| Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid);
    assert!(alive(backend));
    host.kill().unwrap();
    let killed = Instant::now();
    host.wait().unwrap();
    common::eventually(
        Duration::from_secs(1),
        "the backend outlived its host",
        || !alive(backend),
    );
    eprintln!("backend gone {:?} after its host", killed.elapsed());
    // Its VM went with it: the fake's agent socket and lock are free.
    assert!(common::nothing_left(&config(dir.path(), "hosted")));
}

/// Whether `pid` is a zombie (dead, not yet reaped by its new parent).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn launch_errors(_rt: &tokio::runtime::Runtime) {
    // A name the executable does not serve: it exits 2 before listening.
    let err = launch_as(&std::env::current_exe().unwrap(), "qemu")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exited (exit status: 2) before listening"),
        "{err}"
    );
    // No such executable.
    let err = ProcessChannel::launch(Path::new("/nonexistent/vmkit-backend"), "fake")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("launch backend process /nonexistent/vmkit-backend: spawn:"),
        "{err}"
    );
}
