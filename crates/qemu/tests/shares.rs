//! Directories shared with the real test guest over virtio-fs (issue 24): one virtiofsd
//! per share, supervised by vmkit-qemu. A file crosses both ways; rename and delete are
//! seen on both sides; a program on the share runs (exec maps it from the file, so mmap
//! works); a read-only share gives EROFS; a symlink the guest plants never reaches the
//! host's file; a path with a comma stays one path; a share hot-plugged to the running
//! VM is mounted, used and unplugged; memory hot-plug (a DIMM here, virtio-mem in the 9p
//! test) still works beside a share; a virtiofsd killed from outside is a
//! `DeviceFailed` event while the VM goes on; shutdown leaves no daemon or socket. The
//! 9p test does the same on the generic-kernel guest, with 9p's cold-only hot-plug.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use vmkit_core::{
    DeviceConfigurator, DeviceSpec, Instance, ResourceManager, ShareConfig, ShareVia, VmEvent,
};
use vmkit_process::{Command, ExitStatus, Filesystem, Mount, Processes};
use vmkit_qemu::{QemuBackend, QemuInstance};

mod common;
use common::*;
use vmkit_testkit::qemu::require_qemu;
use vmkit_testkit::require_generic_guest_image;

const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `script` with `sh -c` in the guest: its exit code and stdout (stderr appended).
async fn sh(p: &Processes, script: &str) -> (i32, String) {
    let cmd = Command::new(["/bin/sh", "-c", script]);
    let mut proc = p.spawn(&cmd, DEADLINE).await.unwrap();
    drop(proc.take_stdin());
    let mut out = proc.take_stdout().unwrap();
    let mut err = proc.take_stderr().unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (a, b, status) = tokio::join!(
        out.read_to_end(&mut stdout),
        err.read_to_end(&mut stderr),
        proc.wait(DEADLINE)
    );
    a.unwrap();
    b.unwrap();
    let code = match status.unwrap() {
        ExitStatus::Code(code) => code,
        other => panic!("{script}: {other:?}"),
    };
    stdout.extend_from_slice(&stderr);
    (code, String::from_utf8_lossy(&stdout).into_owned())
}

/// `script` succeeds in the guest; its output.
async fn ok(p: &Processes, script: &str) -> String {
    let (code, out) = sh(p, script).await;
    assert_eq!(code, 0, "{script}: {out}");
    out
}

/// Polls `script` in the guest until it succeeds (a host change reaches a guest cache
/// within its timeout), at most 5 s.
async fn eventually(p: &Processes, script: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, out) = sh(p, script).await;
        if code == 0 {
            return;
        }
        assert!(std::time::Instant::now() < until, "{script}: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn share(id: &str, dir: &Path) -> ShareConfig {
    ShareConfig {
        via: ShareVia::VirtioFs,
        ..ShareConfig::new(id, id, dir)
    }
}

/// Files cross both ways, rename and delete are seen on both sides.
async fn both_ways(p: &Processes, host: &Path) {
    assert_eq!(
        ok(p, "cat /mnt/rw/from-host").await,
        "written on the host\n"
    );
    ok(p, "echo written in the guest > /mnt/rw/from-guest").await;
    assert_eq!(
        std::fs::read_to_string(host.join("from-guest")).unwrap(),
        "written in the guest\n"
    );
    ok(p, "mv /mnt/rw/from-guest /mnt/rw/renamed").await;
    assert!(!host.join("from-guest").exists());
    assert!(host.join("renamed").is_file());
    ok(p, "rm /mnt/rw/renamed").await;
    assert!(!host.join("renamed").exists());
    std::fs::rename(host.join("from-host"), host.join("moved")).unwrap();
    eventually(p, "test ! -e /mnt/rw/from-host && test -f /mnt/rw/moved").await;
    std::fs::remove_file(host.join("moved")).unwrap();
    eventually(p, "test ! -e /mnt/rw/moved").await;
}

/// A link the guest makes to `/etc/shadow` or `../..` resolves in the guest, never to
/// the host's file or the host's directories above the share.
async fn links_stay_in_the_guest(p: &Processes, host: &Path) {
    ok(
        p,
        "ln -s /etc/shadow /mnt/rw/shadow && ln -s ../.. /mnt/rw/up",
    )
    .await;
    let (_, through) = sh(p, "cat /mnt/rw/shadow").await;
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    assert!(
        host_shadow.is_empty() || !through.contains(host_shadow.lines().next().unwrap_or("?")),
        "the guest read the host's /etc/shadow: {through}"
    );
    let (_, listing) = sh(p, "ls /mnt/rw/up/").await;
    let sibling = host.parent().unwrap().join("host-only-sibling");
    assert!(sibling.is_dir(), "the test's marker beside the share");
    assert!(
        !listing.contains("host-only-sibling"),
        "../.. from the share reached the host: {listing}"
    );
    assert!(
        listing.contains("mnt"),
        "../.. is the guest's root: {listing}"
    );
}

