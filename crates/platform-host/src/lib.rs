//! # vmkit-platform
//!
//! The platform layer of the host being built for, under one name, so that the crates
//! above it (vmkit-qemu) have no `cfg(target_os)` of their own: this is `vmkit-linux`
//! on Linux and `vmkit-macos` on macOS. Both offer the same modules — `accel`
//! (`hardware_accel(guest_arch, qemu)`), `limits` (`SUN_PATH_MAX`), `process`, `spawn`, `system`,
//! `tap`, `vhost_vsock` — with each OS's answers. [`child`] is its own: what a guest
//! agent needs to run its children is the same POSIX on both.
//!
//! ```
//! // KVM or HVF when really usable for a guest of this architecture, else None (TCG).
//! let qemu = std::path::Path::new("qemu-system-x86_64");
//! let _ = vmkit_platform::accel::hardware_accel(std::env::consts::ARCH, qemu);
//! assert!(vmkit_platform::limits::SUN_PATH_MAX >= 103);
//! ```

pub mod child;

#[cfg(target_os = "linux")]
pub use vmkit_linux::*;

#[cfg(target_os = "macos")]
pub use vmkit_macos::*;

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("vmkit runs on Linux and macOS hosts");
