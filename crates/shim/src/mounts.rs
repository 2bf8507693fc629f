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

/// Binds `source` (and what is mounted under it) at `target`.
pub(crate) fn bind(source: &Path, target: &Path) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::io(format!("bind {} at {}", source.display(), target.display()))(e.into()))
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
