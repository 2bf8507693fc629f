//! Devices: the cold-plugged disks and NICs of a VM, validated when added, and the
//! QEMU arguments that attach them. Devices are written as JSON (`-blockdev {…}`,
//! `-device {…}`), so a path or serial holding `,` or `=` stays one value.

use std::ffi::OsString;
use std::os::fd::RawFd;

use serde_json::json;
use vmkit_core::{DiskConfig, Error as CoreError, MacAddr, NicBackend, NicConfig, VmnetMode};

use crate::escape::{escape_opt, escape_path};
use crate::options::Machine;

/// The devices a VM boots with. Ids are unique across disks and NICs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColdDevices {
    /// Disks, in the order added (the guest sees them as vda, vdb, … in this order).
    pub disks: Vec<DiskConfig>,
    /// NICs, in the order added.
    pub nics: Vec<NicConfig>,
}

impl ColdDevices {
    /// Adds a disk after validating it (as `disks[<n>]`) and checking its id is free.
    ///
    /// # Errors
    /// `InvalidConfig` naming the field.
    pub fn add_disk(&mut self, disk: DiskConfig) -> vmkit_core::Result<()> {
        let field = format!("disks[{}]", self.disks.len());
        disk.validate(&field)?;
        utf8_path(&format!("{field}.path"), &disk.path)?;
        self.check_free_id(&field, &disk.id)?;
        self.disks.push(disk);
        Ok(())
    }

    /// Adds a NIC after validating it (as `nics[<n>]`) and checking its id is free.
    ///
    /// # Errors
    /// `InvalidConfig` naming the field.
    pub fn add_nic(&mut self, nic: NicConfig) -> vmkit_core::Result<()> {
        let field = format!("nics[{}]", self.nics.len());
        nic.validate(&field)?;
        self.check_free_id(&field, &nic.id)?;
        self.nics.push(nic);
        Ok(())
    }

    /// Checks `id` is not taken by a cold device (hot-plug checks its own devices too).
    ///
    /// # Errors
    /// `InvalidConfig` naming `field.id`.
    pub fn check_free_id(&self, field: &str, id: &str) -> vmkit_core::Result<()> {
        if self.has_id(id) {
            return Err(CoreError::config(
                format!("{field}.id"),
                format!("duplicate device id {id:?} (disks and NICs share one id space)"),
            ));
        }
        Ok(())
    }

    /// Whether a cold disk or NIC has the id `id`.
    pub fn has_id(&self, id: &str) -> bool {
        let disks = self.disks.iter().map(|d| d.id.as_str());
        disks
            .chain(self.nics.iter().map(|n| n.id.as_str()))
            .any(|other| other == id)
    }
}

