//! The mount calls: which mounts the agent allows, checked before any syscall.
//!
//! Four kinds, each with its own options: a disk by serial (its device found under
//! `/sys/block`), a tmpfs, an overlay of existing absolute directories, a share by tag
//! (virtio-fs or 9p). Flags common to all: ro, rw, nosuid, nodev, noexec, noatime,
//! relatime, sync; tmpfs also takes size=, mode=, uid=, gid=, nr_inodes=. Nothing is
//! ever mounted on or under `/proc`, `/sys`, `/dev` or `/run`, or on `/`; a target is
//! resolved (symlinks followed) before that check.

use std::path::{Path, PathBuf};

use vmkit_platform::mount::MountFlags;
use vmkit_proto::agent::{MakeDirRequest, MountKind, MountRequest, UnmountRequest};

use crate::process::ProcError;
use crate::root::Root;

/// Where nothing may be mounted.
const PROTECTED: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];
/// Filesystems a disk may hold.
const BLOCK_FSTYPES: [&str; 9] = [
    "ext4", "ext2", "ext3", "xfs", "btrfs", "vfat", "iso9660", "squashfs", "erofs",
];

/// A checked mount, ready for `mount(2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub(crate) source: String,
    pub(crate) target: PathBuf,
    pub(crate) fstype: String,
    pub(crate) flags: MountFlags,
    pub(crate) data: String,
    pub(crate) create_target: bool,
}

fn invalid(reason: String) -> ProcError {
    ProcError::Invalid(reason)
}

/// `path` as an absolute path with no `.`, `..` or NUL.
fn absolute(what: &str, path: &str) -> Result<PathBuf, ProcError> {
    if path.contains('\0') {
        return Err(invalid(format!("{what} {path:?} contains a NUL byte")));
    }
    if !path.starts_with('/') {
        return Err(invalid(format!("{what} {path:?} is not absolute")));
    }
    // By the text: `Path::components` drops a `.` in the middle.
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err(invalid(format!("{what} {path:?} has a . or .. in it")));
    }
    Ok(Path::new(path).components().collect())
}

/// Refuses `/` and the protected trees.
fn allowed_target(target: &Path) -> Result<(), ProcError> {
    if target == Path::new("/") {
        return Err(invalid("target /: never mounted over".into()));
    }
    for protected in PROTECTED {
        if target.starts_with(protected) {
            return Err(invalid(format!(
                "target {}: nothing is mounted on or under {protected}",
                target.display()
            )));
        }
    }
    Ok(())
}

/// Parses the options: flags for every kind, and for tmpfs its data options.
fn options(kind: MountKind, given: &[String]) -> Result<(MountFlags, Vec<String>), ProcError> {
    let mut flags = MountFlags::default();
    let mut data = Vec::new();
    for option in given {
        match option.as_str() {
            "ro" => flags.read_only = true,
            "rw" => flags.read_only = false,
            "nosuid" => flags.no_suid = true,
            "nodev" => flags.no_dev = true,
            "noexec" => flags.no_exec = true,
            "noatime" => flags.no_atime = true,
            "relatime" => flags.rel_atime = true,
            "sync" => flags.sync = true,
            other if kind == MountKind::MOUNT_KIND_TMPFS && tmpfs_option(other) => {
                data.push(other.to_owned());
            }
            other => {
                return Err(invalid(format!(
                    "option {other:?} is not allowed for a {} mount",
                    kind_name(kind)
                )));
            }
        }
    }
    Ok((flags, data))
}

/// size=<n>[k|m|g|%], mode=<octal>, uid=<n>, gid=<n>, nr_inodes=<n>[k|m|g].
fn tmpfs_option(option: &str) -> bool {
    let Some((key, value)) = option.split_once('=') else {
        return false;
    };
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let sized = |v: &str| {
        let number = v.strip_suffix(['k', 'm', 'g', 'K', 'M', 'G']).unwrap_or(v);
        digits(number)
    };
    match key {
        "size" => sized(value) || value.strip_suffix('%').is_some_and(digits),
        "nr_inodes" => sized(value),
        "mode" => {
            !value.is_empty()
                && value.len() <= 4
                && value.bytes().all(|b| (b'0'..=b'7').contains(&b))
        }
        "uid" | "gid" => digits(value),
        _ => false,
    }
}

