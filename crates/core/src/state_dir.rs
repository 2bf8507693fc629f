//! A VM's state and log dirs on disk, made safe to use whatever the caller's umask and
//! whoever else is on the host: [`prepare_private_dir`] creates or checks a dir that only
//! its owner may enter, [`create_private_file`] opens a file in it without following a
//! planted symbolic link, and [`StateDirLock`] gives a live state dir one owner.
//!
//! - **Dirs** are 0700 and owned by the effective user. A missing dir is created (its
//!   missing parents 0755, not from the umask). An existing one owned by someone else,
//!   writable by group or others, or a symbolic link is refused
//!   ([`Error::UnsafePath`]); one of ours that others may merely enter is tightened to
//!   0700. Every ancestor must be unwritable by others, or sticky like `/tmp` (someone
//!   who can rename entries in a parent can swap the dir for one of theirs).
//! - **Files** are opened with `O_NOFOLLOW` and mode 0600, and set to 0600 even when they
//!   existed: a symlink at the name fails the open instead of truncating its target.
//! - **The lock** is an exclusive `flock` on `<state_dir>/vmkit.lock`, held from the start
//!   until the VM is gone and released by the kernel when the owner dies, so a dead
//!   owner's dir is taken over at once. The file names its holder, for the error a
//!   second user gets ([`Error::InUse`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The name of the lock file inside a state dir.
pub const LOCK_FILE: &str = "vmkit.lock";

/// Mode bits that let group or others write.
const GROUP_OR_OTHER_WRITE: u32 = 0o022;
/// The sticky bit: in such a dir only an entry's owner may rename or remove it.
const STICKY: u32 = 0o1000;

/// This process's effective uid: the owner every private dir and file must have.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn unsafe_path(op: &str, path: &Path, reason: impl Into<String>) -> Error {
    Error::UnsafePath {
        op: op.to_owned(),
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Creates `dir` (0700) or checks an existing one, as the module describes.
///
/// # Errors
/// [`Error::UnsafePath`] for a dir or ancestor others control; [`Error::Io`] when it
/// cannot be created or read.
pub fn prepare_private_dir(op: &str, dir: &Path) -> Result<()> {
    let me = euid();
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => check_own_dir(op, dir, &meta, me)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_dirs(op, dir)?,
        Err(e) => return Err(Error::io(format!("{op}: inspect {}", dir.display()), e)),
    }
    let canonical = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("{op}: resolve {}", dir.display()), e))?;
    for ancestor in canonical.ancestors().skip(1) {
        check_ancestor(op, ancestor, me)?;
    }
    // Ours, and nobody else's to enter: tighten whatever mode it had (umask, an older
    // vmkit, the caller's mkdir) to 0700.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("{op}: chmod 0700 {}", dir.display()), e))
}

