//! Shared directories against a disk, on one VM of the generic-kernel test guest (it has
//! 9p; issue 24), interleaved, the guest's caches dropped before every read:
//!
//! - sequential read of a 256 MiB file;
//! - a tree of 1,000 small files (10 directories of 100, 4 KiB each), all read;
//!
//! each over virtio-fs (virtiofsd, `cache=auto`), virtio-9p (`mapped-xattr`, the guest
//! mounting with the agent's defaults) and a virtio-blk disk (ext4 holding the same
//! files, made with `mkfs.ext4 -d`). Target: virtio-fs beats 9p on both.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use vmkit_core::{DeviceConfigurator, DiskConfig, Instance, ShareConfig, ShareVia, StartOptions};
use vmkit_process::{Command, Filesystem, Mount, Processes};
use vmkit_qemu::QemuBackend;
use vmkit_testkit::{qemu::require_qemu, require_generic_guest_image};

const BIG_MIB: usize = 256;
/// 1,000 files: enough for 9p's per-file cost to dominate (it reads them 4x slower
/// than virtio-fs), few enough that the bench takes about a minute.
const DIRS: usize = 10;
const FILES_PER_DIR: usize = 100;
const ROUNDS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(300);

/// Where each transport is mounted in the guest.
const MOUNTS: [(&str, &str); 3] = [
    ("virtio-fs", "/mnt/vfs"),
    ("virtio-9p", "/mnt/9p"),
    ("virtio-blk", "/mnt/blk"),
];

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_generic_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let ok = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        make_tree(&tree);
        let disk = ext4_of(&tree, &dir.path().join("tree.ext4"));
        let mut config = image.config("bench-shares", &dir.path().join("state"));
        config.resources.memory_mib = 512;
        config.timeouts.hotplug = DEADLINE;
        let vm = Arc::new(QemuBackend.create_instance(config).unwrap());
        let share = |id: &str, via| ShareConfig {
            via,
            read_only: true,
            ..ShareConfig::new(id, id, &tree)
        };
        vm.add_device(share("vfs", ShareVia::VirtioFs).into())
            .unwrap();
        vm.add_device(share("ninep", ShareVia::NineP).into())
            .unwrap();
        let mut blk = DiskConfig::new("tree", &disk);
        blk.serial = Some("vmkit-tree".into());
        blk.read_only = true;
        vm.add_disk(blk).unwrap();
        vm.start(StartOptions::new()).await.unwrap();
        let fs = Filesystem::new(vm.clone());
        let mounts = [
            Mount::share("vfs", "/mnt/vfs"),
            Mount::share("ninep", "/mnt/9p").nine_p(),
            Mount::disk("vmkit-tree", "ext4", "/mnt/blk").option("ro"),
        ];
        for mount in mounts {
            fs.mount(&mount.create_target(), DEADLINE).await.unwrap();
        }
        let p = Processes::new(vm.clone());
        let ok = tokio::time::timeout(Duration::from_secs(1200), measure(&p))
            .await
            .expect("the bench hung for 20 minutes");
        vm.shutdown().await.unwrap();
        ok
    });
    vmkit_benches::finish(ok);
}

/// The 256 MiB file and the 1,000-file tree under `root`.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut big = Vec::with_capacity(BIG_MIB << 20);
    for _ in 0..BIG_MIB {
        big.extend_from_slice(&chunk);
    }
    std::fs::write(root.join("big"), big).unwrap();
    for d in 0..DIRS {
        let dir = root.join(format!("small/d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::write(dir.join(format!("f{f:03}")), &chunk[..4096]).unwrap();
        }
    }
}

/// An ext4 image holding `tree`, with room to spare.
fn ext4_of(tree: &Path, image: &Path) -> std::path::PathBuf {
    let size = format!("{}M", BIG_MIB + 64);
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(image)
        .arg(size)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(made.success(), "mkfs.ext4: {made}");
    image.to_owned()
}

async fn drain(mut from: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut all = Vec::new();
    from.read_to_end(&mut all).await.unwrap();
    all
}

/// Runs `script` in the guest; fails the bench on a non-zero exit.
async fn sh(p: &Processes, script: &str) {
    let mut proc = p
        .spawn(&Command::new(["/bin/sh", "-c", script]), DEADLINE)
        .await
        .unwrap();
    drop(proc.take_stdin());
    let (out, err) = (proc.take_stdout().unwrap(), proc.take_stderr().unwrap());
    let (_, err, status) = tokio::join!(drain(out), drain(err), proc.wait(DEADLINE));
    assert!(
        status.unwrap().success(),
        "{script}: {}",
        String::from_utf8_lossy(&err)
    );
}

/// How long `script` takes in the guest, its caches dropped first.
async fn timed(p: &Processes, script: &str) -> Duration {
    sh(p, "sync; echo 3 > /proc/sys/vm/drop_caches").await;
    let t = Instant::now();
    sh(p, script).await;
    t.elapsed()
}

async fn measure(p: &Processes) -> bool {
    // One warm-up pass over everything (the host's page cache then holds the files
    // for every transport alike).
    for (_, at) in MOUNTS {
        sh(
            p,
            &format!("cat {at}/big > /dev/null && cat {at}/small/*/* > /dev/null"),
        )
        .await;
    }
    let mut big = [const { Vec::new() }; 3];
    let mut small = [const { Vec::new() }; 3];
    for _ in 0..ROUNDS {
        for (i, (_, at)) in MOUNTS.iter().enumerate() {
            big[i].push(timed(p, &format!("cat {at}/big > /dev/null")).await);
            small[i].push(timed(p, &format!("cat {at}/small/*/* > /dev/null")).await);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let big: Vec<Duration> = big.iter_mut().map(median).collect();
    let small: Vec<Duration> = small.iter_mut().map(median).collect();
    println!(
        "shares vs a disk (generic-kernel TCG guest, caches dropped, medians of {ROUNDS}, interleaved):"
    );
    for (i, (name, _)) in MOUNTS.iter().enumerate() {
        let mibps = BIG_MIB as f64 / big[i].as_secs_f64();
        println!(
            "  {name:10}: {BIG_MIB} MiB sequential {:7.0} ms ({mibps:6.1} MiB/s)   {} small files {:7.0} ms",
            big[i].as_secs_f64() * 1e3,
            DIRS * FILES_PER_DIR,
            small[i].as_secs_f64() * 1e3
        );
    }
    let seq = big[1].as_secs_f64() / big[0].as_secs_f64();
    let tree = small[1].as_secs_f64() / small[0].as_secs_f64();
    println!(
        "  9p time / virtio-fs time: sequential {seq:.2}, small files {tree:.2} (target: both > 1)"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    vmkit_benches::Row::new(
        "shares",
        &format!("{BIG_MIB} MiB sequential read, virtio-fs"),
        "ms",
        ms(big[0]),
        ROUNDS,
    )
    .against("virtio-9p", ms(big[1]))
    .ratio_at_most(1.0)
    .record();
    vmkit_benches::Row::new(
        "shares",
        "small files read, virtio-fs",
        "ms",
        ms(small[0]),
        ROUNDS,
    )
    .against("virtio-9p", ms(small[1]))
    .ratio_at_most(1.0)
    .record();
    seq > 1.0 && tree > 1.0
}
