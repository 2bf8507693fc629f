//! Installing what the project needs on a fresh Debian/Ubuntu machine: rustup
//! components, cargo tools, and system packages (as root via apt-get; otherwise the
//! exact command is printed and the task fails).

use std::path::Path;
use std::process::Command;

use crate::run::{cargo, output, show, step, succeeds};

/// cargo-deny, pinned so every machine checks with the same rules.
const CARGO_DENY_VERSION: &str = "0.20.2";
/// vhost-device-vsock (hybrid vsock for guests on hosts without /dev/vhost-vsock),
/// pinned to the version the vsock recipe was measured with.
const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";
/// virtiofsd (virtio-fs shares): Debian bookworm has none, and newer Debian builds
/// need a newer glibc, so it is built from crates.io, pinned.
const VIRTIOFSD_VERSION: &str = "1.14.0";
/// The QEMU major version the project is tested with (Debian bookworm-backports).
const QEMU_MAJOR: u32 = 10;

/// Everything the test suite and the demo need.
pub(crate) fn ensure_all() -> Result<(), String> {
    ensure_rust_components()?;
    ensure_cargo_deny()?;
    ensure_qemu()?;
    ensure_vhost_device_vsock()?;
    ensure_virtiofsd()?;
    ensure_protoc()?;
    Ok(())
}

/// What `cargo xtask demo` needs: QEMU (its guest channel is virtio-serial, which
/// needs no daemon; the image build fetches its own parts).
pub(crate) fn ensure_demo() -> Result<(), String> {
    ensure_qemu()
}

/// The command `tool`, from the Debian package `package` when it is missing.
pub(crate) fn ensure_command(tool: &str, package: &str) -> Result<(), String> {
    if succeeds(Command::new(tool).arg("--version")) {
        return Ok(());
    }
    apt_install(&[package], None)
}

/// runc, the containerd bench's floor (containerd's own runtime, on the host): Debian's.
pub(crate) fn ensure_runc() -> Result<(), String> {
    ensure_command("runc", "runc")
}

/// protoc: the CRI client of the shim's tests (the `k8s-cri` crate) is generated with
/// it when it builds.
fn ensure_protoc() -> Result<(), String> {
    ensure_command("protoc", "protobuf-compiler")
}

/// What the arm64 guest needs here: QEMU's Arm emulator, and the cross linker and arm64
/// glibc the static agent is linked with.
pub(crate) fn ensure_arm64_tools() -> Result<(), String> {
    let have = |binary: &str| succeeds(Command::new(binary).arg("--version"));
    let glibc = Path::new("/usr/aarch64-linux-gnu/lib/libc.a").is_file();
    if have("aarch64-linux-gnu-gcc") && glibc && have("qemu-system-aarch64") {
        return Ok(());
    }
    install_with_qemu_10(&[
        "qemu-system-arm",
        "gcc-aarch64-linux-gnu",
        "libc6-dev-arm64-cross",
    ])
}

/// `cargo install` puts vhost-device-vsock in `~/.cargo/bin`, where vmkit-qemu looks
/// for it when it is not on `PATH`.
fn ensure_vhost_device_vsock() -> Result<(), String> {
    let binary = vmkit_qemu_vhost_vsock_path();
    let have = output(Command::new(&binary).arg("--version")).unwrap_or_default();
    if have.split_whitespace().nth(1) == Some(VHOST_DEVICE_VSOCK_VERSION) {
        return Ok(());
    }
    step(
        "install vhost-device-vsock (about a minute, once per machine)",
        cargo().args([
            "install",
            "--locked",
            "vhost-device-vsock",
            "--version",
            VHOST_DEVICE_VSOCK_VERSION,
        ]),
    )
}

/// `cargo install` puts virtiofsd in `~/.cargo/bin`, where vmkit-qemu looks for it
/// when it is not on `PATH`. Building it needs libseccomp's and libcap-ng's headers.
fn ensure_virtiofsd() -> Result<(), String> {
    let binary = cargo_tool_path("virtiofsd");
    let have = output(Command::new(&binary).arg("--version")).unwrap_or_default();
    if have.split_whitespace().nth(1) == Some(VIRTIOFSD_VERSION) {
        return Ok(());
    }
    let headers = Path::new("/usr/include/seccomp.h").is_file()
        && Path::new("/usr/include/cap-ng.h").is_file();
    if !headers {
        apt_install(&["libseccomp-dev", "libcap-ng-dev", "pkg-config"], None)?;
    }
    step(
        "install virtiofsd (about a minute, once per machine)",
        cargo().args([
            "install",
            "--locked",
            "virtiofsd",
            "--version",
            VIRTIOFSD_VERSION,
        ]),
    )
}

/// Where vhost-device-vsock is: on `PATH`, else in cargo's bin dir.
fn vmkit_qemu_vhost_vsock_path() -> std::path::PathBuf {
    cargo_tool_path("vhost-device-vsock")
}

