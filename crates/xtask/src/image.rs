//! `cargo xtask image`: the test guest, built from Debian packages into
//! `target/vmkit-image/` and cached there.
//!
//! - Kernel: the `vmlinuz` of Debian's `linux-image-<ver>-cloud-amd64-unsigned` (the
//!   version `linux-image-cloud-amd64` points at), fetched with `apt-get download` and
//!   unpacked with `dpkg-deb -x`. Its virtio and vsock drivers are modules.
//! - Initramfs (`initrd.img`, uncompressed `newc` cpio written here, so neither `cpio`
//!   nor `gzip` is needed, and the guest spends no time decompressing): static busybox,
//!   `images/init` as `/init`, the modules listed in `images/modules.list`, the
//!   hotplug helper, the ACPI power-button handler, and `vmkit-agent` (built here as a
//!   static binary: `--target x86_64-unknown-linux-gnu` with `+crt-static`, so the flag
//!   stays off build scripts and proc macros and the host build's cache is kept).
//!
//! The build is skipped when `target/vmkit-image/stamp` matches the kernel package, the
//! contents of `images/` and the agent binary.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run::{output, step, workspace_root};

/// The metapackage whose dependency names the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";

/// Where the image lives: `<target dir>/vmkit-image`.
pub(crate) fn image_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("vmkit-image")
}

/// Builds the image unless the cached one is current. Returns its directory.
pub(crate) fn ensure_image() -> Result<PathBuf, String> {
    let dir = image_dir();
    let inputs = workspace_root().join("images");
    let kernel_pkg = kernel_package()?;
    let agent_path = build_agent()?;
    let agent = read_bytes(&agent_path)?;
    let stamp = format!(
        "{kernel_pkg} {:016x} {:016x}\n",
        hash_dir(&inputs)?,
        hash_bytes(&agent)
    );
    let stamp_path = dir.join("stamp");
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && dir.join("vmlinuz").is_file()
        && dir.join("initrd.img").is_file()
    {
        println!("==> guest image: up to date in {}", dir.display());
        return Ok(dir);
    }
    println!(
        "==> guest image: building in {} ({kernel_pkg})",
        dir.display()
    );
    let debs = dir.join("debs");
    let _ = fs::remove_dir_all(&dir);
    mkdir(&debs)?;
    // apt's sandbox user must be able to write here, or apt warns and falls back to root.
    let _ = Command::new("chmod").arg("777").arg(&debs).status();
    step(
        "download guest packages",
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", &kernel_pkg, BUSYBOX]),
    )?;
    let kernel_root = dir.join("kernel");
    let busybox_root = dir.join("busybox");
    unpack(&debs, &kernel_pkg, &kernel_root)?;
    unpack(&debs, BUSYBOX, &busybox_root)?;

    let vmlinuz = find_file(&kernel_root.join("boot"), |n| n.starts_with("vmlinuz-"))?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .map_err(|e| format!("copy {}: {e}", vmlinuz.display()))?;

    let modules_dir = find_file(&kernel_root.join("lib/modules"), |_| true)?;
    let module_list = read(&inputs.join("modules.list"))?;
    let modules: Vec<&str> = module_list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "etc",
        "etc/vmkit",
        "etc/acpi",
        "etc/acpi/PWRF",
        "proc",
        "sys",
        "dev",
        "lib",
        "lib/modules",
        "tmp",
        "run",
    ] {
        cpio.dir(d);
    }
    cpio.file(
        "bin/busybox",
        0o755,
        &read_bytes(&busybox_root.join("bin/busybox"))?,
    );
    cpio.file("init", 0o755, &read_bytes(&inputs.join("init"))?);
    cpio.file(
        "sbin/vmkit-hotplug",
        0o755,
        &read_bytes(&inputs.join("vmkit-hotplug"))?,
    );
    cpio.file("sbin/vmkit-agent", 0o755, &agent);
    cpio.file(
        "etc/acpi/PWRF/00000080",
        0o755,
        &read_bytes(&inputs.join("power-button"))?,
    );
    let ordered = with_dependencies(&modules_dir, &modules)?;
    cpio.file(
        "etc/vmkit/modules.list",
        0o644,
        (ordered
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n")
            .as_bytes(),
    );
    for (name, path) in &ordered {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &read_bytes(path)?);
    }
    let initrd = cpio.finish();
    fs::write(dir.join("initrd.img"), &initrd).map_err(|e| format!("write initrd.img: {e}"))?;
    let _ = fs::remove_dir_all(&debs);
    let _ = fs::remove_dir_all(&busybox_root);
    let _ = fs::remove_dir_all(&kernel_root);
    fs::write(&stamp_path, stamp).map_err(|e| format!("write {}: {e}", stamp_path.display()))?;
    println!(
        "==> guest image: vmlinuz + initrd.img ({} KiB, {} modules) in {}",
        initrd.len() / 1024,
        ordered.len(),
        dir.display()
    );
    Ok(dir)
}

