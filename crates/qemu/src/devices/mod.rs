//! One table of a VM's devices, cold and hot, by id ([`DeviceTable`]): the one place
//! that answers "what does this VM have". The command line reads its cold devices
//! ([`ColdDevices`]); `add_device` and the hot-plug operations write it, each through
//! one method. Each kind's mapping to QEMU objects is in its own file.

mod disk;
mod nic;
mod share;

use std::sync::{Arc, Mutex};

use vmkit_core::{
    DeviceInfo, DeviceSpec, DeviceState, DiskConfig, Error as CoreError, HostFd, NicConfig,
    ShareConfig,
};

use crate::fs_daemon::FsDaemon;
use crate::locks::lock;

pub(crate) use disk::{disk_args, disk_json};
pub(crate) use nic::nic_args;
pub use nic::stable_mac;
pub(crate) use share::{
    cold_name as cold_share_name, nine_p_args, virtio_fs_args, virtio_fs_device, virtiofsd_launch,
    virtiofsd_socket,
};

/// The id prefix of the PCIe root ports reserved for hot-plug (`vmkit-rp0`, …).
pub(crate) const ROOT_PORT_PREFIX: &str = "vmkit-rp";

/// The devices a VM boots with, as the command line takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColdDevices {
    /// Disks, in the order added (the guest sees them as vda, vdb, … in this order).
    pub disks: Vec<DiskConfig>,
    /// NICs, in the order added.
    pub nics: Vec<NicConfig>,
    /// Shares, in the order added, each with its transport decided (never `Auto`).
    pub shares: Vec<ShareConfig>,
}

/// The QEMU backend object of a hot-plugged device, removed after the device.
#[derive(Debug, Clone)]
pub(crate) enum HotBackend {
    /// A disk's block node.
    Block(String),
    /// A NIC's netdev, and its TAP (closed on unplug, so a TAP vmkit created goes
    /// with it).
    Net {
        netdev: String,
        /// Held for its drop: closing it removes a TAP vmkit created.
        _tap: HostFd,
    },
    /// A virtio-fs share's chardev to its virtiofsd (the daemon is the entry's).
    Chardev(String),
}

impl HotBackend {
    /// The node, netdev or chardev name.
    pub(crate) fn name(&self) -> &str {
        match self {
            HotBackend::Block(n) | HotBackend::Net { netdev: n, .. } | HotBackend::Chardev(n) => n,
        }
    }
}

/// Where a hot-plugged device sits and what backs it.
#[derive(Debug, Clone)]
pub(crate) struct HotPlace {
    /// The reserved root port.
    pub(crate) port: String,
    /// Its backend object's name (block node, netdev), taken when reserved.
    pub(crate) name: String,
    /// Its backend object, once created.
    pub(crate) backend: Option<HotBackend>,
}

/// One device.
#[derive(Debug)]
struct Entry {
    spec: DeviceSpec,
    /// `None` for a cold device.
    hot: Option<HotPlace>,
    state: DeviceState,
    /// The daemon serving it (a virtio-fs share's virtiofsd) while the VM runs.
    daemon: Option<FsDaemon>,
}

/// What leaves the table when a hot-plugged device is removed.
#[derive(Debug)]
pub(crate) struct Removed {
    /// Where it sat and what backed it.
    pub(crate) place: Option<HotPlace>,
    /// Its daemon, to stop.
    pub(crate) daemon: Option<FsDaemon>,
}

/// Every device of one VM, in the order added.
#[derive(Debug, Default)]
pub(crate) struct DeviceTable {
    entries: Mutex<Vec<Entry>>,
    /// Shares may go over virtio-fs (see `Features::virtio_fs`).
    virtio_fs: bool,
}

impl DeviceTable {
    /// An empty table; `virtio_fs`: this VM can run virtiofsd for its shares.
    pub(crate) fn new(virtio_fs: bool) -> Self {
        DeviceTable {
            entries: Mutex::default(),
            virtio_fs,
        }
    }

    /// Decides the transport of `share` (see [`share::resolve`]).
    ///
    /// # Errors
    /// As `share::resolve`.
    pub(crate) fn resolve_share(
        &self,
        op: &str,
        share: ShareConfig,
    ) -> vmkit_core::Result<ShareConfig> {
        share::resolve(op, share, self.virtio_fs)
    }

