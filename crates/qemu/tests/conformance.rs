//! The backend conformance suite (vmkit-testkit) against the QEMU backend with the real
//! test guest under QEMU (TCG): every check boots its own VMs, one at a time. (The same
//! suite runs against the fake QEMU in the fault matrix, and against FakeBackend in
//! vmkit-testkit's tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::PathBuf;

use vmkit_core::{Backend, Instance, InstanceConfig};
use vmkit_qemu::QemuBackend;
use vmkit_testkit::GuestImage;
use vmkit_testkit::conformance::{self, Target};

mod common;
use common::*;

struct RealGuest {
    image: GuestImage,
    dir: tempfile::TempDir,
}

#[async_trait::async_trait]
impl Target for RealGuest {
    fn backend(&self) -> &dyn Backend {
        &QemuBackend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        self.image.config(id, &self.dir.path().join(id))
    }

    fn disk(&self) -> Option<PathBuf> {
        Some(disk(self.dir.path(), "conformance.img"))
    }

    /// A TAP NIC: vmkit creates it (root with `/dev/net/tun`, as under CI; elsewhere
    /// the NIC part is left out, and the check's note says so).
    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        vmkit_testkit::qemu::tap_nic(id, vmkit_qemu::probe_tap)
    }

    async fn crash(&self, vm: &dyn Instance) -> bool {
        vmkit_testkit::conformance::kill_vmm(vm)
    }

    /// A real guest's boot takes about 2 s here.
    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        Some(self.config(id))
    }

    /// The CID a kernel-vsock VM leased, in this process or (lock file) any other.
    fn held_outside(&self, info: &vmkit_core::VmInfo) -> Result<Vec<String>, String> {
        Ok(conformance::cid_still_leased(info, vmkit_qemu::cid_in_use))
    }

    /// vhost-device-vsock 0.3's daemon that never serves its guest, about one VM in
    /// a hundred (docs/guest-communication.md): the real-VM tests start such a VM once
    /// more, and so does the suite.
    fn environment_fault(&self, failure: &str) -> bool {
        daemon_fault_in(failure)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qemu_backend_with_the_real_guest_passes_every_check() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let target = RealGuest {
        image,
        dir: tempfile::tempdir().unwrap(),
    };
    let report = conformance::run(&target).await;
    report.assert_complete();
}