/// The host side of a test: `shares/r,w` (holding `from-host`) and
/// `shares/ro,readonly=off` (holding `kept`) under `root` — a comma in a path is part of
/// the path, never another option — and a marker directory beside them.
struct HostDirs {
    rw: PathBuf,
    ro: PathBuf,
}

impl HostDirs {
    fn make(root: &Path) -> HostDirs {
        let dirs = HostDirs {
            rw: root.join("shares/r,w"),
            ro: root.join("shares/ro,readonly=off"),
        };
        for dir in [&dirs.rw, &dirs.ro, &root.join("shares/host-only-sibling")] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(dirs.rw.join("from-host"), "written on the host\n").unwrap();
        std::fs::write(dirs.ro.join("kept"), "read-only\n").unwrap();
        dirs
    }

    /// Adds `rw` and a read-only `ro` over `via`; `devices()` lists them with it.
    fn add_to(&self, vm: &QemuInstance, via: ShareVia) {
        let share = |id: &str, dir: &Path| ShareConfig {
            via,
            ..ShareConfig::new(id, id, dir)
        };
        vm.add_device(share("rw", &self.rw).into()).unwrap();
        let ro = ShareConfig {
            read_only: true,
            ..share("ro", &self.ro)
        };
        vm.add_device(ro.into()).unwrap();
        let listed: Vec<(String, ShareVia)> = vm
            .devices()
            .into_iter()
            .filter_map(|d| match d.spec {
                DeviceSpec::Share(s) => Some((s.id, s.via)),
                _ => None,
            })
            .collect();
        assert_eq!(listed, [("rw".into(), via), ("ro".into(), via)]);
    }
}

/// Mounts `rw` and `ro` at `/mnt/rw` and `/mnt/ro` (`nine_p`: over 9p).
async fn mount_both(fs: &Filesystem, nine_p: bool) {
    for tag in ["rw", "ro"] {
        let mut mount = Mount::share(tag, &format!("/mnt/{tag}")).create_target();
        if nine_p {
            mount = mount.nine_p();
        }
        fs.mount(&mount, DEADLINE).await.unwrap();
    }
}

/// What every transport must do: files both ways, rename and delete, links kept in the
/// guest, a program run from the share (exec maps it from the file: mmap), EROFS.
async fn file_checks(p: &Processes, dirs: &HostDirs) {
    both_ways(p, &dirs.rw).await;
    links_stay_in_the_guest(p, &dirs.rw).await;
    assert_eq!(
        ok(
            p,
            "cp \"$(readlink -f /bin/sh)\" /mnt/rw/busybox && /mnt/rw/busybox echo mapped"
        )
        .await,
        "mapped\n"
    );
    assert_eq!(ok(p, "cat /mnt/ro/kept").await, "read-only\n");
    let (code, out) = sh(p, "echo x > /mnt/ro/new").await;
    assert_ne!(code, 0);
    assert!(out.contains("Read-only file system"), "{out}");
}