    /// Adds a cold device after `allowed` (the state check, run under the table's lock
    /// so a start cannot take the cold devices in between), the kind's validation (as
    /// `disks[<n>]` / `nics[<n>]`) and a free id.
    ///
    /// # Errors
    /// `allowed`'s error; `InvalidConfig` naming the field; `Unsupported` for a kind
    /// this backend does not take yet.
    pub(crate) fn add_cold(
        &self,
        spec: DeviceSpec,
        allowed: impl FnOnce() -> vmkit_core::Result<()>,
    ) -> vmkit_core::Result<()> {
        let mut spec = spec;
        let mut entries = lock(&self.entries);
        allowed()?;
        let same_kind = entries
            .iter()
            .filter(|e| e.spec.kind() == spec.kind())
            .count();
        let field = match &mut spec {
            DeviceSpec::Disk(disk) => {
                let field = format!("disks[{same_kind}]");
                disk.validate(&field)?;
                disk::utf8_path(&format!("{field}.path"), &disk.path)?;
                field
            }
            DeviceSpec::Nic(nic) => {
                let field = format!("nics[{same_kind}]");
                nic.validate(&field)?;
                field
            }
            DeviceSpec::Share(share) => {
                let field = format!("shares[{same_kind}]");
                share.validate(&field)?;
                disk::utf8_path(&format!("{field}.path"), &share.path)?;
                *share = self.resolve_share("add_device", share.clone())?;
                field
            }
            other => {
                return Err(CoreError::unsupported(
                    "add_device",
                    crate::BACKEND_NAME,
                    format!("a {} is not a device this backend takes", other.kind()),
                ));
            }
        };
        if let Some(taken) = entries.iter().find(|e| e.spec.id() == spec.id()) {
            return Err(CoreError::config(
                format!("{field}.id"),
                format!(
                    "duplicate device id {:?} (a {} has it; all devices share one id space)",
                    spec.id(),
                    taken.spec.kind()
                ),
            ));
        }
        entries.push(Entry {
            spec,
            hot: None,
            state: DeviceState::Attached,
            daemon: None,
        });
        Ok(())
    }

    /// Gives device `id` its daemon (a cold share's, at start).
    pub(crate) fn set_daemon(&self, id: &str, daemon: FsDaemon) {
        if let Some(e) = lock(&self.entries).iter_mut().find(|e| e.spec.id() == id) {
            e.daemon = Some(daemon);
        }
    }

    /// Takes every daemon out (the VM ended), for the caller to stop.
    pub(crate) fn take_daemons(&self) -> Vec<FsDaemon> {
        lock(&self.entries)
            .iter_mut()
            .filter_map(|e| e.daemon.take())
            .collect()
    }

    /// The daemon pid of device `id`, if it has a daemon running.
    pub(crate) fn daemon_pid(&self, id: &str) -> Option<u32> {
        lock(&self.entries)
            .iter()
            .find(|e| e.spec.id() == id)
            .and_then(|e| e.daemon.as_ref().map(FsDaemon::pid))
    }

    /// The cold devices, for the command line.
    pub(crate) fn cold(&self) -> ColdDevices {
        let mut cold = ColdDevices::default();
        for entry in lock(&self.entries).iter().filter(|e| e.hot.is_none()) {
            match &entry.spec {
                DeviceSpec::Disk(d) => cold.disks.push(d.clone()),
                DeviceSpec::Nic(n) => cold.nics.push(n.clone()),
                DeviceSpec::Share(s) => cold.shares.push(s.clone()),
                _ => {}
            }
        }
        cold
    }

    /// Every device, as `devices()` lists it.
    pub(crate) fn list(&self) -> Vec<DeviceInfo> {
        lock(&self.entries)
            .iter()
            .map(|e| DeviceInfo {
                spec: e.spec.clone(),
                hot: e.hot.is_some(),
                state: e.state,
            })
            .collect()
    }

    /// How many devices are hot-plugged (or being plugged or unplugged).
    #[cfg(test)]
    pub(crate) fn hot_count(&self) -> usize {
        lock(&self.entries)
            .iter()
            .filter(|e| e.hot.is_some())
            .count()
    }

