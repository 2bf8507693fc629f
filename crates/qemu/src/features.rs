//! What one VM can do, decided once when it is created: which hot-plugs it offers, how
//! many hot-plug ports it has, and how its guest is reached. Every "can this VM …"
//! question in the crate reads it.

use vmkit_core::{Capabilities, GuestTransport, InstanceConfig, MemoryHotplug};

use crate::guest::Plan;
use crate::options::{Machine, QemuOptions};

/// What the backend offers in this version (an instance without a guest agent,
/// `transport: none`, reports [`Capabilities::PAUSE`] only).
pub const CAPABILITIES: Capabilities = Capabilities::PAUSE
    .union(Capabilities::CPU_HOTPLUG)
    .union(Capabilities::MEMORY_HOTPLUG)
    .union(Capabilities::DISK_HOTPLUG)
    .union(Capabilities::NIC_HOTPLUG)
    .union(Capabilities::GUEST_AGENT)
    .union(Capabilities::GUEST_STREAMS)
    .union(Capabilities::VSOCK)
    .union(Capabilities::HYBRID_VSOCK)
    .union(Capabilities::FS_SHARE);

/// One VM's feature set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Features {
    /// vCPU hot-plug: q35 (QEMU cannot add vCPUs to microvm or Arm's virt), an agent to
    /// online them, room above the boot vCPUs.
    pub(crate) cpu_hotplug: bool,
    /// Memory hot-plug: an agent, room above boot memory, and DIMM slots on q35 or
    /// virtio-mem on q35 or virt.
    pub(crate) memory_hotplug: Option<MemoryHotplug>,
    /// Reserved PCIe root ports for disks and NICs (0: no disk or NIC hot-plug).
    pub(crate) hotplug_ports: u32,
    /// How the guest is reached.
    pub(crate) transport: Plan,
    /// Shares can go over virtio-fs: this host's QEMU has vhost-user and virtiofsd is
    /// there to run (else they go over virtio-9p, cold only).
    pub(crate) virtio_fs: bool,
}

impl Features {
    /// The features of a VM made from `config` and `options` on this host.
    pub(crate) fn of(config: &InstanceConfig, options: &QemuOptions) -> Features {
        let machine = options.machine;
        let agent = config.transport != GuestTransport::None;
        let res = &config.resources;
        let memory_room = res.max_memory() > res.memory_mib
            && (res.memory_slots > 0 || res.memory_hotplug == MemoryHotplug::VirtioMem);
        // DIMMs need ACPI hot-plug, which only q35 gives a directly booted kernel.
        let memory_kind = matches!(
            (machine, res.memory_hotplug),
            (Machine::Q35, _) | (Machine::Virt, MemoryHotplug::VirtioMem)
        );
        Features {
            cpu_hotplug: machine == Machine::Q35 && agent && res.max_vcpus > res.boot_vcpus,
            memory_hotplug: (memory_kind && agent && memory_room).then_some(res.memory_hotplug),
            hotplug_ports: if machine.has_pci() {
                options.hotplug_ports
            } else {
                0
            },
            transport: Plan::for_config(config, options),
            virtio_fs: crate::host::vhost_user_supported() && options.virtiofsd_binary.is_file(),
        }
    }

    /// Whether disks and NICs can be hot-plugged.
    pub(crate) fn pcie_hotplug(&self) -> bool {
        self.hotplug_ports > 0
    }

    /// Whether guest RAM is shared with vhost-user daemons (hybrid vsock, or a
    /// virtio-fs share, cold or hot-plugged later), so that hot-added RAM must be
    /// shared too.
    pub(crate) fn shares_ram(&self) -> bool {
        matches!(self.transport, Plan::Hybrid { .. }) || self.virtio_fs
    }

    /// What the VM offers: no guest parts without an agent, only the vsock flavour it
    /// uses, and only the hot-plugs it has.
    pub(crate) fn capabilities(&self) -> Capabilities {
        let mut caps = match self.transport {
            Plan::None => return Capabilities::PAUSE,
            Plan::Hybrid { .. } => CAPABILITIES.difference(Capabilities::VSOCK),
            Plan::Kernel { .. } => CAPABILITIES.difference(Capabilities::HYBRID_VSOCK),
            Plan::Serial { .. } => {
                CAPABILITIES.difference(Capabilities::VSOCK | Capabilities::HYBRID_VSOCK)
            }
        };
        if !self.cpu_hotplug {
            caps.remove(Capabilities::CPU_HOTPLUG);
        }
        if self.memory_hotplug.is_none() {
            caps.remove(Capabilities::MEMORY_HOTPLUG);
        }
        if !self.pcie_hotplug() {
            caps.remove(Capabilities::DISK_HOTPLUG | Capabilities::NIC_HOTPLUG);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InstanceConfig {
        let mut config = InstanceConfig::new("vm", "/run/vm", "/boot/vmlinuz");
        config.transport = GuestTransport::HybridVsock {
            uds: None,
            port: 1024,
        };
        config.resources.boot_vcpus = 1;
        config.resources.max_vcpus = 2;
        config.resources.memory_mib = 256;
        config.resources.max_memory_mib = Some(512);
        config.resources.memory_slots = 2;
        config
    }

    #[test]
    fn each_feature_has_its_conditions() {
        let options = QemuOptions::q35();
        let all = Features::of(&config(), &options);
        assert!(all.cpu_hotplug && all.pcie_hotplug() && all.shares_ram());
        assert_eq!(all.memory_hotplug, Some(MemoryHotplug::Dimm));
        assert_eq!(
            all.capabilities(),
            CAPABILITIES.difference(Capabilities::VSOCK)
        );

        let mut no_room = config();
        no_room.resources.max_vcpus = 1;
        no_room.resources.max_memory_mib = Some(256);
        let f = Features::of(&no_room, &options);
        assert!(!f.cpu_hotplug && f.memory_hotplug.is_none());

        let mut no_slots = config();
        no_slots.resources.memory_slots = 0;
        assert!(Features::of(&no_slots, &options).memory_hotplug.is_none());
        no_slots.resources.memory_hotplug = MemoryHotplug::VirtioMem;
        assert_eq!(
            Features::of(&no_slots, &options).memory_hotplug,
            Some(MemoryHotplug::VirtioMem)
        );

        let microvm = QemuOptions {
            machine: Machine::Microvm,
            ..options.clone()
        };
        let f = Features::of(&config(), &microvm);
        assert!(!f.cpu_hotplug && f.memory_hotplug.is_none() && !f.pcie_hotplug());

        // Arm's virt: PCIe ports and virtio-mem, no vCPUs, no DIMMs.
        let virt = QemuOptions {
            machine: Machine::Virt,
            ..options.clone()
        };
        let f = Features::of(&config(), &virt);
        assert!(!f.cpu_hotplug && f.memory_hotplug.is_none() && f.pcie_hotplug());
        assert_eq!(
            Features::of(&no_slots, &virt).memory_hotplug,
            Some(MemoryHotplug::VirtioMem)
        );

        let mut none = config();
        none.transport = GuestTransport::None;
        let f = Features::of(&none, &options);
        assert_eq!(f.capabilities(), Capabilities::PAUSE);
        assert!(!f.cpu_hotplug && f.memory_hotplug.is_none());
        assert!(f.pcie_hotplug(), "disks and NICs need no agent");
    }
}
