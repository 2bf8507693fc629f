//! [`DeviceSpec`]: every device kind as data — what `add_device` and `hotplug_device`
//! take and what crosses the plugin wire as it is — and [`DeviceInfo`], one entry of
//! `devices()`.
//!
//! A new device kind is a new variant here plus a backend's mapping; the contract, the
//! plugin wire, the mocks and the conformance suite carry it unchanged.

use serde::{Deserialize, Serialize};

use crate::devices::{DiskConfig, NicConfig};
use crate::error::Result;
use crate::info::Capabilities;
use crate::share::ShareConfig;

/// A device of any kind, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeviceSpec {
    /// A virtio block device.
    Disk(DiskConfig),
    /// A virtio NIC.
    Nic(NicConfig),
    /// A directory shared with the guest.
    Share(ShareConfig),
}

impl DeviceSpec {
    /// The device's id.
    pub fn id(&self) -> &str {
        match self {
            DeviceSpec::Disk(d) => &d.id,
            DeviceSpec::Nic(n) => &n.id,
            DeviceSpec::Share(s) => &s.id,
        }
    }

    /// The kind's name: `disk`, `nic`, `share`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Disk(_) => "disk",
            DeviceSpec::Nic(_) => "nic",
            DeviceSpec::Share(_) => "share",
        }
    }

    /// The name of this kind's hot-plug (`hotplug_disk`, `hotplug_nic`,
    /// `hotplug_share`), which `InvalidState` and `Unsupported` errors of
    /// `hotplug_device` give as their operation.
    pub fn hotplug_op(&self) -> &'static str {
        match self {
            DeviceSpec::Disk(_) => "hotplug_disk",
            DeviceSpec::Nic(_) => "hotplug_nic",
            DeviceSpec::Share(_) => "hotplug_share",
        }
    }

    /// Every kind's [`Self::hotplug_op`], for mapping an operation's name back (the
    /// plugin wire does).
    pub const HOTPLUG_OPS: &'static [&'static str] =
        &["hotplug_disk", "hotplug_nic", "hotplug_share"];

    /// The capability a backend reports when it can hot-plug this kind
    /// (for a share, [`Capabilities::FS_SHARE`]: its transport may still be cold only).
    pub fn hotplug_capability(&self) -> Capabilities {
        match self {
            DeviceSpec::Disk(_) => Capabilities::DISK_HOTPLUG,
            DeviceSpec::Nic(_) => Capabilities::NIC_HOTPLUG,
            DeviceSpec::Share(_) => Capabilities::FS_SHARE,
        }
    }

    /// Checks the device; `field` is its place in the config.
    ///
    /// # Errors
    /// The kind's own validation error.
    pub fn validate(&self, field: &str) -> Result<()> {
        match self {
            DeviceSpec::Disk(d) => d.validate(field),
            DeviceSpec::Nic(n) => n.validate(field),
            DeviceSpec::Share(s) => s.validate(field),
        }
    }
}

impl From<DiskConfig> for DeviceSpec {
    fn from(disk: DiskConfig) -> Self {
        DeviceSpec::Disk(disk)
    }
}

impl From<NicConfig> for DeviceSpec {
    fn from(nic: NicConfig) -> Self {
        DeviceSpec::Nic(nic)
    }
}

impl From<ShareConfig> for DeviceSpec {
    fn from(share: ShareConfig) -> Self {
        DeviceSpec::Share(share)
    }
}

/// Where a device is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Present: added before start, or plugged and seen.
    Attached,
    /// A hot-plug is under way.
    Plugging,
    /// An unplug is under way.
    Unplugging,
}

/// One device of a VM, as `devices()` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// What was asked for, with what the backend decided filled in: a share asked for
    /// with [`crate::ShareVia::Auto`] is listed with the transport it got. Its id is
    /// [`DeviceSpec::id`].
    pub spec: DeviceSpec,
    /// Hot-plugged after start (`false`: added before start, there for the VM's life).
    pub hot: bool,
    /// Where it is in its life.
    pub state: DeviceState,
}

impl DeviceInfo {
    /// An attached device.
    pub fn attached(spec: DeviceSpec, hot: bool) -> Self {
        DeviceInfo {
            spec,
            hot,
            state: DeviceState::Attached,
        }
    }

    /// The device's id.
    pub fn id(&self) -> &str {
        self.spec.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kinds_hotplug_op_is_listed() {
        let dir = std::env::temp_dir();
        let specs = [
            DeviceSpec::Disk(DiskConfig::new("d", "/d.img")),
            DeviceSpec::Nic(NicConfig::user("n")),
            DeviceSpec::Share(ShareConfig::new("s", "s", dir)),
        ];
        let ops: Vec<&str> = specs.iter().map(DeviceSpec::hotplug_op).collect();
        assert_eq!(ops, DeviceSpec::HOTPLUG_OPS);
    }
}
