//! The container's root filesystem on the host: containerd's rootfs mounts (the
//! snapshot, usually an overlay) made at `<bundle>/rootfs`, and bound into the
//! directory the VM shares. Undone in reverse; what a killed shim left is undone by
//! the `delete` subcommand.

use std::path::Path;

use containerd_shim_protos::api::Mount;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// Mounts containerd's `mounts` at `target`, in order.
pub(crate) fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for m in mounts {
        let (flags, data) = options(&m.options);
        let op = format!("mount {} ({}) at {}", m.source, m.type_, target.display());
        let fstype = (m.type_ != "bind").then_some(m.type_.as_str());
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| Error::io(op)(std::io::Error::from(e)))?;
    }
    Ok(())
}

/// Binds `source` (and what is mounted under it) at `target`; read-only on the host
/// too when `read_only` (the guest reaches it through the share, past crun's options).
pub(crate) fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    let op = || format!("bind {} at {}", source.display(), target.display());
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::io(op())(e.into()))?;
    if read_only {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| Error::io(format!("{}: read-only", op()))(e.into()))?;
    }
    Ok(())
}

/// Makes what a bind of `source` needs at `target`: a directory, or an empty file.
pub(crate) fn bind_placeholder(source: &Path, target: &Path) -> Result<()> {
    let op = format!("bind {} at {}", source.display(), target.display());
    let meta = std::fs::metadata(source).map_err(Error::io(&op))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(&op))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(Error::io(op))
    } else {
        std::fs::File::create(target)
            .map(drop)
            .map_err(Error::io(op))
    }
}

/// The mount points at or under `dir`, deepest first (the order to unmount them in).
pub(crate) fn under(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = mount_points_under(&info, dir);
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// The mount points in `mountinfo` at or under `dir`.
fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<std::path::PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(std::path::PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                u8::try_from(value).ok()
            });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts whatever is mounted at `target` (lazily, so a busy one goes once it is
/// free); nothing there is not an error.
pub(crate) fn unmount(target: &Path) -> Result<()> {
    loop {
        match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue, // more may be stacked there
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => {
                return Err(Error::io(format!("unmount {}", target.display()))(e.into()));
            }
        }
    }
}

/// Mount flags and the file system's data for containerd's option list.
fn options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_under_a_dir_are_found_in_mountinfo() {
        let info = "36 35 98:0 / / rw - ext3 /dev/root rw\n\
                    40 36 0:5 / /run/b/vmkit/rootfs rw - overlay overlay rw\n\
                    41 40 0:6 / /run/b/vmkit/mounts/0 rw - tmpfs shm rw\n\
                    42 36 0:7 / /run/b/vmkit\\040x rw - tmpfs t rw\n\
                    43 36 0:8 / /run/bb rw - tmpfs t rw\n";
        let found = mount_points_under(info, Path::new("/run/b/vmkit"));
        assert_eq!(
            found,
            [
                Path::new("/run/b/vmkit/rootfs"),
                Path::new("/run/b/vmkit/mounts/0")
            ]
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/a\\9"), "/a\\9");
        assert_eq!(
            unescape("/a\\777"),
            "/a\\777",
            "out of a byte's range: kept"
        );
    }

    #[test]
    fn flags_are_split_from_file_system_data() {
        let overlay = [
            "index=off",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "workdir=/w",
            "ro",
        ]
        .map(String::from);
        let (flags, data) = options(&overlay);
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(data, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w");
        let (flags, data) = options(&["rbind".into(), "rw".into()]);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }
}
