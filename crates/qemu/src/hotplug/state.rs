//! [`Hotplug`]: what one VM's hot-plugs have changed — the devices on its root ports,
//! the virtio-mem grants, the vCPU threads QEMU has started — and the queue its
//! hot-plug calls run on. Owned by the VM; shared with each operation's context.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmkit_core::HostFd;

use super::queue::Queue;
use crate::locks::lock;

/// A device hot-plugged into this VM.
#[derive(Debug, Clone)]
pub(crate) struct HotDevice {
    /// The device id.
    pub(crate) id: String,
    /// What backs it.
    pub(crate) backend: HotBackend,
    /// The root port it sits on.
    pub(crate) port: String,
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
}

impl HotBackend {
    /// The node or netdev name.
    pub(crate) fn name(&self) -> &str {
        match self {
            HotBackend::Block(n) | HotBackend::Net { netdev: n, .. } => n,
        }
    }
}

/// Memory granted through virtio-mem by one hot-plug call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Its id, as returned by `hotplug_memory`.
    pub(crate) id: String,
    /// Its size in MiB.
    pub(crate) size_mib: u64,
}

/// One VM's hot-plug state.
pub(crate) struct Hotplug {
    queue: Queue,
    devices: Mutex<Vec<HotDevice>>,
    grants: Mutex<Vec<Grant>>,
    /// vCPU threads QEMU has started in this VM's life: boot vCPUs plus every plug.
    /// Under TCG this may not exceed `max_vcpus` (see the vCPU notes in `cpu.rs`).
    vcpu_threads: AtomicU32,
}

impl Hotplug {
    /// The state of a VM that boots `boot_vcpus` vCPUs.
    pub(crate) fn new(boot_vcpus: u32) -> Self {
        Hotplug {
            queue: Queue::default(),
            devices: Mutex::new(Vec::new()),
            grants: Mutex::new(Vec::new()),
            vcpu_threads: AtomicU32::new(boot_vcpus),
        }
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The devices on the VM's root ports.
    pub(crate) fn devices(&self) -> MutexGuard<'_, Vec<HotDevice>> {
        lock(&self.devices)
    }

    /// The virtio-mem grants.
    pub(crate) fn grants(&self) -> MutexGuard<'_, Vec<Grant>> {
        lock(&self.grants)
    }

    pub(crate) fn vcpu_threads(&self) -> u32 {
        self.vcpu_threads.load(Ordering::Acquire)
    }

    /// Counts one more vCPU thread started.
    pub(crate) fn count_vcpu_thread(&self) {
        self.vcpu_threads.fetch_add(1, Ordering::AcqRel);
    }
}
