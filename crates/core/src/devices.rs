//! Device descriptions: disks, NICs and MAC addresses. Plain data, validated when added.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::validate::{Exists, check_id, check_ifname, check_option_text, check_path};

/// Longest virtio-blk serial in bytes (`VIRTIO_BLK_ID_BYTES`); QEMU truncates longer ones.
pub const MAX_DISK_SERIAL: usize = 20;

/// A disk image's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image or a block device.
    #[default]
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// The format's name as QEMU spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A virtio block device backed by an image file or block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device id, unique among the VM's devices (see [`crate::validate::check_id`]).
    pub id: String,
    /// Absolute path of the image or block device; must exist.
    pub path: PathBuf,
    /// Image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Serial number the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskConfig {
    /// A writable raw disk.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            id: id.into(),
            path: path.into(),
            format: DiskFormat::Raw,
            read_only: false,
            serial: None,
        }
    }

    /// Checks the disk; `field` is its place in the config (`disks[0]`), used in errors.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a malformed id, a path that is relative, missing or a
    /// directory, or a serial that is too long or holds control characters.
    pub fn validate(&self, field: &str) -> Result<()> {
        check_id(&format!("{field}.id"), &self.id)?;
        check_path(&format!("{field}.path"), &self.path, Exists::File)?;
        if let Some(serial) = &self.serial {
            let f = format!("{field}.serial");
            check_option_text(&f, serial)?;
            if serial.is_empty() || serial.len() > MAX_DISK_SERIAL || !serial.is_ascii() {
                return Err(Error::config(
                    f,
                    format!("{serial:?} must be 1-{MAX_DISK_SERIAL} ASCII bytes"),
                ));
            }
        }
        Ok(())
    }
}

/// Where a NIC's packets go on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NicBackend {
    /// A TAP device opened by name (it must exist, or the caller must be allowed to create it).
    Tap {
        /// Interface name, 1–15 bytes.
        name: String,
    },
    /// A TAP device the caller already opened, handed over as an owned fd: the VM
    /// holds it (and the VMM gets a copy) for as long as the NIC exists. A live fd of
    /// this process, so it is never serialised: a config carrying one does not cross
    /// to a plugin or into a file (serialising it fails, naming the variant).
    #[serde(skip)]
    TapFd {
        /// The open TAP.
        fd: HostFd,
    },
    /// The VMM's own user-mode networking (QEMU's slirp): no privileges and no host
    /// device; the guest is NATed. What a host without TAP (macOS) uses by default.
    User,
    /// A `stream` netdev to a Unix socket a helper serves (socket_vmnet, gvproxy,
    /// passt), which holds whatever privileges the network needs.
    Stream {
        /// The helper's socket.
        socket: PathBuf,
    },
    /// Apple's vmnet.framework (macOS only; root, or the com.apple.vm.networking
    /// entitlement).
    Vmnet {
        /// Which vmnet network.
        mode: VmnetMode,
    },
}

/// A vmnet.framework network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmnetMode {
    /// NAT to the host's network.
    Shared,
    /// A network of the host and its guests only.
    Host,
    /// Bridged onto a host interface.
    Bridged {
        /// The host interface (`en0`).
        ifname: String,
    },
}

/// An open file descriptor handed to vmkit: owned, shared by its clones (one open fd),
/// closed when the last holder drops it. Equal when it is the same open fd.
#[derive(Debug, Clone)]
pub struct HostFd(Arc<OwnedFd>);

impl HostFd {
    /// Takes ownership of `fd`.
    pub fn new(fd: OwnedFd) -> Self {
        HostFd(Arc::new(fd))
    }
}

impl From<OwnedFd> for HostFd {
    fn from(fd: OwnedFd) -> Self {
        HostFd::new(fd)
    }
}

impl AsFd for HostFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for HostFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl PartialEq for HostFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_raw_fd() == other.as_raw_fd()
    }
}

impl Eq for HostFd {}

/// A virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Device id, unique among the VM's devices.
    pub id: String,
    /// The host side.
    pub backend: NicBackend,
    /// The guest's MAC address; `None` lets the backend pick a stable local one.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl NicConfig {
    /// A NIC on the TAP device `tap`.
    pub fn tap(id: impl Into<String>, tap: impl Into<String>, mac: Option<MacAddr>) -> Self {
        NicConfig {
            id: id.into(),
            backend: NicBackend::Tap { name: tap.into() },
            mac,
        }
    }

    /// A NIC on the VMM's own user-mode network ([`NicBackend::User`]).
    pub fn user(id: impl Into<String>) -> Self {
        NicConfig {
            id: id.into(),
            backend: NicBackend::User,
            mac: None,
        }
    }

    /// Checks the NIC; `field` is its place in the config (`nics[0]`), used in errors.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a malformed id or interface name, or a MAC that is
    /// all zeros or multicast.
    pub fn validate(&self, field: &str) -> Result<()> {
        check_id(&format!("{field}.id"), &self.id)?;
        match &self.backend {
            NicBackend::Tap { name } => check_ifname(&format!("{field}.backend.name"), name)?,
            // An owned fd is open by construction.
            NicBackend::TapFd { .. } | NicBackend::User => {}
            NicBackend::Stream { socket } => {
                crate::validate::check_socket_path(&format!("{field}.backend.socket"), socket)?;
            }
            NicBackend::Vmnet {
                mode: VmnetMode::Bridged { ifname },
            } => check_ifname(&format!("{field}.backend.mode.ifname"), ifname)?,
            NicBackend::Vmnet { .. } => {}
        }
        if let Some(mac) = &self.mac {
            mac.validate_unicast(&format!("{field}.mac"))?;
        }
        Ok(())
    }
}

