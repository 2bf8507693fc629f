//! `cargo xtask test`: what CI runs (`.ci/run` calls exactly this).

use crate::run::{cargo, step};
use crate::{containerd, image, install};

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let (ours, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut lint = true;
    for arg in ours {
        match arg.as_str() {
            "--no-lint" => lint = false,
            other => return Err(format!("test: unknown option {other:?}")),
        }
    }
    install::ensure_all()?;
    install::ensure_arm64_tools()?;
    let image = image::ensure_image(image::GuestArch::X86_64)?;
    // The arm64 guest for machine virt (what Apple Silicon runs), emulated here.
    let arm64_image = image::ensure_image(image::GuestArch::Aarch64)?;
    // The generic kernel, for the 9p shares test (the cloud kernel has no 9p).
    let generic_image = image::ensure_flavour(image::GuestArch::X86_64, image::Flavour::Generic)?;
    // containerd 2.x and a busybox root filesystem, for the shim's tests.
    let containerd = containerd::ensure()?;
    if lint {
        step("format", cargo().args(["fmt", "--all", "--", "--check"]))?;
        step(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--locked",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
        crate::macos::check()?;
        step(
            "doc",
            cargo().env("RUSTDOCFLAGS", "-D warnings").args([
                "doc",
                "--workspace",
                "--all-features",
                "--no-deps",
                "--locked",
            ]),
        )?;
        step(
            "cargo deny",
            cargo().args([
                "deny",
                "check",
                "--hide-inclusion-graph",
                "bans",
                "licenses",
                "sources",
            ]),
        )?;
        crate::release::check(false)?;
    }
    // The plugin libraries the loader tests load (cargo builds a cdylib only when asked).
    step(
        "build the plugins",
        cargo()
            .args(["build", "--locked"])
            .args(PLUGINS.iter().flat_map(|p| ["-p", p])),
    )?;
    step(
        "tests",
        cargo()
            .env("VMKIT_IMAGE_DIR", &image)
            .env("VMKIT_ARM64_IMAGE_DIR", &arm64_image)
            .env("VMKIT_GENERIC_IMAGE_DIR", &generic_image)
            .env("VMKIT_CONTAINERD_DIR", &containerd.bin_dir)
            .env("VMKIT_BUSYBOX_ROOTFS", &containerd.busybox_rootfs)
            .env("VMKIT_TEST_IMAGES", &containerd.images)
            .args(["test", "--workspace", "--all-features", "--locked"])
            .args(test_args),
    )
}

/// The plugin crates whose libraries the tests load.
const PLUGINS: [&str; 3] = [
    "vmkit-plugin-example",
    "vmkit-plugin-qemu",
    "vmkit-plugin-testing",
];