/// Memory hot-plugged beside the shares, then 64 MiB of the `rw` share read into a
/// guest tmpfs.
async fn memory_beside(vm: &QemuInstance, fs: &Filesystem, p: &Processes, dirs: &HostDirs) {
    let memory = vm.memory_hotplugger().expect("memory hot-plug");
    memory.hotplug_memory(128).await.unwrap();
    std::fs::write(dirs.rw.join("big"), vec![7u8; 64 << 20]).unwrap();
    fs.mount(&Mount::tmpfs("/mnt/mem").create_target(), DEADLINE)
        .await
        .unwrap();
    ok(
        p,
        "cat /mnt/rw/big > /mnt/mem/big && cmp -s /mnt/rw/big /mnt/mem/big && rm /mnt/mem/big",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_fs_shares_on_the_real_guest() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let mut config = image.config("shares", &state);
    config.resources.max_memory_mib = Some(config.resources.memory_mib + 256);
    config.resources.memory_slots = 2;
    let vm = QemuBackend.create_instance(config).unwrap();
    let dirs = HostDirs::make(root.path());
    dirs.add_to(&vm, ShareVia::VirtioFs);
    let vm = Arc::new(start(vm).await);
    let p = Processes::new(vm.clone());
    let fs = Filesystem::new(vm.clone());
    mount_both(&fs, false).await;
    file_checks(&p, &dirs).await;
    // A DIMM: guest RAM is a shared memfd, so is the DIMM.
    memory_beside(&vm, &fs, &p, &dirs).await;

    // A share hot-plugged, mounted, used, unmounted and unplugged.
    let hot = root.path().join("shares/hot");
    std::fs::create_dir_all(&hot).unwrap();
    std::fs::write(hot.join("note"), "hot\n").unwrap();
    vm.hotplug_device(share("hot", &hot).into()).await.unwrap();
    let pid = vm.share_daemon_pid("hot").expect("the hot share's daemon");
    fs.mount(&Mount::share("hot", "/mnt/hot").create_target(), DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok(&p, "cat /mnt/hot/note").await, "hot\n");
    ok(&p, "echo back > /mnt/hot/reply").await;
    assert_eq!(
        std::fs::read_to_string(hot.join("reply")).unwrap(),
        "back\n"
    );
    fs.unmount("/mnt/hot", false, DEADLINE).await.unwrap();
    vm.unplug("hot").await.unwrap();
    assert!(vm.devices().iter().all(|d| d.id() != "hot"));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "its virtiofsd is gone"
    );

    // A virtiofsd killed from outside: a typed event, the VM and its other share go on.
    ok(&p, "umount -l /mnt/rw").await;
    let mut events = vm.events();
    let pid = vm.share_daemon_pid("rw").unwrap();
    nix_kill(pid);
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(VmEvent::DeviceFailed { id, reason }) = events.recv().await {
                return (id, reason);
            }
        }
    })
    .await
    .expect("DeviceFailed within 5 s");
    assert_eq!(failed.0, "rw");
    assert!(failed.1.contains("virtiofsd"), "{}", failed.1);
    assert_eq!(ok(&p, "cat /mnt/ro/kept").await, "read-only\n");

    let sockets: Vec<PathBuf> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("vmkit-fs"))
        .collect();
    assert!(
        !sockets.is_empty(),
        "the cold shares' daemon sockets are in the state dir"
    );
    vm.shutdown().await.unwrap();
    assert_eq!(
        processes_mentioning(&state),
        Vec::<u32>::new(),
        "a daemon outlived the VM"
    );
    for socket in sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

/// The same over virtio-9p, on the generic-kernel guest (the cloud kernel has no 9p):
/// the file checks, a link the guest makes stored as a plain file on the host
/// (`mapped-xattr`), virtio-mem beside the shares, and no hot-plug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_p_shares_on_the_real_guest() {
    if require_qemu().is_none() {
        return;
    }
    let Some(image) = require_generic_guest_image() else {
        return;
    };
    let _slot = VMS.acquire().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let mut config = image.config("nine-p", &state);
    config.resources.max_memory_mib = Some(config.resources.memory_mib + 256);
    config.resources.memory_slots = 0;
    config.resources.memory_hotplug = vmkit_core::MemoryHotplug::VirtioMem;
    let vm = QemuBackend.create_instance(config).unwrap();
    let dirs = HostDirs::make(root.path());
    dirs.add_to(&vm, ShareVia::NineP);
    let vm = Arc::new(start(vm).await);
    let p = Processes::new(vm.clone());
    let fs = Filesystem::new(vm.clone());
    mount_both(&fs, true).await;
    file_checks(&p, &dirs).await;
    let link = std::fs::symlink_metadata(dirs.rw.join("shadow")).unwrap();
    assert!(
        link.file_type().is_file(),
        "a guest's symlink is a plain file on the host: {link:?}"
    );
    memory_beside(&vm, &fs, &p, &dirs).await;
    let hot = ShareConfig {
        via: ShareVia::NineP,
        ..ShareConfig::new("hot", "hot", &dirs.ro)
    };
    match vm.hotplug_device(hot.into()).await {
        Err(vmkit_core::Error::Unsupported { reason, .. }) => {
            assert!(reason.contains("cold only"), "{reason}");
        }
        other => panic!("a hot 9p share: {other:?}"),
    }
    vm.shutdown().await.unwrap();
    assert_eq!(processes_mentioning(&state), Vec::<u32>::new());
}

fn nix_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