/// A 48-bit Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `true` when the group bit (least significant bit of the first octet) is set.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// `true` when the locally-administered bit is set.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 2 == 2
    }

    /// A NIC's address must be a unicast, non-zero address.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming `field` otherwise.
    pub fn validate_unicast(&self, field: &str) -> Result<()> {
        if self.0 == [0; 6] {
            return Err(Error::config(
                field,
                "00:00:00:00:00:00 is not a NIC address",
            ));
        }
        if self.is_multicast() {
            return Err(Error::config(
                field,
                format!("{self} is a multicast address (first octet is odd); a NIC needs unicast"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address (want six hex pairs like 52:54:00:12:34:56)")]
pub struct ParseMacError {
    input: String,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let err = || ParseMacError {
            input: s.to_owned(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reason(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidConfig { field, reason }) => format!("{field}: {reason}"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert!(mac.is_local());
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0f",
            "+1:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "xx".parse::<MacAddr>().unwrap_err().to_string(),
            "\"xx\" is not a MAC address (want six hex pairs like 52:54:00:12:34:56)"
        );
    }

    #[test]
    fn nic_mac_must_be_unicast_and_non_zero() {
        let mut nic = NicConfig::tap("net0", "tap0", Some("01:00:5e:00:00:01".parse().unwrap()));
        assert_eq!(
            reason(nic.validate("nics[0]")),
            "nics[0].mac: 01:00:5e:00:00:01 is a multicast address (first octet is odd); a NIC needs unicast"
        );
        nic.mac = Some(MacAddr([0; 6]));
        assert_eq!(
            reason(nic.validate("nics[0]")),
            "nics[0].mac: 00:00:00:00:00:00 is not a NIC address"
        );
        nic.mac = Some("52:54:00:00:00:01".parse().unwrap());
        nic.validate("nics[0]").unwrap();
    }

    #[test]
    fn nic_backend_is_checked() {
        let nic = NicConfig::tap("net0", "tap/0", None);
        assert!(reason(nic.validate("nics[2]")).starts_with("nics[2].backend.name: \"tap/0\""));
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let nic = NicConfig {
            id: "net0".into(),
            backend: NicBackend::TapFd { fd: fd.into() },
            mac: None,
        };
        nic.validate("nics[0]").unwrap();
        // A live fd never leaves the process in serialised data.
        let err = serde_json::to_string(&nic).unwrap_err().to_string();
        assert_eq!(
            err,
            "the enum variant NicBackend::TapFd cannot be serialized"
        );
        let clone = nic.clone();
        assert_eq!(clone, nic, "a clone holds the same open fd");
        // The backends without TAP, as serde data, and their checks.
        let user: NicConfig = serde_json::from_str(r#"{"id": "net1", "backend": "user"}"#).unwrap();
        assert_eq!(user.backend, NicBackend::User);
        user.validate("nics[1]").unwrap();
        let stream: NicConfig = serde_json::from_str(
            r#"{"id": "net2", "backend": {"stream": {"socket": "/var/run/socket_vmnet"}}}"#,
        )
        .unwrap();
        stream.validate("nics[2]").unwrap();
        let bridged = NicConfig {
            id: "net3".into(),
            backend: NicBackend::Vmnet {
                mode: VmnetMode::Bridged {
                    ifname: "en/0".into(),
                },
            },
            mac: None,
        };
        assert!(
            reason(bridged.validate("nics[3]")).starts_with("nics[3].backend.mode.ifname:"),
            "{:?}",
            bridged.validate("nics[3]")
        );
    }

    #[test]
    fn disk_serial_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, b"").unwrap();
        let mut disk = DiskConfig::new("data", &img);
        disk.serial = Some("x".repeat(21));
        assert_eq!(
            reason(disk.validate("disks[0]")),
            format!(
                "disks[0].serial: {:?} must be 1-20 ASCII bytes",
                "x".repeat(21)
            )
        );
        disk.serial = Some("SER,1=2".into());
        disk.validate("disks[0]").unwrap();
    }

    #[test]
    fn nic_serialises_as_plain_data() {
        let nic = NicConfig::tap("net0", "tap0", Some("52:54:00:00:00:01".parse().unwrap()));
        let json = serde_json::to_string(&nic).unwrap();
        assert_eq!(
            json,
            r#"{"id":"net0","backend":{"tap":{"name":"tap0"}},"mac":"52:54:00:00:00:01"}"#
        );
        assert_eq!(serde_json::from_str::<NicConfig>(&json).unwrap(), nic);
    }

    proptest! {
        #[test]
        fn mac_display_parse_round_trips(bytes in any::<[u8; 6]>()) {
            let mac = MacAddr(bytes);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>().unwrap(), mac);
        }

        #[test]
        fn mac_parser_never_panics(s in ".{0,40}") {
            let _ = s.parse::<MacAddr>();
        }
    }
}
