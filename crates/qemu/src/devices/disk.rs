//! A disk's QEMU objects: its `-blockdev` node and `virtio-blk` device, as JSON for the
//! command line and for `blockdev-add`/`device_add` alike, so a path or serial holding
//! `,` or `=` stays one value.

use std::ffi::OsString;

use serde_json::json;
use vmkit_core::{DiskConfig, Error as CoreError};

use crate::options::Machine;

/// Refuses a path QEMU cannot take (it needs UTF-8).
pub(crate) fn utf8_path(field: &str, path: &std::path::Path) -> vmkit_core::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    pub(crate) fn image() -> (tempfile::TempDir, std::path::PathBuf) {
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
    }
}
