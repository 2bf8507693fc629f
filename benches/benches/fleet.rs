//! Many VMs from one process: 8 instances of the test guest started at once (start →
//! agent answered for all of them, wall time) against the same 8 started one after
//! another, and the host memory each idle instance costs the vmkit process (its RSS
//! growth per running VM; QEMU and its helpers are other processes and not counted).
//!
//! The guest channel is virtio-serial, whose host end (the serial bridge) lives in the
//! vmkit process: the memory row counts it.
//!
//! Target: at most 1 MiB of the vmkit process's memory per idle instance.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmkit_core::{Instance, StartOptions};
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

const VMS: usize = 8;
/// At most this much of the host process's memory per idle VM.
const MIB_PER_VM: f64 = 1.0;

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ok = runtime.block_on(async {
        // A warm-up VM: the allocator, the runtime's threads and the probes settle.
        let warm = vms(&image, dir.path(), "warm", 1);
        start(&warm[0]).await;
        warm[0].shutdown().await.unwrap();
        drop(warm);

        let one_by_one = vms(&image, dir.path(), "seq", VMS);
        let began = Instant::now();
        for vm in &one_by_one {
            start(vm).await;
        }
        let sequential = began.elapsed();
        stop_all(&one_by_one).await;
        drop(one_by_one);
        settle().await;

        let before = rss_kib();
        let fleet = vms(&image, dir.path(), "par", VMS);
        let began = Instant::now();
        let starts: Vec<_> = fleet
            .iter()
            .map(|vm| {
                let vm = vm.clone();
                tokio::spawn(async move { start(&vm).await })
            })
            .collect();
        for start in starts {
            start.await.unwrap();
        }
        let at_once = began.elapsed();
        settle().await;
        let after = rss_kib();
        stop_all(&fleet).await;

        let per_vm_mib = after.saturating_sub(before) as f64 / 1024.0 / VMS as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("{VMS} VMs of the test guest (TCG, virtio-serial), start -> agent answered:");
        println!("  one after another : {:7.0} ms", ms(sequential));
        println!(
            "  all at once       : {:7.0} ms  ({:.2}x)",
            ms(at_once),
            at_once.as_secs_f64() / sequential.as_secs_f64()
        );
        println!(
            "host memory per idle instance (vmkit's RSS {before} KiB -> {after} KiB, QEMU excluded): \
             {per_vm_mib:.2} MiB (target <= {MIB_PER_VM} MiB)"
        );
        vmkit_benches::Row::new(
            "fleet",
            &format!("{VMS} VMs start -> agent, all at once (wall)"),
            "ms",
            ms(at_once),
            1,
        )
        .against("the same 8 one after another", ms(sequential))
        .record();
        vmkit_benches::Row::new(
            "fleet",
            "host memory per idle instance (vmkit's RSS growth, QEMU excluded)",
            "MiB",
            per_vm_mib,
            VMS,
        )
        .at_most(MIB_PER_VM)
        .record();
        per_vm_mib <= MIB_PER_VM
    });
    vmkit_benches::finish(ok);
}

fn vms(image: &GuestImage, dir: &Path, prefix: &str, n: usize) -> Vec<Arc<QemuInstance>> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let mut config = image.config(&name, &dir.join(&name));
            // The guest channel in this process (the serial bridge), not in a daemon:
            // its cost is part of what the memory row measures, and 8 VMs starting at
            // once do not meet vhost-device-vsock 0.3's start fault.
            config.transport = vmkit_core::GuestTransport::VirtioSerial;
            Arc::new(QemuBackend.create_instance(config).unwrap())
        })
        .collect()
}

async fn start(vm: &QemuInstance) {
    vm.start(StartOptions::with_timeout(Duration::from_secs(180)))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", vm.vm_info().id));
}

async fn stop_all(vms: &[Arc<QemuInstance>]) {
    let stops: Vec<_> = vms
        .iter()
        .map(|vm| {
            let vm = vm.clone();
            tokio::spawn(async move { vm.shutdown().await.unwrap() })
        })
        .collect();
    for stop in stops {
        stop.await.unwrap();
    }
}

/// Lets the VMs' post-start work (the guest channel's first exchanges) finish.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// This process's resident memory, KiB (`VmRSS`).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}
