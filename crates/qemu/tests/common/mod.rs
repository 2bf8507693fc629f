//! Helpers the real-VM test binaries share: one VM at a time, a start that survives the
//! vsock daemon's known fault, logs for a failed start, agent call helpers.
#![allow(dead_code, unreachable_pub, unused_imports)] // each test binary uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed step should panic

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use vmkit_core::{DeviceConfigurator, Instance, StartOptions};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{ExecRequest, GuestInfoRequest};
use vmkit_qemu::{QemuBackend, QemuInstance};
pub use vmkit_testkit::leaks::processes_mentioning;
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

pub static VMS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(1));

pub fn setup() -> Option<GuestImage> {
    require_qemu()?;
    require_guest_image()
}

pub fn console(vm: &QemuInstance) -> String {
    std::fs::read_to_string(vm.config().layout().console_log()).unwrap_or_default()
}

/// The guest's ready line. `start` returns once the agent answers, which the init
/// starts just before it prints the line: give the line a moment.
pub async fn ready_line(vm: &QemuInstance) -> String {
    let began = Instant::now();
    loop {
        let console = console(vm);
        // The line may share its line with the firmware's last escape codes.
        if let Some(line) = console
            .lines()
            .find_map(|l| l.find("VMKIT_READY").map(|at| &l[at..]))
        {
            return line.to_owned();
        }
        if began.elapsed() > Duration::from_secs(30) {
            panic!("no VMKIT_READY line on the console within 30 s:\n{console}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What QEMU, the guest and the vsock daemon logged, for a failed start's panic.
pub fn logs(vm: &QemuInstance) -> String {
    let layout = vm.config().layout();
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    format!(
        "--- console ---\n{}\n--- vmm.log ---\n{}\n--- vsock.log ---\n{}",
        console(vm),
        read(layout.vmm_log()),
        read(layout.log_dir().join("vsock.log")),
    )
}

/// The start failure vhost-device-vsock 0.3 causes about once in a hundred VMs: the
/// daemon closes every host dial for the whole start although the guest is up
/// (docs/guest-communication.md).
pub fn daemon_never_served(e: &vmkit_core::Error) -> bool {
    let text = e.to_string();
    text.starts_with(AGENT_WAIT) && daemon_fault_in(&text)
}

/// How the start error that reports the agent wait begins.
const AGENT_WAIT: &str = "start: waiting for the guest agent to answer Ping (";

/// Whether `text` holds that start failure anywhere in it
/// (`vmkit_testkit::guest::vsock_daemon_fault`).
pub fn daemon_fault_in(text: &str) -> bool {
    vmkit_testkit::guest::vsock_daemon_fault(text)
}

/// Starts `vm` and returns it. When the vsock daemon never served it (a daemon fault,
/// not what these tests are about), the VM is made again from its config and cold
/// devices and started once more. Any other failure panics with the logs.
pub async fn start(vm: QemuInstance) -> QemuInstance {
    let e = match vm.start(StartOptions::new()).await {
        Ok(()) => return vm,
        Err(e) if daemon_never_served(&e) => e,
        Err(e) => panic!("start {}: {e}\n{}", vm.config().id, logs(&vm)),
    };
    eprintln!(
        "start {}: {e}\n{}\n--- the vsock daemon never served it; starting it again ---",
        vm.config().id,
        logs(&vm)
    );
    let config = vm.config().clone();
    let devices = vm.cold_devices();
    let again = QemuBackend.create_instance(config.clone()).unwrap();
    for disk in devices.disks.into_iter().skip(config.disks.len()) {
        again.add_disk(disk).unwrap();
    }
    for nic in devices.nics.into_iter().skip(config.nics.len()) {
        again.add_nic(nic).unwrap();
    }
    if let Err(e) = again.start(StartOptions::new()).await {
        panic!("start {} (again): {e}\n{}", again.config().id, logs(&again));
    }
    again
}

/// Shuts `vm` down gracefully (the guest powers off) and checks that no process
/// mentions `state` and that none of `paths` is left.
pub async fn shut_down_leaving_nothing(
    vm: &QemuInstance,
    state: &Path,
    paths: &[std::path::PathBuf],
) {
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(
        exit.reason,
        vmkit_core::ExitReason::GuestShutdown,
        "{exit:?}"
    );
    assert_eq!(
        processes_mentioning(state),
        Vec::<u32>::new(),
        "a daemon or QEMU outlived the VM"
    );
    for path in paths {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

pub fn assert_gone(pid: u32, vm: &QemuInstance) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU pid {pid} still exists"
    );
    let socket = vm.config().layout().control_socket();
    assert!(!socket.exists(), "{} left behind", socket.display());
}

/// A running test guest with the default config, its temp dir and its boot slot.
pub struct Booted {
    pub vm: QemuInstance,
    pub dir: tempfile::TempDir,
    pub _slot: tokio::sync::SemaphorePermit<'static>,
}

/// Boots the test guest as `id` (`None` when QEMU or the image is missing outside CI).
pub async fn boot(id: &str) -> Option<Booted> {
    let image = setup()?;
    let slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuBackend
        .create_instance(image.config(id, &dir.path().join("state")))
        .unwrap();
    let vm = start(vm).await;
    Some(Booted {
        vm,
        dir,
        _slot: slot,
    })
}

pub fn disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    path
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

pub fn exec_req(argv: &[&str]) -> ExecRequest {
    let mut req = ExecRequest::new();
    req.argv = argv.iter().map(|s| (*s).to_owned()).collect();
    req
}

/// The agent's pid, as a program it runs sees it.
pub async fn agent_pid(agent: &AgentClient) -> String {
    let out = agent
        .exec(ctx(), &exec_req(&["sh", "-c", "echo $PPID"]))
        .await
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub async fn guest_info(agent: &AgentClient) -> vmkit_proto::agent::GuestInfoResponse {
    agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap()
}

/// QEMU's command line, from `/proc`, its arguments joined by spaces.
pub fn qemu_argv(vm: &QemuInstance) -> String {
    let pid = vm.vm_info().pid.unwrap();
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `data` through an echo stream and returns what came back.
pub async fn echo(vm: &QemuInstance, data: Vec<u8>) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = vm
        .open_stream(&vmkit_proto::StreamHeader::Echo)
        .await
        .unwrap();
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let writer = async move {
        for chunk in data.chunks(64 << 10) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    back
}
