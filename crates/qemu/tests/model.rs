//! The model-based test of the life cycle (`vmkit_testkit::model`) against the QEMU
//! backend driving the fake QEMU, with a guest agent behind the fake vsock daemon:
//! random sequences of cold disks, start, pause, resume, vCPU/memory/disk hot-plug and
//! unplug (the fake answers the hot-plug commands; the agent reads the fake guest's
//! files), crashes (SIGKILL of the "QEMU") and concurrent shutdowns, each step checked
//! against the reference model of the contract.
//!
//! A custom harness: this binary is also the fake QEMU (when `VMKIT_FAKE_QEMU_SELF` is
//! set) and the fake vsock daemon (when `VMKIT_FAKE_VSOCK_SELF` is set).
//! `PROPTEST_CASES` sets the number of cases (default below).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a test binary

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use vmkit_core::{Accel, GuestTransport, InstanceConfig};
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::model::{self, ModelTarget};
use vmkit_testkit::{fake_qemu, fake_vsock};

/// Cases by default.
const CASES: u32 = 2000;

fn main() -> ExitCode {
    if std::env::var_os("VMKIT_FAKE_QEMU_SELF").is_some() {
        std::process::exit(fake_qemu::main());
    }
    if std::env::var_os("VMKIT_FAKE_VSOCK_SELF").is_some() {
        std::process::exit(fake_vsock::main());
    }
    // `cargo test -- --list` and filters other than this test's name: nothing to run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("the_qemu_backend_keeps_the_contract: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|f| "the_qemu_backend_keeps_the_contract".contains(f.as_str()))
    {
        return ExitCode::SUCCESS;
    }
    let cases = model::cases(CASES);
    let began = Instant::now();
    match model::run::<FakeQemu>(cases) {
        Ok(()) => {
            println!(
                "test the_qemu_backend_keeps_the_contract ... ok ({cases} cases in {:.1} s)",
                began.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("test the_qemu_backend_keeps_the_contract ... FAILED\n{failure}");
            ExitCode::FAILURE
        }
    }
}

/// The wrappers that run this binary as the fake QEMU and the fake vsock daemon.
struct Wrappers {
    _dir: tempfile::TempDir,
    qemu: PathBuf,
    vsock: PathBuf,
}

static WRAPPERS: LazyLock<Wrappers> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let wrapper = |name: &str, env: &str| {
        let path = dir.path().join(name);
        fake_qemu::write_wrapper(&path, &me, &[(env, "1")]).unwrap();
        path
    };
    Wrappers {
        qemu: wrapper("qemu", "VMKIT_FAKE_QEMU_SELF"),
        vsock: wrapper("vhost-device-vsock", "VMKIT_FAKE_VSOCK_SELF"),
        _dir: dir,
    }
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// The QEMU backend driving the fake QEMU, its guest reached over the fake vsock daemon.
struct FakeQemu;

#[async_trait::async_trait]
impl ModelTarget for FakeQemu {
    type Vm = QemuInstance;

    fn create(config: InstanceConfig) -> QemuInstance {
        QemuBackend.create_instance(config).unwrap()
    }

    fn configure(config: &mut InstanceConfig, _dir: &Path) {
        let options = &mut config.backend_options;
        options.insert("binary".into(), WRAPPERS.qemu.display().to_string());
        options.insert(
            "vhost_vsock_binary".into(),
            WRAPPERS.vsock.display().to_string(),
        );
        options.insert("sandbox".into(), "off".into());
        options.insert("hotplug_ports".into(), Self::HOTPLUG_PORTS.to_string());
        options.insert("ready_line".into(), "VMKIT_READY".into());
        config.transport = GuestTransport::HybridVsock {
            uds: None,
            port: vmkit_proto::AGENT_PORT,
        };
        // The fake ignores it; KVM has no lifetime limit on vCPU threads (TCG has one
        // the backend enforces, which the model does not describe).
        config.accel = Accel::Kvm;
        config.timeouts.start = Duration::from_secs(10);
        config.timeouts.command = Duration::from_secs(2);
        config.timeouts.shutdown_grace = Duration::from_secs(2);
        config.timeouts.hotplug = Duration::from_secs(5);
    }

    async fn crash(vm: &QemuInstance) {
        assert!(
            vmkit_testkit::conformance::kill_vmm(vm),
            "a live VM has a VMM to kill"
        );
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        &RUNTIME
    }
}
