//! Boot overhead: spawn → guest ready for the test guest started by vmkit, against the
//! same guest started by a bare `qemu-system-x86_64` command line written out here (the
//! baseline), in one run, interleaved. Both wait for the same ready line on the serial
//! console file, polled every 5 ms.
//!
//! Target (issue 4): vmkit's median within 1.05x of the baseline's.
//!
//! Both boot the image's kernel, the PVH `vmlinux` on x86_64; a third, bare boot of the
//! compressed `vmlinuz` in the same rounds gives what PVH saves.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmkit_benches::percentile;
use vmkit_core::{Instance, StartOptions};
use vmkit_qemu::QemuBackend;
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

const ROUNDS: usize = 8;

fn main() {
    let (Some(qemu), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    // One warm-up of each (page cache, the sandbox probe), not counted.
    bare_boot(&qemu, &image, &image.kernel);
    runtime.block_on(vmkit_boot(&image));
    let (mut bare, mut ours, mut compressed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(bare_boot(&qemu, &image, &image.kernel));
        ours.push(runtime.block_on(vmkit_boot(&image)));
        if image.vmlinuz != image.kernel {
            compressed.push(bare_boot(&qemu, &image, &image.vmlinuz));
        }
    }
    bare.sort();
    ours.sort();
    compressed.sort();
    let (b, v) = (
        percentile(&bare, 50.0).unwrap(),
        percentile(&ours, 50.0).unwrap(),
    );
    let ratio = v.as_secs_f64() / b.as_secs_f64();
    println!("boot, spawn -> guest ready (TCG, {ROUNDS} rounds each, interleaved)");
    println!("  bare QEMU : p50 {b:?}  all {bare:?}");
    println!("  vmkit     : p50 {v:?}  all {ours:?}");
    let ok = ratio <= 1.05;
    vmkit_benches::Row::new(
        "boot",
        "spawn -> ready line (vmkit start, no agent)",
        "ms",
        v.as_secs_f64() * 1e3,
        ROUNDS,
    )
    .against("bare QEMU command line", b.as_secs_f64() * 1e3)
    .ratio_at_most(1.05)
    .record();
    println!(
        "  vmkit / bare = {ratio:.3} (target <= 1.05: {})",
        if ok { "met" } else { "missed" }
    );
    if let Some(z) = percentile(&compressed, 50.0) {
        println!("  bare QEMU, vmlinuz: p50 {z:?}  all {compressed:?}");
        vmkit_benches::Row::new(
            "boot",
            "bare QEMU -> ready line, PVH vmlinux",
            "ms",
            b.as_secs_f64() * 1e3,
            ROUNDS,
        )
        .against(
            "the same from the compressed vmlinuz",
            z.as_secs_f64() * 1e3,
        )
        .record();
    }
    vmkit_benches::finish(ok);
}

fn cmdline() -> String {
    let mut parts: Vec<&str> = vmkit_qemu::BASE_PARAMS.to_vec();
    parts.push("mitigations=off");
    parts.join(" ")
}

/// The baseline: the command line a person would write for the same VM.
fn bare_boot(qemu: &Path, image: &GuestImage, kernel: &Path) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let qmp = dir.path().join("qmp.sock");
    let began = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-smp",
            "1,maxcpus=4",
            "-m",
            "256M",
        ])
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(cmdline())
        // vmkit's entropy device, so both boot the same devices.
        .args([
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=rng0",
        ])
        .args((0..4).flat_map(|i| {
            [
                "-device".to_owned(),
                format!("pcie-root-port,id=rp{i},chassis={}", i + 1),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("VMKIT_READY")) {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "bare guest never ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = began.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    took
}

async fn vmkit_boot(image: &GuestImage) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuBackend
        .create_instance(ready_line_config(image, &dir.path().join("state")))
        .unwrap();
    let began = Instant::now();
    vm.start(StartOptions::new()).await.unwrap();
    let took = began.elapsed();
    vm.shutdown().await.unwrap();
    took
}

/// The guest as the baseline runs it: no vsock, ready when the console says so (the
/// agent path adds the vhost-device-vsock daemon, which the bare baseline lacks).
fn ready_line_config(image: &GuestImage, state: &Path) -> vmkit_core::InstanceConfig {
    let mut config = image.config("bench", state);
    config.transport = vmkit_core::GuestTransport::None;
    config
}
