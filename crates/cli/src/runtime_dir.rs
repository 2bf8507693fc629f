//! Where detached VMs are registered: one private directory per user, one entry (a
//! directory named for the VM) per VM. An entry holds what its supervisor needs and
//! leaves: the launch description, the control socket, the supervisor's lock (held as
//! long as it lives), the exit record, the supervisor's log and the VM's own state dir.
//!
//! Nothing in an entry is trusted because it is there: a supervisor is alive only while
//! it holds the entry's lock, and an entry whose supervisor died without an exit record
//! is stale and removed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// Longest VM name: keeps every socket path in the entry under the Unix limit.
pub(crate) const MAX_NAME_LEN: usize = 32;

/// How long a new entry may have no supervisor before it counts as stale.
const LAUNCH_GRACE: Duration = Duration::from_secs(10);

/// The per-user runtime dir.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeDir {
    root: PathBuf,
}

impl RuntimeDir {
    /// `explicit`, else `$XDG_RUNTIME_DIR/vmkit`, else `/run/vmkit` for root, else
    /// `/tmp/vmkit-<uid>`; created 0700, refused when someone else could write it.
    pub(crate) fn open(explicit: Option<&Path>) -> Result<RuntimeDir> {
        let root = match explicit {
            Some(dir) => dir.to_owned(),
            None => default_root(),
        };
        if !root.is_absolute() {
            return Err(Error::BadArgument(format!(
                "runtime dir {}: must be an absolute path",
                root.display()
            )));
        }
        vmkit_core::state_dir::prepare_private_dir("runtime dir", &root)
            .map_err(|e| Error::vm("open the runtime dir", e))?;
        Ok(RuntimeDir { root })
    }

    /// The entry for `name` (which may not exist yet); the name is checked first.
    pub(crate) fn entry(&self, name: &str) -> Result<Entry> {
        check_name(name)?;
        Ok(Entry {
            name: name.to_owned(),
            dir: self.root.join(name),
        })
    }

    /// Every entry, by name; dot-files and anything that is not a VM name are skipped.
    pub(crate) fn entries(&self) -> Result<Vec<Entry>> {
        let read = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("list {}", self.root.display()), e))?;
        let mut entries: Vec<Entry> = read
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| check_name(name).is_ok())
            .map(|name| Entry {
                dir: self.root.join(&name),
                name,
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// A private scratch dir for a foreground VM (not an entry: `ps` never sees it).
    pub(crate) fn scratch(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        let dir = self
            .root
            .join(format!(".run-{name}-{}", std::process::id()));
        vmkit_core::state_dir::prepare_private_dir("foreground VM", &dir)
            .map_err(|e| Error::vm("create the VM's dir", e))?;
        Ok(dir)
    }
}

fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("vmkit");
    }
    let uid = vmkit_core::state_dir::euid();
    if uid == 0 {
        PathBuf::from("/run/vmkit")
    } else {
        std::env::temp_dir().join(format!("vmkit-{uid}"))
    }
}

/// A VM name: what vmkit-core takes as an id, at most [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME_LEN {
        return Err(Error::BadArgument(format!(
            "VM name {name:?} is {} bytes; at most {MAX_NAME_LEN}",
            name.len()
        )));
    }
    vmkit_core::validate::check_id("name", name).map_err(|_| {
        Error::BadArgument(format!(
            "VM name {name:?}: must start with a letter and hold only letters, digits, '-', '.' and '_'"
        ))
    })
}

/// What an entry says about its VM's supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The supervisor holds the lock: ask it.
    Alive,
    /// Just launched; the supervisor has not taken the lock yet.
    Launching,
    /// The VM ended and its supervisor left the exit record.
    Exited,
    /// The supervisor is gone without a record: nothing here can be trusted.
    Stale,
}

/// One VM's entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    name: String,
    dir: PathBuf,
}

impl Entry {
    /// The VM's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The entry's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the entry exists.
    pub(crate) fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// The launch description (`launch.json`).
    pub(crate) fn launch_file(&self) -> PathBuf {
        self.dir.join("launch.json")
    }

