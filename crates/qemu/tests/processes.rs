//! The agent's process service on the real test guest (issue 23), over hybrid vsock and
//! over virtio-serial: 64 MiB through `cat` byte-exact with stderr interleaved, exit
//! codes and a SIGTERM, a TTY shell with a resize and Ctrl-C, 32 processes at once, a
//! host that drops its connections and attaches again, a reader stalled for 10 s, and
//! bad requests — the same checks FakeBackend's host-mode agent passes
//! (testkit/tests/processes.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::sync::Arc;
use std::time::Instant;

use vmkit_core::{GuestTransport, Instance};
use vmkit_process::Processes;
use vmkit_qemu::QemuBackend;
use vmkit_testkit::process_checks::{self, Scale};

mod common;
use common::*;

/// The agent's default output buffer: a stalled stream holds at most twice this.
const OUTPUT_BUFFER: u64 = 256 << 10;

/// An 8 MiB ext4 image holding `hello` (made with the host's `mkfs.ext4 -d`).
fn ext4_image(dir: &std::path::Path) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello"), "hello from the host\n").unwrap();
    let image = dir.join("data.ext4");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("8M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(made.success(), "mkfs.ext4: {made}");
    image
}

async fn every_check(id: &str, transport: GuestTransport) {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config(id, &dir.path().join("state"));
    config.transport = transport;
    let mut data = vmkit_core::DiskConfig::new("data", ext4_image(dir.path()));
    data.serial = Some("vmkit-data".into());
    data.read_only = true;
    config.disks.push(data);
    let vm: Arc<dyn Instance> = Arc::new(start(QemuBackend.create_instance(config).unwrap()).await);
    let p = Processes::new(vm.clone());
    let scale = Scale::acceptance();
    let step = |what: &str, since: Instant| {
        eprintln!("{id}: {what} in {:.1} s", since.elapsed().as_secs_f64())
    };

    let t = Instant::now();
    let mibps = process_checks::stdio_round_trip(&p, scale).await.unwrap();
    step(&format!("64 MiB through cat at {mibps:.1} MiB/s"), t);
    let t = Instant::now();
    process_checks::exit_statuses(&p, scale.deadline)
        .await
        .unwrap();
    step("exit codes 0, 42 and SIGTERM", t);
    let t = Instant::now();
    process_checks::tty_session(&p, scale.deadline)
        .await
        .unwrap();
    step("the TTY session", t);
    let t = Instant::now();
    process_checks::many_at_once(&p, scale).await.unwrap();
    step("32 processes at once", t);
    let t = Instant::now();
    process_checks::reattach(
        &(vm.clone() as Arc<dyn vmkit_core::GuestCommunicator>),
        scale.deadline,
    )
    .await
    .unwrap();
    step("reattach", t);
    let t = Instant::now();
    let stall = process_checks::stalled_reader(&p, scale, 2 * OUTPUT_BUFFER)
        .await
        .unwrap();
    step(&format!("a 10 s stall ({stall:?})"), t);
    let t = Instant::now();
    process_checks::bad_requests(&p, scale.deadline)
        .await
        .unwrap();
    step("bad requests", t);
    let t = Instant::now();
    let fs = vmkit_process::Filesystem::new(vm.clone());
    process_checks::mount_bad_requests(&fs, scale.deadline)
        .await
        .unwrap();
    process_checks::mounts(&fs, &p, Some("vmkit-data"), scale.deadline)
        .await
        .unwrap();
    step(
        "mounts: a dir, a tmpfs, an overlay, an ext4 disk by serial",
        t,
    );
    let t = Instant::now();
    process_checks::orphans_reaped(&p, scale.deadline)
        .await
        .unwrap();
    step("orphans reaped", t);
    process_checks::runs_as_user(&p, scale.deadline)
        .await
        .unwrap();
    assert!(
        p.list(scale.deadline).await.unwrap().is_empty(),
        "every process was waited for"
    );
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_over_hybrid_vsock() {
    let hybrid = GuestTransport::HybridVsock {
        uds: None,
        port: vmkit_proto::AGENT_PORT,
    };
    every_check("proc-hybrid", hybrid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_over_virtio_serial() {
    every_check("proc-serial", GuestTransport::VirtioSerial).await;
}
