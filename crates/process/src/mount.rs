//! [`Filesystem`]: mounts and directories in the guest.

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::GuestCommunicator;
use vmkit_proto::agent::{MakeDirRequest, MountKind, MountRequest, UnmountRequest};

use crate::error::Result;
use crate::process::Processes;

/// What to mount where: a builder for [`Filesystem::mount`].
///
/// ```
/// use vmkit_process::Mount;
/// let scratch = Mount::tmpfs("/scratch").option("size=64m").option("nosuid").create_target();
/// let data = Mount::disk("data-1", "ext4", "/data").option("ro");
/// let rootfs = Mount::overlay(["/lower"], "/rootfs").upper("/rw/upper", "/rw/work");
/// # let _ = (scratch, data, rootfs);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    req: MountRequest,
}

impl Mount {
    fn of(kind: MountKind, source: &str, target: &str) -> Mount {
        let mut req = MountRequest::new();
        req.kind = kind.into();
        source.clone_into(&mut req.source);
        target.clone_into(&mut req.target);
        Mount { req }
    }

    /// The disk whose serial is `serial` (`DiskConfig`'s serial), holding an `fstype`
    /// filesystem (ext4, xfs, btrfs, vfat, iso9660, squashfs, erofs, ext2, ext3).
    pub fn disk(serial: &str, fstype: &str, target: &str) -> Mount {
        let mut mount = Mount::of(MountKind::MOUNT_KIND_BLOCK, serial, target);
        fstype.clone_into(&mut mount.req.fstype);
        mount
    }

    /// A tmpfs (options size=, mode=, uid=, gid=, nr_inodes=).
    pub fn tmpfs(target: &str) -> Mount {
        Mount::of(MountKind::MOUNT_KIND_TMPFS, "", target)
    }

    /// A read-only overlay of `lower` directories (the first on top); [`Mount::upper`]
    /// makes it writable.
    pub fn overlay<I, S>(lower: I, target: &str) -> Mount
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut mount = Mount::of(MountKind::MOUNT_KIND_OVERLAY, "", target);
        mount.req.lower = lower.into_iter().map(Into::into).collect();
        mount
    }

    /// A directory the host shares with the guest, by its tag (virtio-fs).
    pub fn share(tag: &str, target: &str) -> Mount {
        Mount::of(MountKind::MOUNT_KIND_SHARE, tag, target)
    }

    /// A share over virtio-9p instead of virtio-fs.
    #[must_use]
    pub fn nine_p(mut self) -> Mount {
        "9p".clone_into(&mut self.req.fstype);
        self
    }

    /// An overlay's upper and work directories.
    #[must_use]
    pub fn upper(mut self, upper: &str, work: &str) -> Mount {
        upper.clone_into(&mut self.req.upper);
        work.clone_into(&mut self.req.work);
        self
    }

    /// A mount option: ro, rw, nosuid, nodev, noexec, noatime, relatime, sync, or a
    /// tmpfs option.
    #[must_use]
    pub fn option(mut self, option: &str) -> Mount {
        self.req.options.push(option.to_owned());
        self
    }

    /// Create the target directory (and its parents) when missing.
    #[must_use]
    pub fn create_target(mut self) -> Mount {
        self.req.create_target = true;
        self
    }

    /// Where it is mounted.
    pub fn target(&self) -> &str {
        &self.req.target
    }
}

/// The guest's filesystem calls, through the agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Filesystem {
    service: Processes,
}

impl Filesystem {
    /// The filesystem of the guest behind `guest` (an instance with a guest agent).
    pub fn new(guest: Arc<dyn GuestCommunicator>) -> Filesystem {
        Filesystem {
            service: Processes::new(guest),
        }
    }

    /// Mounts `mount`, within `deadline`.
    ///
    /// # Errors
    /// [`crate::Error::BadRequest`] for a kind, path or option the agent does not allow
    /// (a relative or protected target, an unknown option); [`crate::Error::NotFound`]
    /// for a disk serial or overlay directory that is not there;
    /// [`crate::Error::Refused`] outside a guest (the agent's host test mode);
    /// [`crate::Error::Agent`] when `mount(2)` fails (its reason in the message);
    /// [`crate::Error::Timeout`], [`crate::Error::Guest`].
    pub async fn mount(&self, mount: &Mount, deadline: Duration) -> Result<()> {
        let req = mount.req.clone();
        self.service
            .call(
                &format!("mount at {}", mount.target()),
                deadline,
                |agent, ctx| async move { agent.mount(ctx, &req).await },
            )
            .await
            .map(drop)
    }

    /// Unmounts what is mounted at `target`; `lazy` detaches it even while busy.
    ///
    /// # Errors
    /// [`crate::Error::Refused`] when nothing is mounted there; as [`Filesystem::mount`].
    pub async fn unmount(&self, target: &str, lazy: bool, deadline: Duration) -> Result<()> {
        let mut req = UnmountRequest::new();
        target.clone_into(&mut req.target);
        req.lazy = lazy;
        self.service
            .call(
                &format!("unmount {target}"),
                deadline,
                |agent, ctx| async move { agent.unmount(ctx, &req).await },
            )
            .await
            .map(drop)
    }

    /// Creates the directory `path` and its parents, the last with `mode` (0: 0755).
    ///
    /// # Errors
    /// [`crate::Error::BadRequest`] for a relative path or a bad mode; as
    /// [`Filesystem::mount`].
    pub async fn make_dir(&self, path: &str, mode: u32, deadline: Duration) -> Result<()> {
        let mut req = MakeDirRequest::new();
        path.clone_into(&mut req.path);
        req.mode = mode;
        self.service
            .call(
                &format!("make dir {path}"),
                deadline,
                |agent, ctx| async move { agent.make_dir(ctx, &req).await },
            )
            .await
            .map(drop)
    }
}