    /// The supervisor's control socket.
    pub(crate) fn control_socket(&self) -> PathBuf {
        self.dir.join("vmkit.sock")
    }

    /// The lock the supervisor holds while it lives.
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }

    /// The exit record the supervisor leaves when the VM ends.
    pub(crate) fn exit_file(&self) -> PathBuf {
        self.dir.join("exit.json")
    }

    /// The supervisor's own log (its stderr).
    pub(crate) fn supervisor_log(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }

    /// The VM's state dir (vmkit-core's `state_dir`).
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.join("vm")
    }

    /// Creates the entry (0700); a live or exited entry of the same name is refused, a
    /// stale one is removed first.
    pub(crate) fn create(&self) -> Result<()> {
        if self.exists() {
            match self.liveness() {
                Liveness::Stale => self.remove()?,
                _ => return Err(Error::VmExists(self.name.clone())),
            }
        }
        std::fs::create_dir(&self.dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::VmExists(self.name.clone())
            } else {
                Error::io(format!("create {}", self.dir.display()), e)
            }
        })?;
        vmkit_core::state_dir::prepare_private_dir("create the VM's entry", &self.dir)
            .map_err(|e| Error::vm("create the VM's entry", e))
    }

    /// Whether the supervisor lives, as its lock and exit record say.
    pub(crate) fn liveness(&self) -> Liveness {
        if let Ok(file) = File::open(self.lock_file()) {
            match file.try_lock() {
                Err(std::fs::TryLockError::WouldBlock) => return Liveness::Alive,
                Ok(()) | Err(std::fs::TryLockError::Error(_)) => {}
            }
        }
        if self.exit_file().is_file() {
            return Liveness::Exited;
        }
        let young = std::fs::metadata(self.launch_file())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| SystemTime::now().duration_since(at).ok())
            .is_some_and(|age| age < LAUNCH_GRACE);
        if young && !self.lock_file().exists() {
            Liveness::Launching
        } else {
            Liveness::Stale
        }
    }

    /// Takes the supervisor's lock; held until the returned file is dropped (or the
    /// process dies).
    pub(crate) fn lock(&self) -> Result<File> {
        let path = self.lock_file();
        let file = vmkit_core::state_dir::create_private_file(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        file.try_lock().map_err(|e| {
            Error::io(
                format!("lock {}", path.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(file)
    }

    /// Removes the entry and everything in it.
    pub(crate) fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", self.dir.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_that_could_leave_the_dir_or_break_a_socket_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "1abc", "a b", &"a".repeat(33)] {
            assert!(
                matches!(check_name(bad), Err(Error::BadArgument(_))),
                "{bad:?}"
            );
        }
        for good in ["a", "web-1", "A.b_c", &"a".repeat(32)] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn an_entry_is_alive_while_locked_exited_with_a_record_and_else_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::open(Some(&tmp.path().join("rt"))).unwrap();
        let entry = dir.entry("vm1").unwrap();
        entry.create().unwrap();
        std::fs::write(entry.launch_file(), "{}").unwrap();
        assert_eq!(entry.liveness(), Liveness::Launching);
        let lock = entry.lock().unwrap();
        assert_eq!(entry.liveness(), Liveness::Alive);
        assert!(matches!(entry.create(), Err(Error::VmExists(_))));
        drop(lock);
        assert_eq!(entry.liveness(), Liveness::Stale);
        std::fs::write(entry.exit_file(), "{}").unwrap();
        assert_eq!(entry.liveness(), Liveness::Exited);
        std::fs::remove_file(entry.exit_file()).unwrap();
        // A stale entry is replaced, not trusted.
        entry.create().unwrap();
        assert!(!entry.launch_file().exists());
        assert_eq!(
            dir.entries()
                .unwrap()
                .iter()
                .map(Entry::name)
                .collect::<Vec<_>>(),
            ["vm1"]
        );
    }
}
