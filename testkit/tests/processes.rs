//! The process service end to end through FakeBackend, whose guest is the real agent in
//! its host test mode: the same checks the real guest passes under QEMU
//! (crates/qemu/tests/processes.rs), at a smaller scale.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::{Instance, InstanceConfig, StartOptions};
use vmkit_process::Processes;
use vmkit_testkit::fake_backend::FakeBackend;
use vmkit_testkit::process_checks::{self, Scale};

async fn running() -> (tempfile::TempDir, Arc<dyn Instance>) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"never read").unwrap();
    let config = InstanceConfig::new("fake-processes", dir.path().join("state"), &kernel);
    let vm: Arc<dyn Instance> = Arc::new(FakeBackend::new().create_fake(config).unwrap());
    vm.start(StartOptions::default()).await.unwrap();
    (dir, vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_round_trip_exits_and_signals() {
    let (_dir, vm) = running().await;
    let p = Processes::new(vm.clone());
    let scale = Scale::quick();
    let mibps = process_checks::stdio_round_trip(&p, scale).await.unwrap();
    eprintln!("cat round trip: {mibps:.1} MiB/s");
    process_checks::exit_statuses(&p, scale.deadline)
        .await
        .unwrap();
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_session_sees_its_size_a_resize_and_ctrl_c() {
    let (_dir, vm) = running().await;
    let p = Processes::new(vm.clone());
    process_checks::tty_session(&p, Duration::from_secs(20))
        .await
        .unwrap();
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_reattach_stall_and_bad_requests() {
    let (_dir, vm) = running().await;
    let p = Processes::new(vm.clone());
    let scale = Scale::quick();
    process_checks::many_at_once(&p, scale).await.unwrap();
    process_checks::reattach(
        &(vm.clone() as Arc<dyn vmkit_core::GuestCommunicator>),
        scale.deadline,
    )
    .await
    .unwrap();
    let stall = process_checks::stalled_reader(&p, scale, 2 * (256 << 10))
        .await
        .unwrap();
    eprintln!("stalled reader: {stall:?}");
    process_checks::bad_requests(&p, scale.deadline)
        .await
        .unwrap();
    let fs = vmkit_process::Filesystem::new(vm.clone());
    process_checks::mount_bad_requests(&fs, scale.deadline)
        .await
        .unwrap();
    // Checked, then refused: the host test mode never mounts on the host.
    match fs
        .mount(&vmkit_process::Mount::tmpfs("/mnt/x"), scale.deadline)
        .await
    {
        Err(vmkit_process::Error::Refused { reason, .. }) => {
            assert!(reason.contains("outside a guest"), "{reason}");
        }
        other => panic!("a mount in the host test mode: {other:?}"),
    }
    assert!(
        p.list(scale.deadline).await.unwrap().is_empty(),
        "every process was waited for"
    );
    vm.shutdown().await.unwrap();
}

/// A fake VM that ends takes its processes with it: they run on this host, and nothing
/// of a VM may outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_vms_processes_end_with_it() {
    let (_dir, vm) = running().await;
    let p = Processes::new(vm.clone());
    let deadline = Duration::from_secs(10);
    let sleeper = p
        .spawn(&vmkit_process::Command::new(["sleep", "600"]), deadline)
        .await
        .unwrap();
    let pid = i32::try_from(sleeper.pid()).unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(pid));
    vm.shutdown().await.unwrap();
    drop((sleeper, p, vm));
    let gone = async {
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the fake VM's process was killed and reaped");
}
