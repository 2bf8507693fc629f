//! A container through containerd (issue 25): `ctr run --rm <image> true` with vmkit's
//! shim, against runc (containerd's own runtime, on the host; the floor) and against a
//! plain vmkit start of the same guest with the same share (what the VM alone costs:
//! start → agent answered → shut down). Same containerd, same image, 5 interleaved
//! rounds, medians. Target: the shim's run within 1.15x of the plain VM's.
//!
//! Needs what `cargo xtask containerd` fetches, the shim binary (`$VMKIT_SHIM_DIR`,
//! else `target/release` or `target/debug`) and, for the runc row, `runc` on `PATH`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmkit_core::{DeviceConfigurator, Instance, ShareConfig, ShareVia, StartOptions};
use vmkit_qemu::QemuBackend;
use vmkit_testkit::containerd::{BUSYBOX_IMAGE, Containerd, Parts, RUNTIME, parts};

const ROUNDS: usize = 5;
const TARGET: f64 = 1.15;

/// Where the shim binary is.
fn shim_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VMKIT_SHIM_DIR") {
        return Some(dir.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    ["release", "debug"]
        .into_iter()
        .map(|profile| target.join(profile))
        .find(|dir| dir.join("containerd-shim-vmkit-v1").is_file())
}

/// `ctr run --rm --runtime <runtime> <image> <id> true`, timed.
fn ctr_run(containerd: &Containerd, runtime: &str, id: &str) -> Duration {
    let started = Instant::now();
    let out = containerd
        .ctr()
        .args([
            "run",
            "--rm",
            "--runtime",
            runtime,
            BUSYBOX_IMAGE,
            id,
            "true",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{runtime}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log()
    );
    took
}

/// A plain vmkit VM of the shim's config with one virtio-fs share: start → agent
/// answered → shut down, timed.
async fn plain_vm(parts: &Parts, dir: &Path, round: usize) -> Duration {
    let config = parts.vm_config(&format!("plain{round}"), &dir.join(format!("vm{round}")));
    let started = Instant::now();
    let vm = Arc::new(QemuBackend.create_instance(config).unwrap());
    let share = ShareConfig {
        via: ShareVia::VirtioFs,
        ..ShareConfig::new("rootfs", "rootfs", &parts.busybox)
    };
    vm.add_device(share.into()).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    vm.shutdown().await.unwrap();
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let Some(parts) = parts() else {
        return;
    };
    let Some(shim_dir) = shim_dir() else {
        println!(
            "containerd: no containerd-shim-vmkit-v1 built (cargo build -p containerd-shim-vmkit-v1); skipping"
        );
        return;
    };
    let runc = Command::new("runc").arg("--version").output().is_ok();
    let containerd = Containerd::start(&parts, &shim_dir, false).unwrap();
    containerd.import_images("default", &parts.images).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runtime = vmkit_benches::runtime().unwrap();
    let (mut shim, mut host, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        shim.push(ctr_run(&containerd, RUNTIME, &format!("vmkit{round}")));
        if runc {
            host.push(ctr_run(
                &containerd,
                "io.containerd.runc.v2",
                &format!("runc{round}"),
            ));
        }
        plain.push(runtime.block_on(plain_vm(&parts, dir.path(), round)));
    }
    let (shim, plain) = (median(shim), median(plain));
    let ratio = shim.as_secs_f64() / plain.as_secs_f64();
    println!(
        "containerd: `ctr run --rm {BUSYBOX_IMAGE} true`, medians of {ROUNDS} interleaved rounds"
    );
    println!("  vmkit shim       {:>8.0} ms", shim.as_secs_f64() * 1e3);
    let shim_row = vmkit_benches::Row::new(
        "containerd",
        "`ctr run --rm busybox true` through the vmkit shim",
        "ms",
        shim.as_secs_f64() * 1e3,
        ROUNDS,
    );
    if runc {
        let host = median(host);
        println!(
            "  runc             {:>8.0} ms   (the shim: {:.1}x)",
            host.as_secs_f64() * 1e3,
            shim.as_secs_f64() / host.as_secs_f64()
        );
        shim_row
            .clone()
            .against(
                "runc (containerd's runtime, no VM)",
                host.as_secs_f64() * 1e3,
            )
            .record();
    } else {
        println!("  runc             (not installed: apt-get install runc)");
    }
    println!(
        "  plain vmkit VM   {:>8.0} ms   (start with the share → agent → shut down)",
        plain.as_secs_f64() * 1e3
    );
    let met = ratio <= TARGET;
    shim_row
        .against(
            "a plain vmkit start -> agent -> shut down",
            plain.as_secs_f64() * 1e3,
        )
        .ratio_at_most(TARGET)
        .record();
    println!(
        "  shim / plain VM  {ratio:>8.2}x  (target ≤ {TARGET}x: {})",
        if met { "met" } else { "MISSED" }
    );
    // Where the shim's time went in the last round, as its log says.
    let last = format!("vmkit{}", ROUNDS - 1);
    for line in containerd.log().lines() {
        if line.contains(&last)
            && ["created ", "started ", "exited", "deleted "]
                .iter()
                .any(|w| line.contains(w))
        {
            println!("  shim log: {}", line.trim());
        }
    }
    vmkit_benches::finish(met);
}