fn check_own_dir(op: &str, dir: &Path, meta: &std::fs::Metadata, me: u32) -> Result<()> {
    if meta.file_type().is_symlink() {
        return Err(unsafe_path(
            op,
            dir,
            "it is a symbolic link; name the real directory",
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_path(op, dir, "it exists and is not a directory"));
    }
    if meta.uid() != me {
        return Err(unsafe_path(
            op,
            dir,
            format!(
                "it is owned by uid {}, not by this process's uid {me}",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & GROUP_OR_OTHER_WRITE != 0 {
        return Err(unsafe_path(
            op,
            dir,
            format!(
                "it is writable by group or others (mode {:o}); vmkit uses only dirs \
                 that no one else can write",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

fn check_ancestor(op: &str, ancestor: &Path, me: u32) -> Result<()> {
    let meta = std::fs::metadata(ancestor)
        .map_err(|e| Error::io(format!("{op}: inspect {}", ancestor.display()), e))?;
    let owner_ok = meta.uid() == me || meta.uid() == 0;
    let writable_by_others = meta.mode() & GROUP_OR_OTHER_WRITE != 0;
    let sticky = meta.mode() & STICKY != 0;
    if !owner_ok {
        return Err(unsafe_path(
            op,
            ancestor,
            format!(
                "this ancestor is owned by uid {}, who could swap the dir below it",
                meta.uid()
            ),
        ));
    }
    if writable_by_others && !sticky {
        return Err(unsafe_path(
            op,
            ancestor,
            format!(
                "this ancestor is writable by group or others without the sticky bit \
                 (mode {:o}), so they could swap the dir below it",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Creates `dir` 0700 and its missing parents 0755, whatever the umask.
fn create_dirs(op: &str, dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while std::fs::symlink_metadata(at).is_err() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for (i, path) in missing.iter().rev().enumerate() {
        let mode = if i + 1 == missing.len() { 0o700 } else { 0o755 };
        match std::fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            // Another thread or process made it first: it is checked below.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("{op}: create {}", path.display()), e)),
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("{op}: chmod {mode:o} {}", path.display()), e))?;
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("{op}: inspect {}", dir.display()), e))?;
    check_own_dir(op, dir, &meta, euid())
}

/// Opens `path` for writing, created 0600 and truncated, never through a symbolic
/// link (`O_NOFOLLOW`: a link at the name fails with `ELOOP`). An existing file's mode
/// is set to 0600 too.
///
/// # Errors
/// The OS error, `ELOOP` for a symlink.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Opens `path` for reading and writing, created 0600 if missing, never truncated and
/// never through a symbolic link (`O_NOFOLLOW`): how lock files are opened, here and in
/// the CID allocator.
///
/// # Errors
/// The OS error, `ELOOP` for a symlink.
pub fn open_private_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// The exclusive hold on a state dir. Dropping it removes the lock file and releases
/// the lock; the kernel releases it too when the holder dies.
#[derive(Debug)]
pub struct StateDirLock {
    file: File,
    path: PathBuf,
}

impl StateDirLock {
    /// Locks `state_dir` (which [`prepare_private_dir`] made safe) for `holder` (a short
    /// description such as `vm "a"`; the pid is added).
    ///
    /// # Errors
    /// [`Error::InUse`] naming the dir and its holder when a live owner has it;
    /// [`Error::Io`] when the lock file cannot be opened.
    pub fn acquire(op: &str, state_dir: &Path, holder: &str) -> Result<StateDirLock> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |what: &str, e| Error::io(format!("{op}: {what} {}", path.display()), e);
        loop {
            let mut file = open_private_rw(&path).map_err(|e| io_err("open", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut who = String::new();
                    let _ = file.read_to_string(&mut who);
                    let who = who.trim();
                    return Err(Error::InUse {
                        op: op.to_owned(),
                        resource: format!("state dir {}", state_dir.display()),
                        holder: if who.is_empty() {
                            "another instance".to_owned()
                        } else {
                            who.to_owned()
                        },
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io_err("lock", e)),
            }
            // A holder that was releasing may have unlinked the file between our open
            // and our lock: then we hold a lock on a file nobody else will open. Only
            // the file still at the path counts.
            let held = file.metadata().map_err(|e| io_err("inspect", e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("inspect", e)),
            }
            file.set_len(0).map_err(|e| io_err("write", e))?;
            file.rewind().map_err(|e| io_err("write", e))?;
            writeln!(file, "pid {} ({holder})", std::process::id())
                .map_err(|e| io_err("write", e))?;
            return Ok(StateDirLock { file, path });
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateDirLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock: a waiter that opened the old file sees it
        // gone after its lock succeeds and starts over (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_dir_is_private_and_its_parents_are_not_the_umasks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        // A careless embedder's umask: nothing masked.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let made = prepare_private_dir("start", &dir);
        nix::sys::stat::umask(old);
        made.unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o755);
        assert_eq!(mode(&tmp.path().join("a/b")), 0o755);
    }

    #[test]
    fn an_existing_own_dir_is_tightened_and_an_open_one_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_private_dir("start", &dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_private_dir("start", &dir).unwrap_err();
        assert!(matches!(err, Error::UnsafePath { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "start: {} is unsafe: it is writable by group or others (mode 777); vmkit \
                 uses only dirs that no one else can write",
                dir.display()
            )
        );
        assert_eq!(mode(&dir), 0o777, "a refused dir is left as it was");
    }

    #[test]
    fn a_symlinked_dir_and_an_open_ancestor_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = prepare_private_dir("start", &link).unwrap_err().to_string();
        assert!(
            err.ends_with("is unsafe: it is a symbolic link; name the real directory"),
            "{err}"
        );

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_private_dir("start", &open.join("state"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("this ancestor is writable by group or others without the sticky bit"),
            "{err}"
        );
        // Sticky, like /tmp: others cannot rename what is ours in it.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_private_dir("start", &open.join("state2")).unwrap();
    }

    #[test]
    fn files_are_private_and_never_opened_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = tmp.path().join("vmm.log");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = create_private_file(&planted).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ELOOP), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        let log = tmp.path().join("console.log");
        std::fs::write(&log, b"old").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut f = create_private_file(&log).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"new");
        assert_eq!(mode(&log), 0o600);
    }

    #[test]
    fn a_live_state_dir_has_one_owner_and_a_released_one_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let first = StateDirLock::acquire("start", tmp.path(), "vm \"a\"").unwrap();
        assert_eq!(mode(first.path()), 0o600);
        let err = StateDirLock::acquire("start", tmp.path(), "vm \"b\"").unwrap_err();
        assert!(matches!(err, Error::InUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "start: state dir {} is in use by pid {} (vm \"a\")",
                tmp.path().display(),
                std::process::id()
            )
        );
        drop(first);
        assert!(
            !tmp.path().join(LOCK_FILE).exists(),
            "the lock file is removed"
        );
        let second = StateDirLock::acquire("start", tmp.path(), "vm \"b\"").unwrap();
        drop(second);
    }

    #[test]
    fn a_stale_lock_file_of_a_dead_owner_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(LOCK_FILE), b"pid 999999 (vm \"gone\")\n").unwrap();
        let lock = StateDirLock::acquire("start", tmp.path(), "vm \"new\"").unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text, format!("pid {} (vm \"new\")\n", std::process::id()));
    }
}
