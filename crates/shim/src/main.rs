//! # containerd-shim-vmkit-v1
//!
//! The containerd shim of vmkit: containerd runs a container with it (`ctr run
//! --runtime io.containerd.vmkit.v1 …`, or a Kubernetes RuntimeClass whose handler is
//! `vmkit`), and the shim runs the container in a VM of its own — or a pod's
//! containers in one VM — through vmkit's public API only:
//!
//! containerd → shim (task API v3) → `Instance` (vmkit-qemu, or a plugin backend) →
//! guest agent → crun in the guest.
//!
//! The container's root filesystem reaches the VM as a virtio-fs share; its processes
//! are vmkit-process processes, their stdio copied to containerd's FIFOs. See
//! docs/containerd.md for the set-up and docs/decision-oci-runtime.md for why crun.

mod config;
mod container;
mod error;
mod events;
mod mounts;
mod process;
mod resize;
mod sandbox;
mod service;
mod shim;
mod spec;
mod stats;
mod stdio;

use vmkit_qemu as _; // links the QEMU backend

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // vmkit waits for its own children (QEMU, virtiofsd) by pid; a reaper of all
        // children would take their exit statuses away.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::VmkitShim>("io.containerd.vmkit.v1", Some(config))
        .await;
}