    /// Reserves a root port (of `ports` named `<prefix><n>`) and a backend name
    /// `<name_prefix><n>` for hot-plugging `spec`: the device is listed as `Plugging`
    /// until [`Reservation::attached`], and gone again if the reservation is dropped.
    ///
    /// # Errors
    /// `BadArgument` when the id is taken; `Exhausted` when every port is.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        op: &str,
        spec: DeviceSpec,
        ports: u32,
        name_prefix: &str,
    ) -> vmkit_core::Result<Reservation> {
        let mut entries = lock(&self.entries);
        let id = spec.id().to_owned();
        if let Some(taken) = entries.iter().find(|e| e.spec.id() == id) {
            let when = if taken.hot.is_some() {
                "already hot-plugged"
            } else {
                "a cold-plugged device has it"
            };
            return Err(CoreError::bad_argument(
                op,
                "id",
                format!("duplicate device id {id:?} ({when})"),
            ));
        }
        let places: Vec<&HotPlace> = entries.iter().filter_map(|e| e.hot.as_ref()).collect();
        let port = (0..ports)
            .map(|i| format!("{ROOT_PORT_PREFIX}{i}"))
            .find(|p| places.iter().all(|h| &h.port != p))
            .ok_or_else(|| {
                CoreError::exhausted(
                    op,
                    "hot-plug port",
                    format!(
                        "all {ports} hot-plug root ports are in use (backend_options.hotplug_ports)"
                    ),
                )
            })?;
        let name = free_name(name_prefix, places.iter().map(|h| h.name.as_str()));
        let place = HotPlace {
            port,
            name,
            backend: None,
        };
        entries.push(Entry {
            spec,
            hot: Some(place.clone()),
            state: DeviceState::Plugging,
            daemon: None,
        });
        Ok(Reservation {
            table: Arc::clone(self),
            id,
            place,
            kept: false,
        })
    }

    /// Marks the hot-plugged device `id` as being unplugged and returns where it sits.
    ///
    /// # Errors
    /// `NotFound` when no attached hot-plugged device has that id.
    pub(crate) fn begin_unplug(&self, op: &str, id: &str) -> vmkit_core::Result<HotPlace> {
        let mut entries = lock(&self.entries);
        let entry = entries.iter_mut().find(|e| e.spec.id() == id);
        match entry {
            Some(Entry {
                hot: Some(place),
                state,
                ..
            }) if *state == DeviceState::Attached => {
                *state = DeviceState::Unplugging;
                Ok(place.clone())
            }
            Some(Entry { hot: None, .. }) => Err(CoreError::not_found(
                op,
                "a cold-plugged device stays for the VM's life; only hot-plugged ones unplug",
            )),
            _ => Err(CoreError::not_found(
                op,
                "no hot-plugged device with that id (cold-plugged devices stay for the VM's life)",
            )),
        }
    }

    /// An unplug of `id` failed: the device is attached still.
    pub(crate) fn unplug_failed(&self, id: &str) {
        self.set_state(id, DeviceState::Attached);
    }

    /// The device `id` is gone: its entry is removed, and what backed it returned
    /// (dropping it closes a NIC's TAP, kills a share's daemon).
    pub(crate) fn remove(&self, id: &str) -> Option<Removed> {
        let mut entries = lock(&self.entries);
        let at = entries.iter().position(|e| e.spec.id() == id)?;
        let entry = entries.remove(at);
        Some(Removed {
            place: entry.hot,
            daemon: entry.daemon,
        })
    }

    fn set_state(&self, id: &str, state: DeviceState) {
        if let Some(e) = lock(&self.entries).iter_mut().find(|e| e.spec.id() == id) {
            e.state = state;
        }
    }
}

/// A hot-plug in progress: its device is listed as `Plugging` and its port and name
/// are taken. Dropped without [`Reservation::attached`], the device leaves the table.
pub(crate) struct Reservation {
    table: Arc<DeviceTable>,
    id: String,
    place: HotPlace,
    kept: bool,
}

impl Reservation {
    /// The reserved root port.
    pub(crate) fn port(&self) -> &str {
        &self.place.port
    }

    /// The reserved backend object name.
    pub(crate) fn name(&self) -> &str {
        &self.place.name
    }

    /// QEMU took the device, backed by `backend` (and served by `daemon`): it is
    /// `Attached`.
    pub(crate) fn attached(mut self, backend: HotBackend, daemon: Option<FsDaemon>) {
        let mut entries = lock(&self.table.entries);
        if let Some(e) = entries.iter_mut().find(|e| e.spec.id() == self.id) {
            e.state = DeviceState::Attached;
            e.daemon = daemon;
            if let Some(place) = e.hot.as_mut() {
                place.backend = Some(backend);
            }
        }
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.kept {
            self.table.remove(&self.id);
        }
    }
}

