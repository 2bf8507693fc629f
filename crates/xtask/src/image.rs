//! `cargo xtask image`: the test guest, built from Debian packages into
//! `target/vmkit-image/` (x86_64) or `target/vmkit-image-arm64/` (arm64, for the Arm
//! `virt` machine) and cached there.
//!
//! - Kernel: the `vmlinuz` of Debian's `linux-image-<ver>-cloud-<arch>-unsigned` (the
//!   version `linux-image-cloud-<arch>` points at), fetched with `apt-get download` and
//!   unpacked with `dpkg-deb -x`. Its virtio and vsock drivers are modules. On x86_64
//!   also its uncompressed `vmlinux`, which QEMU boots through PVH (`pvh.rs`): the
//!   test guests boot that one.
//! - Initramfs (`initrd.img`, uncompressed `newc` cpio written here, so neither `cpio`
//!   nor `gzip` is needed, and the guest spends no time decompressing): static busybox,
//!   `images/init` as `/init`, the modules listed in `images/modules.list`, the
//!   hotplug helper, the ACPI power-button handler, `vmkit-agent` (built here as a
//!   static binary, see [`GuestArch::build_agent`]), and crun with its libraries for
//!   the containers the containerd shim runs (`crun.rs`).
//!
//! The build is skipped when `target/vmkit-image/stamp` matches the kernel package, the
//! contents of `images/` and the agent binary.
//!
//! A second x86_64 image, `target/vmkit-image-generic/`, boots Debian's generic kernel
//! (`linux-image-<ver>-amd64-unsigned`) instead of the cloud one: the cloud kernel has
//! no 9p modules, and the 9p shares test needs them ([`Flavour::Generic`]).

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::unpack;
pub(crate) use crate::arch::GuestArch;
use crate::run::{output, read_bytes, read_text, step, target_dir, workspace_root};
use crate::{crun, install, pvh};

const BUSYBOX: &str = "busybox-static";

/// Which Debian kernel an image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    /// `linux-image-<ver>-cloud-<arch>`: small, quick to boot; the default test guest.
    Cloud,
    /// `linux-image-<ver>-<arch>`: what the cloud kernel leaves out (9p).
    Generic,
}

impl Flavour {
    /// Its name, as `images/modules.list` tags a line with it.
    fn name(self) -> &'static str {
        match self {
            Flavour::Cloud => "cloud",
            Flavour::Generic => "generic",
        }
    }
}

/// Where the image for `arch` and `flavour` lives: `<target dir>/vmkit-image[-arm64]`,
/// or `vmkit-image-generic` for the generic kernel.
pub(crate) fn image_dir(arch: GuestArch, flavour: Flavour) -> PathBuf {
    let target = target_dir();
    match flavour {
        Flavour::Cloud => target.join(arch.image_dir_name()),
        Flavour::Generic => target.join(format!("{}-generic", arch.image_dir_name())),
    }
}

/// Builds the cloud-kernel image for `arch` unless the cached one is current. Returns
/// its directory.
pub(crate) fn ensure_image(arch: GuestArch) -> Result<PathBuf, String> {
    ensure_flavour(arch, Flavour::Cloud)
}

