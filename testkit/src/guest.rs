//! The test guests that `cargo xtask image` builds (kernel + initramfs in
//! `target/vmkit-image/`, the arm64 one for machine `virt` in
//! `target/vmkit-image-arm64/`, and one on Debian's generic kernel, which has 9p, in
//! `target/vmkit-image-generic/`), and configs that boot them quickly under TCG.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmkit_core::{Accel, InstanceConfig};

use crate::qemu::under_ci;

/// The test guest's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel the guest boots: the uncompressed `vmlinux` where the image has one
    /// (x86_64: QEMU boots it through PVH, skipping real mode and decompression), else
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// The compressed kernel (`vmlinuz`, a bzImage on x86_64).
    pub vmlinuz: PathBuf,
    /// The initramfs (`initrd.img`): busybox init, modules, the ready line.
    pub initrd: PathBuf,
}

/// The directory the image is looked for in: `$VMKIT_IMAGE_DIR`, else
/// `<workspace>/target/vmkit-image` (`$CARGO_TARGET_DIR/vmkit-image` when set).
pub fn image_dir() -> PathBuf {
    dir_of("VMKIT_IMAGE_DIR", "vmkit-image")
}

/// The arm64 image's directory: `$VMKIT_ARM64_IMAGE_DIR`, else
/// `<workspace>/target/vmkit-image-arm64` (under `$CARGO_TARGET_DIR` when set).
pub fn arm64_image_dir() -> PathBuf {
    dir_of("VMKIT_ARM64_IMAGE_DIR", "vmkit-image-arm64")
}

/// The generic-kernel image's directory (x86_64; its kernel has 9p):
/// `$VMKIT_GENERIC_IMAGE_DIR`, else `<workspace>/target/vmkit-image-generic`.
pub fn generic_image_dir() -> PathBuf {
    dir_of("VMKIT_GENERIC_IMAGE_DIR", "vmkit-image-generic")
}

/// `$env_var`, else `name` in the target dir.
pub(crate) fn dir_of(env_var: &str, name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env_var) {
        return PathBuf::from(dir);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join(name);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target")
        .join(name)
}

/// The image in `dir`, if built.
fn image_in(dir: &Path) -> Option<GuestImage> {
    let vmlinux = dir.join("vmlinux");
    let vmlinuz = dir.join("vmlinuz");
    let image = GuestImage {
        kernel: if vmlinux.is_file() {
            vmlinux
        } else {
            vmlinuz.clone()
        },
        vmlinuz,
        initrd: dir.join("initrd.img"),
    };
    (image.kernel.is_file() && image.initrd.is_file()).then_some(image)
}

/// The test guest, if built.
pub fn guest_image() -> Option<GuestImage> {
    image_in(&image_dir())
}

/// The test guest, or `None` with a note on stderr so the caller can skip.
///
/// # Panics
/// Under CI, when the image is missing: `cargo xtask test` builds it first, so its
/// absence is a failure there, never a silent skip.
pub fn require_guest_image() -> Option<GuestImage> {
    require_in(&image_dir(), "cargo xtask image")
}

/// The arm64 test guest (machine `virt`), or `None` with a note on stderr.
///
/// # Panics
/// Under CI, when it is missing: `cargo xtask test` builds it.
pub fn require_arm64_guest_image() -> Option<GuestImage> {
    require_in(&arm64_image_dir(), "cargo xtask image --arm64")
}

/// The x86_64 test guest on Debian's generic kernel (which has 9p), or `None` with a
/// note on stderr.
///
/// # Panics
/// Under CI, when it is missing: `cargo xtask test` builds it.
pub fn require_generic_guest_image() -> Option<GuestImage> {
    require_in(&generic_image_dir(), "cargo xtask image --generic")
}

fn require_in(dir: &Path, build: &str) -> Option<GuestImage> {
    match image_in(dir) {
        Some(image) => Some(image),
        None if under_ci() => panic!(
            "the test guest is missing from {} and CI is set: `cargo xtask test` builds it \
             (or run `{build}`)",
            dir.display()
        ),
        None => {
            eprintln!(
                "note: no test guest in {} (run `{build}`); skipping",
                dir.display()
            );
            None
        }
    }
}