/// `linux-image-<ver>-cloud-amd64-unsigned` for the version the metapackage depends on.
fn kernel_package() -> Result<String, String> {
    let depends = || output(Command::new("apt-cache").args(["depends", KERNEL_META]));
    let mut text = depends().unwrap_or_default();
    if !text.contains("Depends:") {
        step(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        text = depends().unwrap_or_default();
    }
    parse_kernel_package(&text).ok_or_else(|| {
        format!("cannot tell the kernel version: `apt-cache depends {KERNEL_META}` said {text:?}")
    })
}

fn parse_kernel_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(|p| format!("{p}-unsigned"))
}

fn unpack(debs: &Path, package: &str, into: &Path) -> Result<(), String> {
    let prefix = format!("{package}_");
    let deb = find_file(debs, |n| n.starts_with(&prefix) && n.ends_with(".deb"))?;
    mkdir(into)?;
    step(
        &format!("unpack {package}"),
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into),
    )
}

/// The first entry of `dir` (sorted) whose name satisfies `pred`.
fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<PathBuf, String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| format!("nothing matching in {}", dir.display()))
}

fn find_recursive(dir: &Path, name: &str) -> Result<Option<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_recursive(&path, name)? {
                return Ok(Some(found));
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The modules `wanted` and everything they depend on (the `depends=` field of each
/// module's `.modinfo`), each after its dependencies: the order `insmod` needs.
fn with_dependencies(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, String> {
    fn visit(
        modules_dir: &Path,
        name: &str,
        stack: &mut Vec<String>,
        out: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), String> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if stack.iter().any(|n| n == name) {
            return Err(format!(
                "module dependency cycle: {} -> {name}",
                stack.join(" -> ")
            ));
        }
        let file = format!("{name}.ko");
        let path = find_recursive(modules_dir, &file)?
            .ok_or_else(|| format!("module {file} not found under {}", modules_dir.display()))?;
        stack.push(name.to_owned());
        for dep in module_depends(&read_bytes(&path)?) {
            visit(modules_dir, &dep, stack, out)?;
        }
        stack.pop();
        out.push((name.to_owned(), path));
        Ok(())
    }
    let mut out = Vec::new();
    for name in wanted {
        visit(modules_dir, name, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// The `depends=a,b` entry of a kernel module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

fn hash_dir(dir: &Path) -> Result<u64, String> {
    let mut paths: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut hasher = DefaultHasher::new();
    for path in paths {
        path.file_name().hash(&mut hasher);
        read_bytes(&path)?.hash(&mut hasher);
    }
    Ok(hasher.finish())
}

/// The target triple the agent is built for: given explicitly so that `+crt-static`
/// applies to the agent only, not to build scripts or proc macros.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `vmkit-agent` as a static binary; returns its path. Cargo makes this a no-op
/// when nothing changed.
fn build_agent() -> Result<PathBuf, String> {
    step(
        "build the guest agent (static)",
        crate::run::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "vmkit-agent",
                "--target",
                AGENT_TARGET,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    Ok(target.join(AGENT_TARGET).join("release/vmkit-agent"))
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// A `newc` cpio archive (the initramfs format), built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let name_len = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name_len, 0,
        ];
        let _ = write!(self.out, "070701");
        for f in fields {
            let _ = write!(self.out, "{f:08x}");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_comes_from_the_metapackage_dependency() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_kernel_package(text).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(parse_kernel_package("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn module_dependencies_are_read_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio_ring,virtio\0intree=Y\0";
        assert_eq!(module_depends(ko), ["virtio_ring", "virtio"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let out = cpio.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        // The file's header: inode 2, mode 100755, size 10, name length 5 ("init\0").
        assert!(text.contains("07070100000002000081ed"), "{text}");
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