/// Builds the image for `arch` with `flavour`'s kernel unless the cached one is
/// current. Returns its directory.
pub(crate) fn ensure_flavour(arch: GuestArch, flavour: Flavour) -> Result<PathBuf, String> {
    let dir = image_dir(arch, flavour);
    let inputs = workspace_root().join("images");
    let kernel_pkg = kernel_package(arch, flavour)?;
    let agent_path = arch.build_agent()?;
    let agent = read_bytes(&agent_path)?;
    // What else the image holds: crun and its libraries (crun.rs), from sid's packages.
    let stamp = format!(
        "{kernel_pkg} pvh sid:{} {:016x} {:016x}\n",
        crun::PACKAGES.join(","),
        hash_dir(&inputs)?,
        hash_bytes(&agent)
    );
    let stamp_path = dir.join("stamp");
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && dir.join("vmlinuz").is_file()
        && (arch != GuestArch::X86_64 || dir.join("vmlinux").is_file())
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
        &format!("download guest packages ({})", arch.debian()),
        arch.apt("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", &kernel_pkg, BUSYBOX]),
    )?;
    let kernel_root = dir.join("kernel");
    let busybox_root = dir.join("busybox");
    unpack(&debs, &kernel_pkg, &kernel_root)?;
    unpack(&debs, BUSYBOX, &busybox_root)?;
    let crun_root = dir.join("crun");
    crun::fetch(arch, &debs, &crun_root)?;
    let crun_files = crun::files(arch, &crun_root)?;

    let vmlinuz = find_file(&kernel_root.join("boot"), |n| n.starts_with("vmlinuz-"))?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .map_err(|e| format!("copy {}: {e}", vmlinuz.display()))?;
    if arch == GuestArch::X86_64 {
        write_vmlinux(&vmlinuz, &dir.join("vmlinux"))?;
    }

    let (initrd, module_count) = initramfs(
        (arch, flavour),
        &inputs,
        &kernel_root,
        &busybox_root,
        (&agent, &crun_files),
    )?;
    fs::write(dir.join("initrd.img"), &initrd).map_err(|e| format!("write initrd.img: {e}"))?;
    let _ = fs::remove_dir_all(&debs);
    let _ = fs::remove_dir_all(&busybox_root);
    let _ = fs::remove_dir_all(&crun_root);
    let _ = fs::remove_dir_all(&kernel_root);
    fs::write(&stamp_path, stamp).map_err(|e| format!("write {}: {e}", stamp_path.display()))?;
    println!(
        "==> guest image: vmlinuz (and vmlinux on x86_64) + initrd.img ({} KiB, {} modules) in {}",
        initrd.len() / 1024,
        module_count,
        dir.display()
    );
    Ok(dir)
}

/// The PVH-bootable `vmlinux` of the bzImage `vmlinuz`, written to `to`.
fn write_vmlinux(vmlinuz: &Path, to: &Path) -> Result<(), String> {
    let bzimage = read_bytes(vmlinuz)?;
    let why = |e: String| format!("the PVH vmlinux of {}: {e}", vmlinuz.display());
    let (payload, compressor) = pvh::payload(&bzimage).map_err(why)?;
    install::ensure_command(compressor.tool, compressor.package)?;
    let elf = pvh::vmlinux(payload, compressor).map_err(why)?;
    fs::write(to, &elf).map_err(|e| format!("write {}: {e}", to.display()))?;
    println!(
        "==> PVH kernel: {} ({} KiB, uncompressed with {})",
        to.display(),
        elf.len() / 1024,
        compressor.tool
    );
    Ok(())
}

/// The initramfs: busybox, `/init` and its helpers, the agent, crun with its
/// libraries (`extra`, as path and bytes), and the modules `images/modules.list` names
/// for `arch` with their dependencies, in `insmod` order. Returns it and how many
/// modules it holds.
fn initramfs(
    (arch, flavour): (GuestArch, Flavour),
    inputs: &Path,
    kernel_root: &Path,
    busybox_root: &Path,
    (agent, extra): (&[u8], &[(String, Vec<u8>)]),
) -> Result<(Vec<u8>, usize), String> {
    let modules_dir = find_file(&kernel_root.join("lib/modules"), |_| true)?;
    let module_list = read_text(&inputs.join("modules.list"))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let modules = modules_for(&module_list, (arch, flavour), &builtin);

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
        "usr",
        "usr/bin",
    ] {
        cpio.dir(d);
    }
    for (path, bytes) in extra {
        cpio.file_in_dirs(path, 0o755, bytes);
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
    cpio.file("sbin/vmkit-agent", 0o755, agent);
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
    Ok((cpio.finish(), ordered.len()))
}

/// `linux-image-<ver>-cloud-<arch>-unsigned` (or `-<arch>-unsigned`, generic) for the
/// version the metapackage depends on.
fn kernel_package(arch: GuestArch, flavour: Flavour) -> Result<String, String> {
    let meta = match flavour {
        Flavour::Cloud => arch.kernel_meta(),
        Flavour::Generic => format!("linux-image-{}", arch.debian()),
    };
    let depends = || output(arch.apt("apt-cache").args(["depends", &meta]));
    let mut text = depends().unwrap_or_default();
    if !text.contains("Depends:") {
        arch.update_lists()?;
        text = depends().unwrap_or_default();
    }
    parse_kernel_package(&text, arch, flavour).ok_or_else(|| {
        format!("cannot tell the kernel version: `apt-cache depends {meta}` said {text:?}")
    })
}