impl GuestImage {
    /// A config that boots this guest under TCG with deadlines that allow for a loaded
    /// 2-core machine: state in `state_dir`, 1 vCPU (up to 4), 256 MiB.
    pub fn config(&self, id: &str, state_dir: &Path) -> InstanceConfig {
        let mut config = InstanceConfig::new(id, state_dir, &self.kernel);
        config.kernel.initrd = Some(self.initrd.clone());
        config.kernel.cmdline = vec!["mitigations=off".into()];
        config.accel = Accel::Tcg;
        config.resources.max_vcpus = 4;
        config.timeouts.start = Duration::from_secs(60);
        config.timeouts.shutdown_grace = Duration::from_secs(10);
        config
    }

    /// [`GuestImage::config`] on QEMU's `microvm` machine, which boots the compressed
    /// kernel (vmkit refuses a PVH kernel there: the guest would find no virtio-mmio
    /// device).
    pub fn microvm_config(&self, id: &str, state_dir: &Path) -> InstanceConfig {
        let mut config = self.config(id, state_dir);
        config.kernel.path = self.vmlinuz.clone();
        config
            .backend_options
            .insert("machine".into(), "microvm".into());
        config
    }

    /// [`GuestImage::config`] for the arm64 guest: machine `virt` (which QEMU cannot
    /// hot-plug vCPUs on, so 1 vCPU, no more), the guest reached over virtio-serial.
    pub fn virt_config(&self, id: &str, state_dir: &Path) -> InstanceConfig {
        let mut config = self.config(id, state_dir);
        config.resources.max_vcpus = config.resources.boot_vcpus;
        config.transport = vmkit_core::GuestTransport::VirtioSerial;
        config
            .backend_options
            .insert("machine".into(), "virt".into());
        config
    }
}

/// How the QEMU backend's start error that reports the agent wait begins.
const AGENT_WAIT: &str = "start: waiting for the guest agent to answer Ping (";

/// Whether `text` holds the start failure vhost-device-vsock 0.3 causes about once in a
/// hundred VMs — the agent wait timed out, and its last dial was refused by the daemon
/// without being read: `write CONNECT …: Broken pipe` when the daemon closed first, or
/// `read the CONNECT answer: Connection reset by peer` when the line arrived before it
/// closed (a socket closed with unread data resets; dials see that while the guest's
/// vsock comes up too, but not for a whole start). Either way the daemon closed every
/// host dial for the whole start although the guest was up
/// (docs/guest-communication.md). A guest that is up but not listening looks different:
/// `closed before OK: nothing listens on guest port 1025 yet`. Anywhere in `text`: a conformance
/// check quotes the start error inside its own message. Real-VM tests start such a VM
/// once more.
pub fn vsock_daemon_fault(text: &str) -> bool {
    text.find(AGENT_WAIT).is_some_and(|at| {
        let tail = &text[at..];
        (tail.contains("; last: write CONNECT") && tail.contains("Broken pipe"))
            || (tail.contains("; last: read the CONNECT answer")
                && tail.contains("Connection reset by peer"))
    })
}

#[cfg(test)]
mod tests {
    use super::vsock_daemon_fault;

    #[test]
    fn the_daemon_fault_is_known_by_both_of_its_last_dials_only() {
        let wait = "start: waiting for the guest agent to answer Ping (41 dials of \
                    hvsock:///t/vsock.sock:1025; last: ";
        let closed_first =
            format!("{wait}write CONNECT 1025: Broken pipe (os error 32)): timed out after 60s");
        let read_first = format!(
            "wrong_state_calls: start: {wait}read the CONNECT answer: Connection reset by peer \
             (os error 104)): timed out after 60s"
        );
        assert!(vsock_daemon_fault(&closed_first));
        assert!(
            vsock_daemon_fault(&read_first),
            "quoted inside a check's message"
        );
        let not_listening = format!(
            "{wait}closed before OK: nothing listens on guest port 1025 yet): timed out after 60s"
        );
        assert!(!vsock_daemon_fault(&not_listening));
        assert!(!vsock_daemon_fault(
            "read the CONNECT answer: Connection reset by peer"
        ));
    }
}