/// The lowest free `<prefix><n>` among `taken`.
pub(crate) fn free_name<'a>(prefix: &str, taken: impl Iterator<Item = &'a str> + Clone) -> String {
    (0u32..)
        .map(|n| format!("{prefix}{n}"))
        .find(|candidate| taken.clone().all(|t| t != candidate))
        // `u32` runs out only after 4 billion names are taken.
        .unwrap_or_else(|| format!("{prefix}x"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::ShareVia;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a,b=c.img");
        std::fs::write(&path, b"").unwrap();
        (dir, path)
    }

    fn ok() -> vmkit_core::Result<()> {
        Ok(())
    }

    #[test]
    fn ids_are_unique_across_every_kind() {
        let (_dir, path) = image();
        let table = DeviceTable::default();
        table
            .add_cold(DiskConfig::new("d0", &path).into(), ok)
            .unwrap();
        let err = table
            .add_cold(NicConfig::tap("d0", "tap0", None).into(), ok)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: nics[0].id: duplicate device id \"d0\" (a disk has it; all devices share one id space)"
        );
        assert_eq!(table.cold().nics.len(), 0, "a refused NIC is not added");
        assert_eq!(table.list().len(), 1);
    }

    #[test]
    fn a_missing_image_is_refused_when_added() {
        let table = DeviceTable::default();
        let err = table
            .add_cold(DiskConfig::new("d0", "/nonexistent/disk.img").into(), ok)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: disks[0].path: /nonexistent/disk.img: No such file"),
            "{err}"
        );
        assert!(table.cold().disks.is_empty());
    }

    #[test]
    fn the_state_check_comes_first_and_a_share_gets_its_transport() {
        let (dir, path) = image();
        let table = DeviceTable::default();
        let refused = table.add_cold(DiskConfig::new("d0", &path).into(), || {
            Err(CoreError::config("state", "not now"))
        });
        assert!(refused.unwrap_err().to_string().contains("not now"));
        assert!(table.list().is_empty());
        // A share's transport is decided when it is added: 9p without virtiofsd.
        let share = ShareConfig::new("s0", "tag", dir.path());
        table.add_cold(share.into(), ok).unwrap();
        let cold = table.cold();
        assert_eq!(cold.shares[0].via, ShareVia::NineP);
        let asked = ShareConfig {
            via: ShareVia::VirtioFs,
            ..ShareConfig::new("s1", "tag1", dir.path())
        };
        let err = table.add_cold(asked.into(), ok).unwrap_err();
        assert!(matches!(err, CoreError::Unsupported { .. }), "{err}");
        assert_eq!(table.list().len(), 1);
    }

    #[test]
    fn a_reservation_lists_the_device_as_plugging_until_attached_or_dropped() {
        let (_dir, path) = image();
        let table = Arc::new(DeviceTable::default());
        table
            .add_cold(DiskConfig::new("cold", &path).into(), ok)
            .unwrap();
        let dup = table.reserve("op", DiskConfig::new("cold", &path).into(), 2, "n");
        assert!(matches!(dup, Err(CoreError::BadArgument { .. })));
        let first = table
            .reserve("op", DiskConfig::new("h0", &path).into(), 2, "node")
            .unwrap();
        assert_eq!((first.port(), first.name()), ("vmkit-rp0", "node0"));
        assert_eq!(table.list()[1].state, DeviceState::Plugging);
        let second = table
            .reserve("op", DiskConfig::new("h1", &path).into(), 2, "node")
            .unwrap();
        assert_eq!((second.port(), second.name()), ("vmkit-rp1", "node1"));
        let full = table.reserve("op", DiskConfig::new("h2", &path).into(), 2, "node");
        assert!(matches!(full, Err(CoreError::Exhausted { .. })));
        drop(second);
        first.attached(HotBackend::Block("node0".into()), None);
        let listed = table.list();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!((listed[1].id(), listed[1].hot), ("h0", true));
        assert_eq!(listed[1].state, DeviceState::Attached);
        assert!(matches!(
            table.begin_unplug("unplug cold", "cold"),
            Err(CoreError::NotFound { .. })
        ));
        let place = table.begin_unplug("unplug h0", "h0").unwrap();
        assert_eq!(place.backend.unwrap().name(), "node0");
        assert_eq!(table.list()[1].state, DeviceState::Unplugging);
        assert!(
            table.begin_unplug("again", "h0").is_err(),
            "one unplug at a time"
        );
        table.unplug_failed("h0");
        assert_eq!(table.list()[1].state, DeviceState::Attached);
        assert!(table.remove("h0").is_some());
        assert_eq!(table.hot_count(), 0);
    }
}