fn parse_kernel_package(depends: &str, arch: GuestArch, flavour: Flavour) -> Option<String> {
    let cloud = format!("-cloud-{}", arch.debian());
    let generic = format!("-{}", arch.debian());
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| {
            p.starts_with("linux-image-")
                && match flavour {
                    Flavour::Cloud => p.ends_with(&cloud),
                    Flavour::Generic => {
                        p.ends_with(&generic) && !p.contains("-cloud-") && !p.contains("-rt-")
                    }
                }
        })
        .map(|p| format!("{p}-unsigned"))
}

/// The modules of `images/modules.list` to put in an image: a line is a module name,
/// optionally followed by the Debian architectures it is for (`pvpanic-pci amd64`:
/// arm64's cloud kernel has no pvpanic) and the kernel flavour it is for (`9p
/// generic`: the cloud kernel has no 9p); modules the kernel has built in (its
/// `modules.builtin`) are left out.
fn modules_for<'a>(
    list: &'a str,
    (arch, flavour): (GuestArch, Flavour),
    builtin: &str,
) -> Vec<&'a str> {
    let flavours = [Flavour::Cloud.name(), Flavour::Generic.name()];
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let (kinds, archs): (Vec<&str>, Vec<&str>) = words.partition(|w| flavours.contains(w));
            let arch_ok = archs.is_empty() || archs.contains(&arch.debian());
            let flavour_ok = kinds.is_empty() || kinds.contains(&flavour.name());
            (arch_ok && flavour_ok).then_some(name)
        })
        .filter(|name| {
            let file = format!("/{name}.ko");
            !builtin.lines().any(|l| l.trim().ends_with(&file))
        })
        .collect()
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

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}

/// A `newc` cpio archive (the initramfs format), built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    /// The directories written so far.
    dirs: Vec<String>,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.dirs.push(name.to_owned());
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    /// A file at `name`, after the directories on its way that are not there yet.
    fn file_in_dirs(&mut self, name: &str, perm: u32, data: &[u8]) {
        let mut at = 0;
        while let Some(slash) = name[at..].find('/') {
            let dir = &name[..at + slash];
            if !self.dirs.iter().any(|d| d == dir) {
                self.dir(dir);
            }
            at += slash + 1;
        }
        self.file(name, perm, data);
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
        let cloud = Flavour::Cloud;
        assert_eq!(
            parse_kernel_package(text, GuestArch::X86_64, cloud).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(parse_kernel_package(text, GuestArch::Aarch64, cloud), None);
        let arm = "linux-image-cloud-arm64\n  Depends: linux-image-6.1.0-57-cloud-arm64\n";
        assert_eq!(
            parse_kernel_package(arm, GuestArch::Aarch64, cloud).as_deref(),
            Some("linux-image-6.1.0-57-cloud-arm64-unsigned")
        );
        assert_eq!(
            parse_kernel_package("linux-image-cloud-amd64\n", GuestArch::X86_64, cloud),
            None
        );
        let generic = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_kernel_package(generic, GuestArch::X86_64, Flavour::Generic).as_deref(),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
        assert_eq!(
            parse_kernel_package(text, GuestArch::X86_64, Flavour::Generic),
            None,
            "the cloud kernel is not the generic one"
        );
    }

    #[test]
    fn modules_are_picked_per_architecture_and_builtins_left_out() {
        let list =
            "# comment\nvirtio_pci\nbutton\npvpanic-pci amd64\n\nevdev amd64 arm64\n9p generic\n";
        let arm_builtin =
            "kernel/drivers/acpi/button.ko\nkernel/drivers/tty/serial/amba-pl011.ko\n";
        let x86 = (GuestArch::X86_64, Flavour::Cloud);
        assert_eq!(
            modules_for(list, x86, ""),
            ["virtio_pci", "button", "pvpanic-pci", "evdev"]
        );
        assert_eq!(
            modules_for(list, (GuestArch::Aarch64, Flavour::Cloud), arm_builtin),
            ["virtio_pci", "evdev"]
        );
        assert_eq!(
            modules_for(list, (GuestArch::X86_64, Flavour::Generic), ""),
            ["virtio_pci", "button", "pvpanic-pci", "evdev", "9p"]
        );
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