fn kind_name(kind: MountKind) -> &'static str {
    match kind {
        MountKind::MOUNT_KIND_UNSPECIFIED => "unspecified",
        MountKind::MOUNT_KIND_BLOCK => "block",
        MountKind::MOUNT_KIND_TMPFS => "tmpfs",
        MountKind::MOUNT_KIND_OVERLAY => "overlay",
        MountKind::MOUNT_KIND_SHARE => "share",
    }
}

/// A tag or serial: 1 to 36 of `[A-Za-z0-9._-]` (virtio-fs tags are at most 36 bytes;
/// a serial at most 20), so nothing in it can reach an option string.
fn name(what: &str, text: &str, max: usize) -> Result<String, ProcError> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(invalid(format!(
            "{what} {text:?} must be 1 to {max} of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// An overlay directory: absolute, existing, and free of the characters the overlay
/// option string uses as separators.
fn overlay_dir(what: &str, dir: &str) -> Result<String, ProcError> {
    let path = absolute(what, dir)?;
    let text = path.display().to_string();
    if text.contains([',', ':', '\\']) {
        return Err(invalid(format!("{what} {dir:?} contains , : or \\")));
    }
    if !path.is_dir() {
        return Err(ProcError::NotFound(format!(
            "{what} {dir}: no such directory"
        )));
    }
    Ok(text)
}

/// The device of the disk whose serial is `serial`, from `/sys/block/*/serial`.
fn disk_by_serial(root: &Root, serial: &str) -> Result<String, ProcError> {
    let block = root.path("/sys/block");
    let entries = std::fs::read_dir(&block)
        .map_err(|e| ProcError::Failed(format!("read {}: {e}", block.display())))?;
    for entry in entries.flatten() {
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim() == serial {
            return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    Err(ProcError::NotFound(format!(
        "no disk with serial {serial:?}"
    )))
}

/// Checks a mount request and works out its `mount(2)` arguments.
pub(crate) fn plan(req: &MountRequest, root: &Root) -> Result<Planned, ProcError> {
    let kind = req.kind.enum_value_or(MountKind::MOUNT_KIND_UNSPECIFIED);
    let target = absolute("target", &req.target)?;
    allowed_target(&target)?;
    let (flags, mut data) = options(kind, &req.options)?;
    let (source, fstype) = match kind {
        MountKind::MOUNT_KIND_UNSPECIFIED => {
            return Err(invalid("the mount kind is unspecified".into()));
        }
        MountKind::MOUNT_KIND_TMPFS => ("tmpfs".to_owned(), "tmpfs".to_owned()),
        MountKind::MOUNT_KIND_BLOCK => {
            let fstype = req.fstype.as_str();
            if !BLOCK_FSTYPES.contains(&fstype) {
                return Err(invalid(format!(
                    "filesystem {fstype:?} is none of {}",
                    BLOCK_FSTYPES.join(", ")
                )));
            }
            let serial = name("serial", &req.source, 20)?;
            (disk_by_serial(root, &serial)?, fstype.to_owned())
        }
        MountKind::MOUNT_KIND_OVERLAY => {
            if req.lower.is_empty() {
                return Err(invalid(
                    "an overlay needs at least one lower directory".into(),
                ));
            }
            let lower = req
                .lower
                .iter()
                .map(|d| overlay_dir("lower", d))
                .collect::<Result<Vec<_>, _>>()?;
            data.push(format!("lowerdir={}", lower.join(":")));
            if !req.upper.is_empty() || !req.work.is_empty() {
                data.push(format!("upperdir={}", overlay_dir("upper", &req.upper)?));
                data.push(format!("workdir={}", overlay_dir("work", &req.work)?));
            }
            ("overlay".to_owned(), "overlay".to_owned())
        }
        MountKind::MOUNT_KIND_SHARE => {
            let tag = name("tag", &req.source, 36)?;
            match req.fstype.as_str() {
                "" | "virtiofs" => (tag, "virtiofs".to_owned()),
                "9p" => {
                    data.push("trans=virtio,version=9p2000.L,msize=524288".to_owned());
                    (tag, "9p".to_owned())
                }
                other => {
                    return Err(invalid(format!(
                        "a share's filesystem {other:?} is neither virtiofs nor 9p"
                    )));
                }
            }
        }
    };
    Ok(Planned {
        source,
        target,
        fstype,
        flags,
        data: data.join(","),
        create_target: req.create_target,
    })
}

/// Resolves `target` (its symlinks) and checks the real path is allowed too.
fn resolved(target: &Path) -> Result<PathBuf, ProcError> {
    let real = std::fs::canonicalize(target)
        .map_err(|e| ProcError::NotFound(format!("target {}: {e}", target.display())))?;
    allowed_target(&real)?;
    Ok(real)
}

/// How long a virtio-fs share's mount is retried while its tag may not be registered
/// yet (see the agent's `mount`).
pub(crate) const TAG_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Planned {
    /// Whether it mounts a virtio-fs tag, which a just-plugged device registers a
    /// moment after it reports itself live.
    pub(crate) fn waits_for_tag(&self) -> bool {
        self.fstype == "virtiofs"
    }
}

/// Mounts a planned mount.
pub(crate) fn mount(planned: &Planned) -> Result<(), ProcError> {
    if planned.create_target {
        std::fs::create_dir_all(&planned.target)
            .map_err(|e| ProcError::Failed(format!("create {}: {e}", planned.target.display())))?;
    }
    let target = resolved(&planned.target)?;
    vmkit_platform::mount::mount(
        &planned.source,
        &target,
        &planned.fstype,
        planned.flags,
        &planned.data,
    )
    .map_err(|e| {
        ProcError::Failed(format!(
            "mount {} ({}) at {}: {e}",
            planned.source,
            planned.fstype,
            target.display()
        ))
    })
}

/// Checks an unmount request; its target.
pub(crate) fn plan_unmount(req: &UnmountRequest) -> Result<PathBuf, ProcError> {
    let target = absolute("target", &req.target)?;
    allowed_target(&target)?;
    Ok(target)
}

/// Unmounts a checked target.
pub(crate) fn unmount(target: &Path, lazy: bool) -> Result<(), ProcError> {
    let target = resolved(target)?;
    vmkit_platform::mount::unmount(&target, lazy).map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) => ProcError::Precondition(format!(
            "unmount {}: nothing is mounted there",
            target.display()
        )),
        _ => ProcError::Failed(format!("unmount {}: {e}", target.display())),
    })
}

/// Checks a make-dir request: its path and mode.
pub(crate) fn plan_make_dir(req: &MakeDirRequest) -> Result<(PathBuf, u32), ProcError> {
    let path = absolute("path", &req.path)?;
    let mode = if req.mode == 0 { 0o755 } else { req.mode };
    if mode > 0o7777 {
        return Err(invalid(format!("mode {mode:o} is not a permission mode")));
    }
    Ok((path, mode))
}

/// Creates `path` and its parents, the last with `mode`.
pub(crate) fn make_dir(path: &Path, mode: u32) -> Result<(), ProcError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| ProcError::Failed(format!("make dir {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: MountKind, target: &str) -> MountRequest {
        let mut r = MountRequest::new();
        r.kind = kind.into();
        r.target = target.into();
        r
    }

    fn refused(r: &MountRequest) -> String {
        match plan(r, &Root::at(Path::new("/"))) {
            Err(ProcError::Invalid(reason)) => reason,
            other => panic!("{r:?}: {other:?}, expected Invalid"),
        }
    }

    #[test]
    fn targets_outside_the_protected_trees_are_the_only_ones() {
        assert!(refused(&req(MountKind::MOUNT_KIND_TMPFS, "mnt")).contains("not absolute"));
        assert!(refused(&req(MountKind::MOUNT_KIND_TMPFS, "/")).contains("never"));
        for bad in [
            "/proc",
            "/sys/fs",
            "/dev/shm",
            "/run/x",
            "/mnt/../proc",
            "/a/./b",
        ] {
            refused(&req(MountKind::MOUNT_KIND_TMPFS, bad));
        }
        let ok = plan(
            &req(MountKind::MOUNT_KIND_TMPFS, "/mnt//scratch/"),
            &Root::at(Path::new("/")),
        )
        .unwrap();
        assert_eq!(ok.target, Path::new("/mnt/scratch"));
        assert_eq!((ok.source.as_str(), ok.fstype.as_str()), ("tmpfs", "tmpfs"));
    }

    #[test]
    fn options_are_checked_per_kind() {
        let mut r = req(MountKind::MOUNT_KIND_TMPFS, "/mnt");
        r.options = vec![
            "ro".into(),
            "size=64m".into(),
            "mode=1777".into(),
            "nosuid".into(),
        ];
        let planned = plan(&r, &Root::at(Path::new("/"))).unwrap();
        assert!(planned.flags.read_only && planned.flags.no_suid);
        assert_eq!(planned.data, "size=64m,mode=1777");
        for bad in [
            "size=64m,uid=0",
            "mode=999",
            "exec",
            "size=",
            "uid=-1",
            "bind",
        ] {
            r.options = vec![bad.into()];
            assert!(refused(&r).contains("not allowed"), "{bad}");
        }
        let mut share = req(MountKind::MOUNT_KIND_SHARE, "/mnt");
        share.source = "rootfs".into();
        share.options = vec!["size=1m".into()];
        assert!(refused(&share).contains("not allowed"));
        share.options.clear();
        share.source = "tag,with=comma".into();
        assert!(refused(&share).contains("tag"));
        share.source = "rootfs".into();
        share.fstype = "nfs".into();
        assert!(refused(&share).contains("neither"));
        share.fstype = "9p".into();
        let planned = plan(&share, &Root::at(Path::new("/"))).unwrap();
        assert!(planned.data.starts_with("trans=virtio"));
        assert_eq!(
            refused(&req(MountKind::MOUNT_KIND_UNSPECIFIED, "/mnt")),
            "the mount kind is unspecified"
        );
    }

    #[test]
    fn a_disk_is_found_by_its_serial_and_an_overlay_needs_real_dirs() {
        let fake = tempfile::tempdir().unwrap();
        let vdb = fake.path().join("sys/block/vdb");
        std::fs::create_dir_all(&vdb).unwrap();
        std::fs::write(vdb.join("serial"), "data-1\n").unwrap();
        let root = Root::at(fake.path());
        let mut r = req(MountKind::MOUNT_KIND_BLOCK, "/mnt");
        r.source = "data-1".into();
        r.fstype = "ext4".into();
        assert_eq!(plan(&r, &root).unwrap().source, "/dev/vdb");
        r.source = "data-2".into();
        assert!(matches!(plan(&r, &root), Err(ProcError::NotFound(_))));
        r.fstype = "nfs".into();
        assert!(matches!(plan(&r, &root), Err(ProcError::Invalid(_))));

        let mut o = req(MountKind::MOUNT_KIND_OVERLAY, "/mnt");
        assert!(matches!(plan(&o, &root), Err(ProcError::Invalid(_))));
        let dir = |name: &str| {
            let d = fake.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            d.display().to_string()
        };
        o.lower = vec![dir("l1"), dir("l2")];
        o.upper = dir("up");
        o.work = dir("work");
        let planned = plan(&o, &root).unwrap();
        assert_eq!(
            planned.data,
            format!(
                "lowerdir={}:{},upperdir={},workdir={}",
                o.lower[0], o.lower[1], o.upper, o.work
            )
        );
        o.lower.push("/no/such/dir".into());
        assert!(matches!(plan(&o, &root), Err(ProcError::NotFound(_))));
        o.lower.pop();
        o.upper = "relative".into();
        assert!(matches!(plan(&o, &root), Err(ProcError::Invalid(_))));
    }
}
