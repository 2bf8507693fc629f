//! # vmkit-linux
//!
//! What vmkit needs from Linux itself, in one place (the rest of the tree has no
//! `cfg(target_os)`):
//!
//! - [`kvm::probe`]: is KVM really usable here? `/dev/kvm` opening is not enough: on
//!   hosts with `kvm_pvm` (a software hypervisor for PVM-built kernels) or without the
//!   CPU's `vmx`/`svm` flags, a stock guest crawls and dies, so the probe says so.
//! - [`spawn::Spawner`]: spawns VMM processes from one thread that lives as long as the
//!   process, with `PR_SET_PDEATHSIG` = `SIGKILL`, so a VMM can never outlive its host.
//!   (Linux delivers the parent-death signal when the *thread* that forked exits: a VMM
//!   spawned from a tokio worker or blocking-pool thread would be killed when that
//!   thread retires.)
//! - [`process`]: signals to children, the host CPU frequency.
//! - [`system`]: the uptime, and powering off (for the guest agent).
//! - [`mount`]: mounting and unmounting (for the guest agent's mount calls).
//! - [`tap::open_tap`]: opens (creating if needed) a TAP interface and returns its fd,
//!   to be passed to the VMM.
//! - [`vhost_vsock`]: whether kernel vsock for guests exists here, and the kernel's own
//!   CID reservation (`VHOST_VSOCK_SET_GUEST_CID`) on an fd handed to the VMM.
//!
//! ```no_run
//! use vmkit_linux::{kvm, spawn::{SpawnRequest, Spawner}};
//!
//! # async fn run() -> std::io::Result<()> {
//! println!("KVM: {}", kvm::probe());
//! let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
//! cmd.arg("-version");
//! let mut child = Spawner::global().spawn(SpawnRequest::new(cmd)).await?;
//! child.wait().await?;
//! # Ok(())
//! # }
//! ```

pub mod kvm;
pub mod mount;
pub mod process;
pub mod spawn;
pub mod system;
pub mod tap;
pub mod vhost_vsock;

/// The hardware accelerator QEMU may use here (the seam vmkit-qemu calls, with the same
/// name in `vmkit-macos`).
pub mod accel {
    use std::path::Path;

    /// `Some("kvm")` when the KVM probe finds it really usable and the guest is of the
    /// host's own architecture (`guest_arch` in Rust's names, `"x86_64"`), else `None`
    /// (TCG). The QEMU binary plays no part on Linux.
    pub fn hardware_accel(guest_arch: &str, _qemu: &Path) -> Option<&'static str> {
        (guest_arch == std::env::consts::ARCH && crate::kvm::probe().is_usable()).then_some("kvm")
    }
}

/// The limits Linux sets (the same names as in `vmkit-macos`).
pub mod limits {
    /// The longest Unix socket path: `sun_path` is 108 bytes, the last for the NUL.
    pub const SUN_PATH_MAX: usize = 107;
}

/// vhost-user devices (the hybrid-vsock daemon's): QEMU on Linux has them.
pub mod vhost_user {
    /// Whether QEMU on this host can use a vhost-user device.
    pub fn supported() -> bool {
        true
    }
}
