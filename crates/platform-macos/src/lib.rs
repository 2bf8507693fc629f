//! # vmkit-macos
//!
//! What vmkit needs from macOS, in one place, with the same module names as
//! `vmkit-linux` so that vmkit-qemu picks either by its target alone (a renamed
//! dependency in its `Cargo.toml`; no `cfg` in its code):
//!
//! - [`accel`]: whether QEMU may use Hypervisor.framework (`hvf`): `kern.hv_support` is
//!   1, the guest is the host's own architecture, QEMU is not running under Rosetta
//!   (`sysctl.proc_translated`), and the QEMU binary lists `hvf` in `-accel help`;
//!   otherwise TCG, saying which check failed. [`accel::decide`] is the decision table.
//! - [`net`]: networking without TAP — QEMU's `user` networking by default, vmnet when
//!   privileged, or a `stream` netdev to a socket_vmnet or gvproxy socket (the backends
//!   are vmkit-core's `NicBackend`s; vmkit-qemu writes their `-netdev`s).
//! - [`limits`]: `sun_path` is 104 bytes on macOS, so a socket path may be 103.
//! - [`mount`]: refused (only a Linux guest's agent mounts; the same names as Linux's).
//! - [`system`]: the uptime (the agent's host test mode); powering off is refused.
//! - [`tap`], [`vhost_vsock`], [`vhost_user`]: what macOS does not have, refused with a
//!   reason (so `GuestTransport::Auto` picks virtio-serial).
//! - `spawn`, `process`, `kqueue` (macOS only): spawning QEMU with a guardian process
//!   that watches vmkit with `EVFILT_PROC`/`NOTE_EXIT` and kills QEMU when vmkit exits
//!   (macOS has no parent-death signal), and signals.
//!
//! Everything that does not call the OS is plain code, unit-tested on Linux; the thin
//! OS wrappers sit behind `cfg(target_os = "macos")`. These machines cannot install a
//! macOS standard library from rustup, so those wrappers are type-checked here for
//! both Mac targets with `std` built from source (`cargo xtask check-macos`), but have
//! never been linked or run.
//!
//! ```
//! use vmkit_macos::accel::{Arch, Decision, HvfFacts, decide};
//!
//! let facts = HvfFacts {
//!     hv_support: Some(1),
//!     translated: Some(0),
//!     host: Arch::Aarch64,
//!     guest: Arch::Aarch64,
//!     qemu_lists_hvf: true,
//! };
//! assert_eq!(decide(&facts), Decision::Hvf);
//! ```

pub mod accel;
pub mod limits;
pub mod mount;
pub mod net;
pub mod system;
pub mod tap;
pub mod vhost_vsock;

pub use vhost_vsock::vhost_user;

#[cfg(target_os = "macos")]
pub mod kqueue;
#[cfg(target_os = "macos")]
pub mod process;
#[cfg(target_os = "macos")]
pub mod spawn;
