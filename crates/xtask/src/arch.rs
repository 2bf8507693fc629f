//! The guest architectures the test image is built for: the host's own (x86_64), and
//! arm64 for the Arm `virt` machine (what Apple Silicon runs), emulated here under TCG.

use std::path::PathBuf;
use std::process::Command;

use crate::apt::AptRoot;
use crate::debian_rust::{self, Toolchain};
use crate::run::{cargo, step, target_dir};

/// A guest architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestArch {
    /// x86_64 (`q35`, `microvm`): the host's own.
    X86_64,
    /// arm64 (`virt`), a foreign architecture on these hosts.
    Aarch64,
}

impl GuestArch {
    /// Debian's name for it.
    pub(crate) fn debian(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "amd64",
            GuestArch::Aarch64 => "arm64",
        }
    }

    /// The image's directory name under the target dir.
    pub(crate) fn image_dir_name(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "vmkit-image",
            GuestArch::Aarch64 => "vmkit-image-arm64",
        }
    }

    /// The metapackage whose dependency names the current cloud kernel.
    pub(crate) fn kernel_meta(self) -> String {
        format!("linux-image-cloud-{}", self.debian())
    }

    /// `apt-get` or `apt-cache` (`tool`) for this architecture's packages. The host's
    /// own use the system's lists; arm64 uses lists of its own under
    /// `target/vmkit-apt-arm64/` (the same sources, another architecture), so the
    /// system's apt configuration is not touched.
    pub(crate) fn apt(self, tool: &str) -> Command {
        match self {
            GuestArch::X86_64 => Command::new(tool),
            GuestArch::Aarch64 => AptRoot::foreign(self.debian()).command(tool),
        }
    }

    /// Makes sure this architecture's package lists exist (`apt-get update` into its own
    /// lists for a foreign one; the system's otherwise, when they do not know `package`).
    pub(crate) fn update_lists(self) -> Result<(), String> {
        match self {
            GuestArch::X86_64 => step(
                "apt-get update (amd64 lists)",
                Command::new("apt-get").args(["update", "-q"]),
            ),
            GuestArch::Aarch64 => AptRoot::foreign(self.debian()).update(self.debian()),
        }
    }

    /// The GNU triplet its shared libraries live under (`/lib/<triplet>`).
    pub(crate) fn triplet(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "x86_64-linux-gnu",
            GuestArch::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// Builds `vmkit-agent` as a static binary for this architecture; returns its path.
    /// Cargo makes this a no-op when nothing changed.
    pub(crate) fn build_agent(self) -> Result<PathBuf, String> {
        match self {
            GuestArch::X86_64 => {
                // The triple is given explicitly so that `+crt-static` applies to the
                // agent only, not to build scripts or proc macros.
                let triple = "x86_64-unknown-linux-gnu";
                step(
                    "build the guest agent (static)",
                    cargo()
                        .args([
                            "build",
                            "--release",
                            "-p",
                            "vmkit-agent",
                            "--target",
                            triple,
                        ])
                        .env("RUSTFLAGS", "-C target-feature=+crt-static"),
                )?;
                Ok(target_dir().join(triple).join("release/vmkit-agent"))
            }
            GuestArch::Aarch64 => {
                // rustup has no arm64 std here: Debian's compiler builds it, Debian's
                // cross gcc links against arm64 glibc, statically.
                let triple = "aarch64-unknown-linux-gnu";
                let rust = Toolchain::ensure()?;
                step(
                    "build the arm64 guest agent (static, std from source)",
                    rust.cargo("build", triple)
                        .args(["--release", "-p", "vmkit-agent"])
                        .env(
                            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                            "aarch64-linux-gnu-gcc",
                        )
                        .env(
                            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                            "-C target-feature=+crt-static",
                        ),
                )?;
                Ok(debian_rust::target_dir()
                    .join(triple)
                    .join("release/vmkit-agent"))
            }
        }
    }
}