/// Where the cargo-installed tool `name` is: on `PATH`, else in cargo's bin dir.
fn cargo_tool_path(name: &str) -> std::path::PathBuf {
    if succeeds(Command::new(name).arg("--version")) {
        return name.into();
    }
    std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map_or_else(|| name.into(), |home| home.join("bin").join(name))
}

fn ensure_rust_components() -> Result<(), String> {
    let missing: Vec<&str> = [("rustfmt", "fmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(_, sub)| !succeeds(cargo().args([*sub, "--version"])))
        .map(|(component, _)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        "install rust components",
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
}

fn ensure_cargo_deny() -> Result<(), String> {
    let have = output(cargo().args(["deny", "--version"])).unwrap_or_default();
    if have.split_whitespace().nth(1) == Some(CARGO_DENY_VERSION) {
        return Ok(());
    }
    step(
        "install cargo-deny (a few minutes, once per machine)",
        cargo().args([
            "install",
            "--locked",
            "cargo-deny",
            "--version",
            CARGO_DENY_VERSION,
        ]),
    )
}

/// `cargo <subcommand>` from the crate `krate`, installed once (`cargo install
/// --locked`, its newest version).
pub(crate) fn ensure_cargo_tool(krate: &str, subcommand: &str) -> Result<(), String> {
    if succeeds(cargo().args([subcommand, "--version"])) {
        return Ok(());
    }
    step(
        &format!("install {krate} (once per machine)"),
        cargo().args(["install", "--locked", krate]),
    )
}

/// QEMU's major version, if `qemu-system-x86_64` runs.
pub(crate) fn qemu_major() -> Option<u32> {
    parse_qemu_major(&output(
        Command::new("qemu-system-x86_64").arg("--version"),
    )?)
}

/// The major version in `qemu-system-x86_64 --version`'s first line,
/// "QEMU emulator version 10.0.2 (Debian …)".
fn parse_qemu_major(text: &str) -> Option<u32> {
    let version = text.lines().next()?.split("version ").nth(1)?;
    version.split('.').next()?.trim().parse().ok()
}

fn ensure_qemu() -> Result<(), String> {
    match qemu_major() {
        Some(major) if major >= QEMU_MAJOR => return Ok(()),
        Some(major) if debian_codename().as_deref() != Some("bookworm") => {
            println!(
                "==> warning: QEMU {major} found; vmkit is tested with QEMU {QEMU_MAJOR}, \
                 and this distribution has no known source for it"
            );
            return Ok(());
        }
        _ => {}
    }
    install_with_qemu_10(&["qemu-system-x86"])
}

/// Installs `packages`, from bookworm-backports on bookworm: its own QEMU is 7.2, its
/// backports carry QEMU 10.
fn install_with_qemu_10(packages: &[&str]) -> Result<(), String> {
    if debian_codename().as_deref() == Some("bookworm") {
        let list = Path::new("/etc/apt/sources.list.d/vmkit-bookworm-backports.list");
        let line = "deb http://deb.debian.org/debian bookworm-backports main\n";
        apt_install(packages, Some(("bookworm-backports", list, line)))
    } else {
        apt_install(packages, None)
    }
}

/// `VERSION_CODENAME` from /etc/os-release.
fn debian_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Installs Debian packages, from `release` (with its apt source) when given.
fn apt_install(packages: &[&str], release: Option<(&str, &Path, &str)>) -> Result<(), String> {
    let mut install = Command::new("apt-get");
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
    ]);
    if let Some((name, _, _)) = release {
        install.args(["-t", name]);
    }
    install.args(packages);
    if !is_root() {
        let mut how = String::new();
        if let Some((_, list, line)) = release {
            how.push_str(&format!(
                "  echo '{}' | sudo tee {}\n",
                line.trim_end(),
                list.display()
            ));
        }
        how.push_str(&format!(
            "  sudo apt-get update && sudo {}\n",
            show(&install)
        ));
        return Err(format!(
            "missing system packages {packages:?}; not root, so install them yourself:\n{how}"
        ));
    }
    if let Some((name, list, line)) = release {
        let present = std::fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .chain(std::fs::read_to_string("/etc/apt/sources.list").ok())
            .any(|text| {
                text.lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains(name))
            });
        if !present {
            std::fs::write(list, line)
                .map_err(|e| format!("add apt source {}: {e}", list.display()))?;
        }
    }
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    step(&format!("install {}", packages.join(" ")), &mut install)
}

#[cfg(test)]
mod tests {
    use super::parse_qemu_major;

    #[test]
    fn qemu_major_is_read_from_the_version_line() {
        let debian = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                      Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_qemu_major(debian), Some(10));
        assert_eq!(parse_qemu_major("QEMU emulator version 7.2.15\n"), Some(7));
        assert_eq!(parse_qemu_major("qemu: command not found"), None);
        assert_eq!(parse_qemu_major(""), None);
    }
}
