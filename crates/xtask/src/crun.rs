//! crun, the OCI runtime the guest image carries for containers (the containerd shim
//! runs each container with it, in the guest): Debian's `crun` and the shared libraries
//! it needs, found by following each ELF file's `NEEDED` entries (`readelf -d`) through
//! the unpacked packages, and the dynamic loader its `PT_INTERP` names. See
//! docs/decision-oci-runtime.md for why crun.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{AptRoot, unpack};
use crate::arch::GuestArch;
use crate::run::{output, read_bytes};

/// Debian packages holding crun and every library it loads: sid's crun (1.28), as
/// containerd 2.x writes OCI spec 1.2 and bookworm's crun 1.8.1 reads 1.0 only. They
/// live in the guest image alone — its own loader and libc included — so nothing of
/// sid reaches the host.
pub(crate) const PACKAGES: &[&str] = &[
    "crun",
    "libblake3-0",
    "libc6",
    "libcap2",
    "libjson-c5",
    "libseccomp2",
    "libsystemd0",
];

/// The files crun needs in the guest, as (path in the image, bytes): `usr/bin/crun`,
/// each library under `lib/<triplet>/` by its soname, and the loader at its
/// `PT_INTERP` path. `unpacked` holds [`PACKAGES`] unpacked (`dpkg-deb -x`) into one
/// tree.
pub(crate) fn files(arch: GuestArch, unpacked: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let crun = unpacked.join("usr/bin/crun");
    let lib_dirs = [
        unpacked.join("lib").join(arch.triplet()),
        unpacked.join("usr/lib").join(arch.triplet()),
    ];
    let mut out = vec![("usr/bin/crun".to_owned(), read_bytes(&crun)?)];
    let interp = interpreter(&crun)?;
    // A merged-/usr Debian (sid) ships `/lib64/…` as `/usr/lib64/…`.
    let interp_file = [
        unpacked.join(interp.trim_start_matches('/')),
        unpacked.join("usr").join(interp.trim_start_matches('/')),
    ]
    .into_iter()
    .find(|p| p.exists())
    .ok_or_else(|| format!("crun's loader {interp} is in none of its packages"))?;
    out.push((
        interp.trim_start_matches('/').to_owned(),
        read_bytes(&resolve(unpacked, &interp_file)?)?,
    ));
    let mut seen: Vec<String> = Vec::new();
    let mut queue = needed(&crun)?;
    while let Some(name) = queue.pop() {
        if seen.contains(&name) || interp.ends_with(&format!("/{name}")) {
            continue;
        }
        let found = lib_dirs
            .iter()
            .map(|d| d.join(&name))
            .find(|p| p.exists())
            .ok_or_else(|| format!("crun needs {name}, which none of its packages holds"))?;
        let file = resolve(unpacked, &found)?;
        queue.extend(needed(&file)?);
        out.push((format!("lib/{}/{name}", arch.triplet()), read_bytes(&file)?));
        seen.push(name);
    }
    Ok(out)
}

/// Downloads [`PACKAGES`] from sid for `arch` into `debs` and unpacks them into `into`.
pub(crate) fn fetch(arch: GuestArch, debs: &Path, into: &Path) -> Result<(), String> {
    let apt = match arch {
        GuestArch::X86_64 => AptRoot::sid(None),
        GuestArch::Aarch64 => AptRoot::sid(Some(arch.debian())),
    };
    apt.download(&format!("sid {}", arch.debian()), debs, PACKAGES)?;
    for package in PACKAGES {
        unpack(debs, package, into)?;
    }
    Ok(())
}

/// `path` with its symlinks followed, which must stay inside `root` (a package's
/// symlinks are relative, or absolute as the guest sees them).
fn resolve(root: &Path, path: &Path) -> Result<PathBuf, String> {
    let mut current = path.to_owned();
    for _ in 0..16 {
        match fs::read_link(&current) {
            Ok(target) if target.is_absolute() => {
                current = root.join(target.strip_prefix("/").unwrap_or(&target));
            }
            Ok(target) => {
                let parent = current.parent().unwrap_or(root).to_owned();
                current = parent.join(target);
            }
            Err(_) => return Ok(current),
        }
    }
    Err(format!("{}: too many symlinks", path.display()))
}

/// The `NEEDED` entries of an ELF file's dynamic section.
fn needed(file: &Path) -> Result<Vec<String>, String> {
    let text = output(Command::new("readelf").arg("-dW").arg(file))
        .ok_or_else(|| format!("readelf -d {} failed", file.display()))?;
    Ok(parse_needed(&text))
}

fn parse_needed(readelf: &str) -> Vec<String> {
    readelf
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_owned())
        })
        .collect()
}

/// The loader an ELF executable names (`PT_INTERP`).
fn interpreter(file: &Path) -> Result<String, String> {
    let text = output(Command::new("readelf").arg("-lW").arg(file))
        .ok_or_else(|| format!("readelf -l {} failed", file.display()))?;
    parse_interpreter(&text).ok_or_else(|| format!("{} names no interpreter", file.display()))
}

fn parse_interpreter(readelf: &str) -> Option<String> {
    const KEY: &str = "Requesting program interpreter: ";
    let at = readelf.find(KEY)? + KEY.len();
    let end = readelf[at..].find(']')? + at;
    Some(readelf[at..end].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_libraries_and_the_interpreter_are_read_from_readelf() {
        let dynamic = " 0x0000000000000001 (NEEDED)             Shared library: [libyajl.so.2]\n \
                       0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n \
                       0x000000000000000e (SONAME)             Library soname: [libx.so.1]\n";
        assert_eq!(parse_needed(dynamic), ["libyajl.so.2", "libc.so.6"]);
        let program = "  INTERP  0x000318 ...\n      \
                       [Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]\n";
        assert_eq!(
            parse_interpreter(program).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(parse_interpreter("static binary"), None);
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = std::env::temp_dir().join(format!("xtask-crun-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let lib = root.join("lib");
        fs::create_dir_all(&lib).unwrap();
        fs::write(lib.join("libz.so.1.2"), b"z").unwrap();
        std::os::unix::fs::symlink("libz.so.1.2", lib.join("libz.so.1")).unwrap();
        std::os::unix::fs::symlink("/lib/libz.so.1", lib.join("abs.so")).unwrap();
        assert_eq!(
            resolve(&root, &lib.join("libz.so.1")).unwrap(),
            lib.join("libz.so.1.2")
        );
        assert_eq!(
            resolve(&root, &lib.join("abs.so")).unwrap(),
            lib.join("libz.so.1.2")
        );
        let _ = fs::remove_dir_all(&root);
    }
}
