//! # vmkit-testkit
//!
//! Test code that drives VMs without a VM, or with the smallest real one:
//!
//! - [`MockQmpServer`]: a QMP server on a Unix socket, scripted per command (result,
//!   QMP error, delay, never, garbage, disconnect mid-reply), that emits events on
//!   demand and records what it received — for faults a real QEMU cannot be made to
//!   produce on demand.
//! - [`conformance`]: the backend conformance suite every backend must pass.
//! - [`containerd`]: a containerd 2.x of a test's own, for testing a containerd shim
//!   against the real thing (`ctr`, CRI), and what it left.
//! - [`fake_backend`]: `FakeBackend` (`"fake"`), the whole `Instance` contract in
//!   process with no VM: the state table, devices and resources, a real guest agent, and
//!   faults on demand.
//! - [`fake_qemu`]: a QEMU stand-in process (QMP on its socket, a ready line) that
//!   crashes, hangs or ignores signals on demand, and answers the hot-plug commands of
//!   the QEMU backend from a machine model.
//! - [`fake_vsock`]: a stand-in for the hybrid vsock daemon that hands the host's
//!   connections to a real agent serving a [`fake_guest`] (the files a guest kernel
//!   would show), so the QEMU backend driving the fake QEMU has a guest agent.
//! - [`guest`]: the test guest `cargo xtask image` builds, and configs that boot it.
//! - `mocks` (feature `mocks`): `mockall` mocks of every core trait (`MockInstance`,
//!   `MockBackend`, `MockCpuHotplugger`, …), for testing code that drives VMs through
//!   the traits.
//! - `model` (feature `model`): the model-based test of the `Instance` contract
//!   (proptest-state-machine) for any backend, with the shrunk sequence on a failure.
//! - [`leaks`]: this process's children and fds, and the processes that name a path:
//!   what a test counts to prove nothing was left.
//! - [`process_checks`]: checks of a guest's process service (stdio, exit statuses, a
//!   TTY, many processes, reattaching, a stalled reader, bad requests) for any instance
//!   with a guest agent.
//! - [`qemu`]: find the real QEMU (failing under CI when it is missing) and run a
//!   paused, diskless one with a QMP socket.
//!
//! It is public so runtimes built on vmkit can test their own code the same way.
//!
//! ```no_run
//! use vmkit_testkit::{MockQmpServer, MockReply};
//!
//! # async fn run() -> std::io::Result<()> {
//! let server = MockQmpServer::start("/tmp/qmp.sock").await?;
//! server.on("stop", MockReply::ok(serde_json::json!({})).then_event("STOP", serde_json::json!({})));
//! server.on_once("device_add", MockReply::error("GenericError", "Duplicate device ID 'cpu1'"));
//! // … point the code under test at /tmp/qmp.sock, then check what it sent:
//! let sent: Vec<String> = server.received_commands().into_iter().map(|c| c.name).collect();
//! # Ok(())
//! # }
//! ```

pub mod conformance;
pub mod containerd;
pub mod fake_backend;
pub mod fake_guest;
pub mod fake_qemu;
pub mod fake_vsock;
pub mod guest;
pub mod leaks;
pub mod mock_qmp;
#[cfg(feature = "mocks")]
pub mod mocks;
#[cfg(feature = "model")]
pub mod model;
pub mod process_checks;
pub mod qemu;

pub use guest::{
    GuestImage, guest_image, require_arm64_guest_image, require_generic_guest_image,
    require_guest_image,
};
pub use mock_qmp::{Greeting, MockQmpServer, MockReply, ReceivedCommand};
