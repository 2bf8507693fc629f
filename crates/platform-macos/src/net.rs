//! Networking for a QEMU guest on macOS, where there is no TAP. The choices are
//! vmkit-core's `NicBackend::User` (QEMU's slirp, no privileges; the guest is NATed),
//! `NicBackend::Vmnet` (Apple's vmnet.framework: root, or the restricted
//! com.apple.vm.networking entitlement) and `NicBackend::Stream` (a socket_vmnet or
//! gvproxy helper holds the privileges); vmkit-qemu writes their `-netdev`s. This module
//! holds the choice a runtime makes when it names none.

/// The network a NIC should get on this Mac when the caller names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recommended {
    /// QEMU's user networking (`NicBackend::User`).
    User,
    /// vmnet's NAT (`NicBackend::Vmnet { mode: Shared }`).
    VmnetShared,
}

/// vmnet's NAT when this process may use vmnet (`privileged`), else user networking.
pub fn default_network(privileged: bool) -> Recommended {
    if privileged {
        Recommended::VmnetShared
    } else {
        Recommended::User
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_networking_unless_privileged() {
        assert_eq!(default_network(false), Recommended::User);
        assert_eq!(default_network(true), Recommended::VmnetShared);
    }
}
