//! A fake guest's kernel state: the files vmkit-agent reads (`proc/meminfo`,
//! `sys/devices/system/cpu/online`, `sys/block/vd*`, …) in a directory, which the agent
//! serves with [`vmkit_agent::start_with_root`]. The fake QEMU writes them as its
//! "guest" boots and as devices are plugged (the guest onlines at once); the fake vsock
//! daemon (`fake_vsock`) runs the agent over them. No real guest runs.
//!
//! Both processes find the directory from the vhost-user socket they share:
//! [`FakeGuest::root_for`].

use std::path::{Path, PathBuf};

/// The memory block size the fake guest reports (x86's 128 MiB).
pub const MEMORY_BLOCK_BYTES: u64 = 128 << 20;

/// The kernel release the fake guest reports.
pub const KERNEL_RELEASE: &str = "6.1.0-vmkit-fake";

/// A disk as the fake guest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// Its name in `/sys/block` (`vda`, …).
    pub name: String,
    /// Its serial (empty when it has none).
    pub serial: String,
    /// Its size in bytes.
    pub size_bytes: u64,
}

/// The fake guest's files under one root.
#[derive(Debug, Clone)]
pub struct FakeGuest {
    root: PathBuf,
}

impl FakeGuest {
    /// The root the fake QEMU and the fake vsock daemon share for the VM whose vhost-user
    /// vsock socket is `vhost_user_socket`: `<state dir>.fake-guest`, beside the state
    /// dir, not in it — what a guest keeps is not the host's, and a check that nothing
    /// is left in the state dir must not find the guest's own sockets there.
    pub fn root_for(vhost_user_socket: &Path) -> PathBuf {
        let state = vhost_user_socket.parent().unwrap_or(Path::new("."));
        let mut name = state
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_else(|| "vm".into());
        name.push(".fake-guest");
        state.parent().unwrap_or(Path::new(".")).join(name)
    }

    /// An empty guest at `root` (a stale one there is removed first).
    ///
    /// # Errors
    /// When the directory cannot be removed or made.
    pub fn create(root: &Path) -> std::io::Result<FakeGuest> {
        match std::fs::remove_dir_all(root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(root)?;
        Ok(FakeGuest {
            root: root.to_owned(),
        })
    }

    /// The guest at `root`, as another process made it.
    pub fn open(root: &Path) -> FakeGuest {
        FakeGuest {
            root: root.to_owned(),
        }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the agent serving this guest puts its sockets (`run/` under the root).
    pub fn agent_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Writes what a booted guest shows: its kernel, `cpus` online, `mem_bytes` of RAM,
    /// and `disks`.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn boot(&self, cpus: &[u32], mem_bytes: u64, disks: &[GuestDisk]) -> std::io::Result<()> {
        self.put("proc/sys/kernel/osrelease", KERNEL_RELEASE)?;
        self.put("proc/sys/kernel/version", "#1 SMP vmkit fake guest")?;
        self.put(
            "sys/devices/system/memory/block_size_bytes",
            &format!("{MEMORY_BLOCK_BYTES:x}"),
        )?;
        self.set_online_cpus(cpus)?;
        self.set_memory(mem_bytes)?;
        for disk in disks {
            self.put_disk(disk)?;
        }
        Ok(())
    }

    /// The CPUs online (`sys/devices/system/cpu/online`).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn set_online_cpus(&self, cpus: &[u32]) -> std::io::Result<()> {
        let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
        self.put("sys/devices/system/cpu/online", &list.join(","))
    }

    /// The memory online: MemTotal, and as many online memory blocks as it fills.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn set_memory(&self, bytes: u64) -> std::io::Result<()> {
        self.put("proc/meminfo", &format!("MemTotal: {} kB", bytes / 1024))?;
        let blocks = bytes / MEMORY_BLOCK_BYTES;
        let dir = self.root.join("sys/devices/system/memory");
        for n in 0.. {
            let block = dir.join(format!("memory{n}"));
            if n < blocks {
                self.put(&format!("sys/devices/system/memory/memory{n}/online"), "1")?;
            } else if block.exists() {
                std::fs::remove_dir_all(block)?;
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Adds (or replaces) a disk.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn put_disk(&self, disk: &GuestDisk) -> std::io::Result<()> {
        let base = format!("sys/block/{}", disk.name);
        self.put(
            &format!("{base}/size"),
            &(disk.size_bytes / 512).to_string(),
        )?;
        self.put(&format!("{base}/ro"), "0")?;
        // The last file the agent looks for: a disk is listed once it is whole.
        self.put(&format!("{base}/serial"), &disk.serial)
    }

    /// Removes a disk.
    ///
    /// # Errors
    /// When its directory cannot be removed.
    pub fn remove_disk(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.root.join("sys/block").join(name))
    }

    /// Shows exactly `names` as virtio devices the guest's virtio-fs driver has bound
    /// and made live (`sys/bus/virtio/drivers/virtiofs/<name>/status`).
    ///
    /// # Errors
    /// When a file cannot be written or a stale one removed.
    pub fn set_fs_devices(&self, names: &[String]) -> std::io::Result<()> {
        let driver = self.root.join("sys/bus/virtio/drivers/virtiofs");
        if let Ok(dir) = std::fs::read_dir(&driver) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !names.contains(&name) {
                    std::fs::remove_dir_all(entry.path())?;
                }
            }
        }
        for name in names {
            // DRIVER_OK and before: a live device.
            self.put(
                &format!("sys/bus/virtio/drivers/virtiofs/{name}/status"),
                "0x0000000f",
            )?;
        }
        Ok(())
    }

    /// Writes `text` to the file `rel` under the root whole: a reader sees the old
    /// content or the new, never a part.
    fn put(&self, rel: &str, text: &str) -> std::io::Result<()> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("vmkit-tmp");
        std::fs::write(&tmp, format!("{text}\n"))?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_booted_guest_has_the_files_the_agent_reads() {
        let dir = tempfile::tempdir().unwrap();
        let guest = FakeGuest::create(&dir.path().join("g")).unwrap();
        let disk = GuestDisk {
            name: "vda".into(),
            serial: "s1".into(),
            size_bytes: 1 << 20,
        };
        guest
            .boot(&[0, 2], 3 * MEMORY_BLOCK_BYTES, &[disk])
            .unwrap();
        let read = |rel: &str| std::fs::read_to_string(guest.root().join(rel)).unwrap();
        assert_eq!(read("sys/devices/system/cpu/online"), "0,2\n");
        assert_eq!(read("proc/meminfo"), "MemTotal: 393216 kB\n");
        assert_eq!(read("sys/block/vda/size"), "2048\n");
        assert!(
            guest
                .root()
                .join("sys/devices/system/memory/memory2")
                .exists()
        );
        // Fewer blocks online when memory goes.
        guest.set_memory(MEMORY_BLOCK_BYTES).unwrap();
        assert!(
            guest
                .root()
                .join("sys/devices/system/memory/memory0")
                .exists()
        );
        assert!(
            !guest
                .root()
                .join("sys/devices/system/memory/memory1")
                .exists()
        );
        guest.remove_disk("vda").unwrap();
        assert!(!guest.root().join("sys/block/vda").exists());
        assert_eq!(
            FakeGuest::root_for(Path::new("/run/vm/vhost-user-vsock.sock")),
            Path::new("/run/vm.fake-guest")
        );
    }
}
