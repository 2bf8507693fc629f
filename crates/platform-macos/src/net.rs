//! Networking for a QEMU guest on macOS, where there is no TAP: QEMU's own `user`
//! networking (no privileges; the guest is NATed), `vmnet-*` through Apple's
//! vmnet.framework (root, or the restricted com.apple.vm.networking entitlement), or a
//! `stream` netdev to a socket_vmnet or gvproxy Unix socket (a helper holds the
//! privileges).

use std::path::PathBuf;

/// How a NIC reaches the outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MacNetwork {
    /// `-netdev user`: QEMU's slirp, no privileges.
    User,
    /// `-netdev vmnet-shared`: NAT through vmnet.framework.
    VmnetShared,
    /// `-netdev vmnet-host`: a host-only network.
    VmnetHost,
    /// `-netdev vmnet-bridged` onto the host interface `ifname`.
    VmnetBridged {
        /// The host interface (`en0`).
        ifname: String,
    },
    /// `-netdev stream` to a socket_vmnet or gvproxy socket.
    Stream {
        /// The helper's Unix socket.
        socket: PathBuf,
    },
}

/// The network a NIC gets when the caller names none: vmnet's NAT when this process
/// may use it (`privileged`), else QEMU's `user` networking.
pub fn default_network(privileged: bool) -> MacNetwork {
    if privileged {
        MacNetwork::VmnetShared
    } else {
        MacNetwork::User
    }
}

/// The `-netdev` value for a NIC on `network` with netdev id `id`. Commas inside a
/// value are doubled, as QEMU's option syntax needs.
pub fn netdev_arg(id: &str, network: &MacNetwork) -> String {
    let escape = |s: &str| s.replace(',', ",,");
    match network {
        MacNetwork::User => format!("user,id={}", escape(id)),
        MacNetwork::VmnetShared => format!("vmnet-shared,id={}", escape(id)),
        MacNetwork::VmnetHost => format!("vmnet-host,id={}", escape(id)),
        MacNetwork::VmnetBridged { ifname } => {
            format!("vmnet-bridged,id={},ifname={}", escape(id), escape(ifname))
        }
        MacNetwork::Stream { socket } => format!(
            "stream,id={},server=off,addr.type=unix,addr.path={}",
            escape(id),
            escape(&socket.to_string_lossy())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_network_is_one_netdev_argument() {
        assert_eq!(netdev_arg("net0", &MacNetwork::User), "user,id=net0");
        assert_eq!(
            netdev_arg("net0", &MacNetwork::VmnetShared),
            "vmnet-shared,id=net0"
        );
        assert_eq!(
            netdev_arg(
                "n",
                &MacNetwork::VmnetBridged {
                    ifname: "en0".into()
                }
            ),
            "vmnet-bridged,id=n,ifname=en0"
        );
        assert_eq!(
            netdev_arg(
                "n",
                &MacNetwork::Stream {
                    socket: "/var/run/socket_vmnet,x".into()
                }
            ),
            "stream,id=n,server=off,addr.type=unix,addr.path=/var/run/socket_vmnet,,x"
        );
        assert_eq!(default_network(false), MacNetwork::User);
        assert_eq!(default_network(true), MacNetwork::VmnetShared);
    }
}
