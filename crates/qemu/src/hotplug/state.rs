//! [`Hotplug`]: what one VM's hot-plugs have changed — the virtio-mem grants, the vCPU
//! threads QEMU has started — and the queue its hot-plug calls run on. (Devices on root
//! ports are in the VM's device table.) Owned by the VM; shared with each operation's context.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::queue::Queue;
use crate::locks::lock;

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
            grants: Mutex::new(Vec::new()),
            vcpu_threads: AtomicU32::new(boot_vcpus),
        }
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
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