fn utf8_path(field: &str, path: &std::path::Path) -> vmkit_core::Result<()> {
    if path.to_str().is_none() {
        return Err(CoreError::config(
            field,
            format!(
                "{} is not valid UTF-8; QEMU needs UTF-8 paths",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The `blockdev-add` and `device_add` JSON of `disk` on block node `node`.
pub(crate) fn disk_json(
    node: &str,
    disk: &DiskConfig,
    machine: Machine,
) -> (serde_json::Value, serde_json::Value) {
    let filename = disk.path.to_string_lossy();
    let blockdev = json!({
        "driver": disk.format.as_str(),
        "node-name": node,
        "read-only": disk.read_only,
        "file": {"driver": "file", "filename": filename, "read-only": disk.read_only},
    });
    let mut device = json!({
        "driver": match machine {
            Machine::Q35 | Machine::Virt => "virtio-blk-pci",
            Machine::Microvm => "virtio-blk-device",
        },
        "drive": node,
        "id": disk.id,
    });
    if let Some(serial) = &disk.serial {
        device["serial"] = json!(serial);
    }
    (blockdev, device)
}

/// `-blockdev` and `-device` for disk number `index`.
pub(crate) fn disk_args(index: usize, disk: &DiskConfig, machine: Machine) -> Vec<OsString> {
    let (blockdev, device) = disk_json(&format!("vmkit-disk{index}"), disk, machine);
    vec![
        "-blockdev".into(),
        blockdev.to_string().into(),
        "-device".into(),
        device.to_string().into(),
    ]
}

/// The `-netdev` value for a NIC's host side with netdev id `id`. `fd` is the open TAP
/// QEMU inherits for a TAP NIC: the caller's for a [`vmkit_core::NicBackend::TapFd`],
/// the one vmkit opened for a [`vmkit_core::NicBackend::Tap`] (so QEMU never opens,
/// creates or names a TAP itself). Values are escaped for QEMU's option syntax.
pub(crate) fn netdev_arg(id: &str, backend: &NicBackend, fd: Option<RawFd>) -> String {
    match backend {
        NicBackend::Tap { .. } | NicBackend::TapFd { .. } => {
            format!("tap,id={id},fd={}", fd.unwrap_or(-1))
        }
        NicBackend::User => format!("user,id={id}"),
        NicBackend::Stream { socket } => format!(
            "stream,id={id},server=off,addr.type=unix,addr.path={}",
            escape_path(socket)
        ),
        NicBackend::Vmnet { mode } => match mode {
            VmnetMode::Shared => format!("vmnet-shared,id={id}"),
            VmnetMode::Host => format!("vmnet-host,id={id}"),
            VmnetMode::Bridged { ifname } => {
                format!("vmnet-bridged,id={id},ifname={}", escape_opt(ifname))
            }
        },
    }
}

/// `-netdev` and `-device` for NIC number `index` of VM `vm_id`, on the TAP `fd` when
/// it has one (see [`netdev_arg`]).
pub(crate) fn nic_args(
    index: usize,
    vm_id: &str,
    nic: &NicConfig,
    fd: Option<RawFd>,
    machine: Machine,
) -> Vec<OsString> {
    let netdev_id = format!("vmkit-net{index}");
    let mac = nic.mac.unwrap_or_else(|| stable_mac(vm_id, &nic.id));
    let device = json!({
        "driver": match machine {
            Machine::Q35 | Machine::Virt => "virtio-net-pci",
            Machine::Microvm => "virtio-net-device",
        },
        "netdev": netdev_id,
        "id": nic.id,
        "mac": mac.to_string(),
    });
    vec![
        "-netdev".into(),
        netdev_arg(&netdev_id, &nic.backend, fd).into(),
        "-device".into(),
        device.to_string().into(),
    ]
}

/// A locally administered unicast MAC derived from the VM and NIC ids (FNV-1a), so a
/// NIC keeps its address across restarts.
pub fn stable_mac(vm_id: &str, nic_id: &str) -> MacAddr {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_id.bytes().chain([0]).chain(nic_id.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use vmkit_core::NicBackend;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a,b=c.img");
        std::fs::write(&path, b"").unwrap();
        (dir, path)
    }

    #[test]
    fn a_path_with_commas_and_equals_stays_one_json_value() {
        let (_dir, path) = image();
        let mut disk = DiskConfig::new("data", &path);
        disk.serial = Some("s,1=x".into());
        disk.read_only = true;
        let args = disk_args(0, &disk, Machine::Q35);
        assert_eq!(args[0], "-blockdev");
        let blockdev: Value = serde_json::from_str(args[1].to_str().unwrap()).unwrap();
        assert_eq!(blockdev["file"]["filename"], json!(path.to_str().unwrap()));
        assert_eq!(blockdev["driver"], "raw");
        assert_eq!(blockdev["read-only"], true);
        let device: Value = serde_json::from_str(args[3].to_str().unwrap()).unwrap();
        assert_eq!(device["serial"], "s,1=x");
        assert_eq!(device["id"], "data");
        assert_eq!(device["drive"], "vmkit-disk0");
        assert_eq!(device["driver"], "virtio-blk-pci");
    }

    #[test]
    fn microvm_uses_mmio_devices() {
        let (_dir, path) = image();
        let args = disk_args(1, &DiskConfig::new("d", &path), Machine::Microvm);
        assert!(args[3].to_str().unwrap().contains("\"virtio-blk-device\""));
        let nic = NicConfig::tap("n", "tap0", None);
        let args = nic_args(0, "vm", &nic, Some(5), Machine::Microvm);
        assert!(args[3].to_str().unwrap().contains("\"virtio-net-device\""));
    }

    #[test]
    fn nics_pass_their_tap_fd_whatever_the_backend() {
        let nic = NicConfig::tap("net0", "tap0", Some(MacAddr([0x52, 0x54, 0, 1, 2, 3])));
        let args = nic_args(0, "vm", &nic, Some(9), Machine::Q35);
        assert_eq!(args[1], "tap,id=vmkit-net0,fd=9");
        assert!(
            args[3]
                .to_str()
                .unwrap()
                .contains("\"mac\":\"52:54:00:01:02:03\"")
        );
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let by_fd = NicConfig {
            id: "net1".into(),
            backend: NicBackend::TapFd { fd: fd.into() },
            mac: None,
        };
        let args = nic_args(1, "vm", &by_fd, Some(7), Machine::Q35);
        assert_eq!(args[1], "tap,id=vmkit-net1,fd=7");
    }

    #[test]
    fn nics_without_tap_are_one_netdev_each() {
        assert_eq!(netdev_arg("n0", &NicBackend::User, None), "user,id=n0");
        assert_eq!(
            netdev_arg(
                "n1",
                &NicBackend::Stream {
                    socket: "/var/run/socket_vmnet,x".into()
                },
                None
            ),
            "stream,id=n1,server=off,addr.type=unix,addr.path=/var/run/socket_vmnet,,x"
        );
        let vmnet = |mode| NicBackend::Vmnet { mode };
        assert_eq!(
            netdev_arg("n2", &vmnet(VmnetMode::Shared), None),
            "vmnet-shared,id=n2"
        );
        assert_eq!(
            netdev_arg("n3", &vmnet(VmnetMode::Host), None),
            "vmnet-host,id=n3"
        );
        assert_eq!(
            netdev_arg(
                "n4",
                &vmnet(VmnetMode::Bridged {
                    ifname: "en0".into()
                }),
                None
            ),
            "vmnet-bridged,id=n4,ifname=en0"
        );
    }

    #[test]
    fn stable_macs_are_local_unicast_and_differ_per_nic() {
        let a = stable_mac("vm1", "net0");
        assert_eq!(a, stable_mac("vm1", "net0"));
        assert_ne!(a, stable_mac("vm1", "net1"));
        assert_ne!(a, stable_mac("vm2", "net0"));
        assert!(a.is_local() && !a.is_multicast(), "{a}");
        a.validate_unicast("mac").unwrap();
    }

    #[test]
    fn ids_are_unique_across_disks_and_nics() {
        let (_dir, path) = image();
        let mut devices = ColdDevices::default();
        devices.add_disk(DiskConfig::new("d0", &path)).unwrap();
        let err = devices
            .add_nic(NicConfig::tap("d0", "tap0", None))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: nics[0].id: duplicate device id \"d0\" (disks and NICs share one id space)"
        );
        assert_eq!(devices.nics.len(), 0, "a refused NIC is not added");
    }

    #[test]
    fn a_missing_image_is_refused_when_added() {
        let mut devices = ColdDevices::default();
        let err = devices
            .add_disk(DiskConfig::new("d0", "/nonexistent/disk.img"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: disks[0].path: /nonexistent/disk.img: No such file"),
            "{err}"
        );
        assert!(devices.disks.is_empty());
    }
}
