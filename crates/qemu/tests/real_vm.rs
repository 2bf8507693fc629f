//! Real VMs: the test guest under real QEMU (TCG). Each test boots its own VM; a
//! semaphore keeps at most two booting at once on these 2-core machines.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use vmkit_core::{
    DeviceConfigurator, DiskConfig, ExitReason, Instance, NicConfig, ShutdownStage, StartOptions,
    VmEvent, VmState,
};
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

static VMS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(2));

fn setup() -> Option<GuestImage> {
    require_qemu()?;
    require_guest_image()
}

fn console(vm: &QemuInstance) -> String {
    std::fs::read_to_string(vm.config().layout().console_log()).unwrap_or_default()
}

fn ready_line(vm: &QemuInstance) -> String {
    console(vm)
        .lines()
        .find(|l| l.starts_with("VMKIT_READY"))
        .unwrap_or_default()
        .to_owned()
}

fn assert_gone(pid: u32, vm: &QemuInstance) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU pid {pid} still exists"
    );
    let socket = vm.config().layout().control_socket();
    assert!(!socket.exists(), "{} left behind", socket.display());
}

fn disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_with_a_disk_pauses_resumes_and_powers_off_by_acpi() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuBackend
        .create_instance(image.config("acpi", &dir.path().join("state")))
        .unwrap();
    let mut data = DiskConfig::new("data", disk(dir.path(), "data.img"));
    data.serial = Some("vmkit-data".into());
    vm.add_disk(data).unwrap();
    let mut events = vm.events();

    vm.start(StartOptions::new()).await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    let line = ready_line(&vm);
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:vmkit-data"), "{line}");
    let pid = vm.vm_info().pid.expect("a running VM has a pid");

    // Cold-plug is over once started.
    let late = vm.add_disk(DiskConfig::new("late", disk(dir.path(), "late.img")));
    assert_eq!(
        late.unwrap_err().to_string(),
        "add_disk: not allowed while the VM is running"
    );

    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    vm.resume().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);

    let exit = vm.shutdown().await.unwrap();
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(vm.shutdown().await.unwrap(), exit, "shutdown is idempotent");
    assert_eq!(vm.wait().await, exit);
    assert_gone(pid, &vm);

    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let has = |wanted: &VmEvent| seen.iter().any(|e| e == wanted);
    assert!(
        has(&VmEvent::StateChanged {
            from: VmState::New,
            to: VmState::Starting
        }),
        "{seen:?}"
    );
    assert!(
        has(&VmEvent::StateChanged {
            from: VmState::Starting,
            to: VmState::Running
        }),
        "{seen:?}"
    );
    assert!(has(&VmEvent::Stopped) && has(&VmEvent::Resumed), "{seen:?}");
    assert!(has(&VmEvent::Powerdown), "{seen:?}");
    assert!(
        has(&VmEvent::ShutdownRequested {
            guest: true,
            reason: "guest-shutdown".into()
        }),
        "{seen:?}"
    );
    assert!(
        matches!(seen.last(), Some(VmEvent::Exited(info)) if *info == exit),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_acpi_is_quit_within_grace_plus_one_second() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("deaf", &dir.path().join("state"));
    config.kernel.cmdline.push("vmkit.ignore_acpi".into());
    config.timeouts.shutdown_grace = Duration::from_secs(1);
    let vm = QemuBackend.create_instance(config).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    let pid = vm.vm_info().pid.unwrap();

    let began = Instant::now();
    let exit = vm.shutdown().await.unwrap();
    let took = began.elapsed();
    assert_eq!(exit.stage, Some(ShutdownStage::Quit), "{exit:?}");
    assert_eq!(exit.reason, ExitReason::HostShutdown, "{exit:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}, grace 1 s");
    assert!(
        took >= Duration::from_secs(1),
        "quit before the grace ended: {took:?}"
    );
    assert_gone(pid, &vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_path_with_commas_and_equals_is_one_path() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Were the comma not escaped, QEMU would read `format=qcow2` and `serial=evil` as
    // options of their own.
    let path = disk(dir.path(), "d,format=qcow2,serial=evil.img");
    let state = dir.path().join("st,ate=x");
    let vm = QemuBackend
        .create_instance(image.config("commas", &state))
        .unwrap();
    vm.add_disk(DiskConfig::new("odd", &path)).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    let line = ready_line(&vm);
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:"), "{line}");
    assert!(!line.contains("evil"), "{line}");
    vm.shutdown().await.unwrap();
}

/// A TAP device vmkit may create here, or `None` (with a note) where the host refuses
/// TAP: without root or `/dev/net/tun`. Under CI the machine is root with a tun device,
/// so a refusal there fails the test instead of skipping it.
fn tap_name(tag: &str) -> Option<String> {
    // IFNAMSIZ is 16 with the NUL: "vmkt" + tag + pid stays well under it.
    let name = format!("vmkt{tag}{}", std::process::id() % 100_000);
    match vmkit_qemu::probe_tap(&name) {
        Ok(()) => Some(name),
        Err(e) if vmkit_testkit::qemu::under_ci() => {
            panic!("CI is set but TAP {name} cannot be created: {e}")
        }
        Err(e) => {
            eprintln!("note: TAP {name} unavailable ({e}); skipping a test that needs it");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_nics_appear_in_the_guest_with_their_macs_and_vanish_with_the_vm() {
    let Some(image) = setup() else { return };
    let (Some(first), Some(second)) = (tap_name("a"), tap_name("b")) else {
        return;
    };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuBackend
        .create_instance(image.config("nics", &dir.path().join("state")))
        .unwrap();
    let chosen: vmkit_core::MacAddr = "52:54:00:12:34:56".parse().unwrap();
    vm.add_nic(NicConfig::tap("net0", &first, Some(chosen)))
        .unwrap();
    vm.add_nic(NicConfig::tap("net1", &second, None)).unwrap();
    vm.start(StartOptions::new()).await.unwrap();

    let line = ready_line(&vm);
    let derived = vmkit_qemu::devices::stable_mac("nics", "net1");
    assert!(
        line.ends_with(&format!("nics=eth0:{chosen},eth1:{derived}")),
        "{line}"
    );
    for tap in [&first, &second] {
        assert!(
            Path::new("/sys/class/net").join(tap).exists(),
            "TAP {tap} missing while the VM runs"
        );
    }

    vm.shutdown().await.unwrap();
    for tap in [&first, &second] {
        assert!(
            !Path::new("/sys/class/net").join(tap).exists(),
            "TAP {tap} outlived its VM"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_with_a_virtio_mmio_disk_and_powers_off_by_acpi() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("micro", &dir.path().join("state"));
    config
        .backend_options
        .insert("machine".into(), "microvm".into());
    let vm = QemuBackend.create_instance(config).unwrap();
    let mut data = DiskConfig::new("data", disk(dir.path(), "data.img"));
    data.serial = Some("micro-data".into());
    vm.add_disk(data).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    let line = ready_line(&vm);
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:micro-data"), "{line}");
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
}
