//! A NIC's QEMU objects: its `-netdev` (the host side, escaped for QEMU's option
//! syntax) and `virtio-net` device, and the stable MAC it gets when none is given.

use std::ffi::OsString;
use std::os::fd::RawFd;

use serde_json::json;
use vmkit_core::{MacAddr, NicBackend, NicConfig, VmnetMode};

use crate::escape::{escape_opt, escape_path};
use crate::options::Machine;

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

    #[test]
    fn microvm_uses_mmio_devices() {
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
}
