//! What the shim's test binaries share: vmkit-testkit's containerd of a test's own
//! with this crate's shim on its PATH, one VM-booting test at a time, output shown.

#![allow(dead_code, unreachable_pub, unused_imports)] // each test binary uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed step should panic

use std::path::Path;
use std::process::Output;
use std::sync::Mutex;

pub use vmkit_testkit::containerd::{Containerd, Parts, parts, signal};
pub use vmkit_testkit::guest::vsock_daemon_fault;
pub use vmkit_testkit::leaks::alive;

/// One VM-booting test at a time (two cores, TCG).
static VMS: Mutex<()> = Mutex::new(());

/// Takes [`VMS`], poisoned or not.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    VMS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A containerd with this crate's shim on its PATH.
pub fn start(parts: &Parts, cri: bool) -> Containerd {
    let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-vmkit-v1"));
    Containerd::start(parts, shim.parent().unwrap(), cri).unwrap()
}

/// Nothing of the containerd's `default` namespace is left.
pub fn assert_empty(containerd: &Containerd) {
    assert_eq!(containerd.leftovers(), Vec::<String>::new(), "left behind");
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn show(out: &Output, containerd: &Containerd) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        containerd.log()
    )
}
