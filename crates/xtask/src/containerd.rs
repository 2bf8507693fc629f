//! containerd 2.x for the shim's tests, and a busybox root filesystem for their
//! containers, under `target/vmkit-containerd/`.
//!
//! The busybox root filesystem is also written as an OCI image archive
//! (`images.tar`: a busybox image and a pause image for CRI's pods), which the tests
//! import with `ctr image import` — no registry.
//!
//! Debian's bookworm has containerd 1.6, whose shims speak task API v2; the shim speaks
//! v3 (containerd ≥ 2.0). So containerd comes from sid's package, fetched with
//! `apt-get download` against apt lists of our own ([`AptRoot`]) and unpacked here —
//! sid is never added to the system's sources (an install from it upgrades the host's
//! libc halfway). The sid build is a static Go binary set and runs on bookworm.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{AptRoot, unpack};
use crate::arch::GuestArch;
use crate::oci_image::{self, Image};
use crate::run::{output, step, target_dir};

/// What the shim's tests need: containerd's binaries and a busybox root filesystem.
pub(crate) struct Containerd {
    /// Holds `containerd`, `ctr` and `containerd-shim-runc-v2`.
    pub(crate) bin_dir: PathBuf,
    /// A root filesystem of static busybox and its applets.
    pub(crate) busybox_rootfs: PathBuf,
    /// An OCI archive of [`BUSYBOX_IMAGE`] and [`PAUSE_IMAGE`], for `ctr image import`.
    pub(crate) images: PathBuf,
}

/// The busybox image's name: `/bin/sh` by default.
pub(crate) const BUSYBOX_IMAGE: &str = "vmkit.test/busybox:1";
/// The pause image's name: a pod's sandbox container, which sleeps until stopped.
pub(crate) const PAUSE_IMAGE: &str = "vmkit.test/pause:1";
/// The pause image's entrypoint: sleeps, and ends at SIGTERM (PID 1 of its namespace
/// would ignore a signal it has no handler for).
const PAUSE: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
];

/// Fetches and unpacks containerd and lays out the busybox root filesystem, unless
/// they are there already.
pub(crate) fn ensure() -> Result<Containerd, String> {
    let dir = target_dir().join("vmkit-containerd");
    let bin_dir = dir.join("root/usr/bin");
    let busybox_rootfs = dir.join("busybox-rootfs");
    let images = dir.join("images.tar");
    if bin_dir.join("containerd").is_file() && images.is_file() {
        println!("==> containerd: up to date in {}", dir.display());
        return Ok(Containerd {
            bin_dir,
            busybox_rootfs,
            images,
        });
    }
    let _ = fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("create {}: {e}", debs.display()))?;
    // apt's sandbox user must be able to write here, or apt warns and falls back to root.
    let _ = Command::new("chmod").arg("777").arg(&debs).status();
    AptRoot::sid(None).download("sid", &debs, &["containerd"])?;
    step(
        "download busybox-static",
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", "busybox-static"]),
    )?;
    unpack(&debs, "containerd", &dir.join("root"))?;
    let busybox = dir.join("busybox");
    unpack(&debs, "busybox-static", &busybox)?;
    busybox_tree(&busybox.join("bin/busybox"), &busybox_rootfs)?;
    let _ = fs::remove_dir_all(&debs);
    let _ = fs::remove_dir_all(&busybox);
    oci_image::write(
        &busybox_rootfs,
        &[
            Image {
                name: BUSYBOX_IMAGE,
                entrypoint: None,
            },
            Image {
                name: PAUSE_IMAGE,
                entrypoint: Some(PAUSE),
            },
        ],
        GuestArch::X86_64,
        &images,
    )?;
    let version =
        output(Command::new(bin_dir.join("containerd")).arg("--version")).unwrap_or_default();
    println!("==> containerd: {} in {}", version.trim(), dir.display());
    Ok(Containerd {
        bin_dir,
        busybox_rootfs,
        images,
    })
}

/// A root filesystem holding `busybox` at `/bin/busybox`, a symlink per applet in
/// `/bin`, and the directories a container's mounts need.
fn busybox_tree(busybox: &Path, rootfs: &Path) -> Result<(), String> {
    for sub in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(sub))
            .map_err(|e| format!("create {}: {e}", rootfs.join(sub).display()))?;
    }
    fs::copy(busybox, rootfs.join("bin/busybox"))
        .map_err(|e| format!("copy {}: {e}", busybox.display()))?;
    let list = output(Command::new(busybox).arg("--list"))
        .ok_or_else(|| format!("{} --list failed", busybox.display()))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .map_err(|e| format!("link applet {applet}: {e}"))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| format!("write etc/passwd: {e}"))?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").map_err(|e| format!("write etc/group: {e}"))
}
