//! The Arm `virt` machine (issue 16): what a Mac with Apple Silicon runs, minus HVF.
//! The arm64 test guest under the real `qemu-system-aarch64` (TCG here), reached over
//! virtio-serial (QEMU on macOS has no vsock), with a NIC on QEMU's user networking
//! (no TAP on macOS): the argv vmkit writes for `virt`, the agent, PCIe disk hot-plug
//! and virtio-mem on that board, graceful shutdown, nothing left.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

use vmkit_core::{
    Capabilities, DeviceConfigurator, DiskConfig, Instance, MemoryHotplug, NicBackend, NicConfig,
    ResourceManager,
};
use vmkit_proto::agent::PingRequest;
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::qemu::require_qemu_aarch64;
use vmkit_testkit::require_arm64_guest_image;

mod common;
use common::*;

async fn run(vm: &QemuInstance, script: &str) -> String {
    let agent = vm.agent().await.unwrap();
    let out = agent
        .exec(ctx(), &exec_req(&["sh", "-c", script]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_guest_on_virt_over_virtio_serial_hotplugs_and_leaves_nothing() {
    let Some(qemu) = require_qemu_aarch64() else {
        return;
    };
    let Some(image) = require_arm64_guest_image() else {
        return;
    };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = image.virt_config("arm", &state);
    config
        .backend_options
        .insert("binary".into(), qemu.display().to_string());
    config.resources.memory_hotplug = MemoryHotplug::VirtioMem;
    config.resources.max_memory_mib = Some(768);
    config.timeouts.start = Duration::from_secs(120);
    config.nics.push(NicConfig {
        id: "net0".into(),
        backend: NicBackend::User,
        mac: None,
    });
    let began = Instant::now();
    let vm = QemuBackend.create_instance(config).unwrap();
    if let Err(e) = vm.start(vmkit_core::StartOptions::new()).await {
        panic!("start: {e}\n{}", logs(&vm));
    }
    eprintln!("arm64 guest up in {:?} (TCG)", began.elapsed());
    let argv = qemu_argv(&vm);
    for part in [
        "qemu-system-aarch64",
        "-machine virt,gic-version=3",
        "-cpu max",
        "-accel tcg",
        "virtserialport",
        "-netdev user,id=vmkit-net0",
        "console=ttyAMA0",
    ] {
        assert!(argv.contains(part), "{part:?} missing: {argv}");
    }
    assert!(!argv.contains("vsock"), "no vsock device: {argv}");
    let caps = vm.vm_info().capabilities;
    assert!(
        caps.contains(Capabilities::DISK_HOTPLUG | Capabilities::MEMORY_HOTPLUG),
        "{caps:?}"
    );
    assert!(!caps.contains(Capabilities::CPU_HOTPLUG), "{caps:?}");

    // The agent: Ping, an arm64 guest, its NIC, a stream.
    let agent = vm.agent().await.unwrap();
    agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    assert_eq!(run(&vm, "uname -m").await, "aarch64\n");
    let mac = vmkit_qemu::stable_mac("arm", "net0");
    let line = ready_line(&vm).await;
    assert!(line.ends_with(&format!("nics=eth0:{mac}")), "{line}");
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 253) as u8).collect();
    assert!(
        echo(&vm, data.clone()).await == data,
        "1 MiB echo came back altered"
    );

    // A disk on one of virt's PCIe root ports: the guest sees it, then lets it go.
    let path = disk(dir.path(), "d1.img");
    let mut d1 = DiskConfig::new("d1", &path);
    d1.serial = Some("ARMDISK".into());
    vm.hotplug_disk(d1).await.unwrap();
    let serials = run(&vm, "cat /sys/block/vd*/serial").await;
    assert!(serials.contains("ARMDISK"), "{serials}");
    vm.unplug("d1").await.unwrap();
    let blocks = run(&vm, "ls /sys/block").await;
    assert!(!blocks.contains("vda"), "{blocks}");

    // virtio-mem on virt: 128 MiB more, as the guest counts it.
    let memory = vm.memory_hotplugger().expect("virt with virtio-mem");
    let before = guest_info(&agent).await.mem_total_bytes >> 20;
    memory.hotplug_memory(128).await.unwrap();
    let after = guest_info(&agent).await.mem_total_bytes >> 20;
    assert_eq!(after, before + 128, "guest memory {before} -> {after} MiB");

    // No vCPU hot-plug on virt.
    assert!(vm.cpu_hotplugger().is_none());

    let layout = vm.config().layout();
    let left = [
        layout.serial_socket(),
        layout.guest_dir(),
        layout.control_socket(),
    ];
    shut_down_leaving_nothing(&vm, &state, &left).await;
}
