//! The real-guest soak (issue 12): 50 start/stop cycles of the test guest with its agent
//! (and a TAP NIC where this host lets vmkit create one), each a new instance in a new
//! state dir; after every cycle and at the end, nothing may be left: no process (QEMU or
//! vhost-device-vsock), child or zombie, fd, socket, lock file or TAP.
//!
//! Target: 0 of each (`--check` exits 1 otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::time::{Duration, Instant};

use vmkit_benches::percentile;
use vmkit_core::{DeviceConfigurator, Instance, NicConfig, StartOptions};
use vmkit_proto::agent::PingRequest;
use vmkit_qemu::QemuBackend;
use vmkit_testkit::leaks::{children, open_fds, processes_mentioning as mentioning};
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

const CYCLES: usize = 50;

/// What one cycle or the whole run left behind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Leaks {
    processes: usize,
    fds: usize,
    sockets: usize,
    lock_files: usize,
    taps: usize,
}

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let tap = tap_available();
    // One warm-up cycle: the runtime's, the spawner's and the allocator's lazily made
    // fds are not leaks.
    runtime.block_on(cycle(&image, 0, tap.as_deref()));
    let fds = open_fds();
    let mut leaks = Leaks::default();
    let mut took = Vec::new();
    let began = Instant::now();
    for i in 1..=CYCLES {
        let (time, left) = runtime.block_on(cycle(&image, i, tap.as_deref()));
        took.push(time);
        leaks.processes += left.processes;
        leaks.sockets += left.sockets;
        leaks.lock_files += left.lock_files;
        leaks.taps += left.taps;
    }
    leaks.processes += children().len();
    leaks.fds = open_fds().saturating_sub(fds);
    took.sort();
    println!(
        "soak, the test guest with its agent{}: {CYCLES} start/stop cycles in {:.1} s",
        if tap.is_some() { " and a TAP NIC" } else { "" },
        began.elapsed().as_secs_f64()
    );
    println!(
        "  cycle p50 {:?}, p90 {:?}",
        percentile(&took, 50.0).unwrap(),
        percentile(&took, 90.0).unwrap()
    );
    println!(
        "  left behind: {} processes, {} fds, {} sockets, {} lock files, {} TAPs",
        leaks.processes, leaks.fds, leaks.sockets, leaks.lock_files, leaks.taps
    );
    let ok = leaks == Leaks::default();
    let left = leaks.processes + leaks.fds + leaks.sockets + leaks.lock_files + leaks.taps;
    vmkit_benches::Row::new(
        "soak",
        "start/stop cycles: things left behind",
        "items",
        left as f64,
        CYCLES,
    )
    .at_most(0.0)
    .record();
    println!(
        "  target: nothing left ({})",
        if ok { "met" } else { "missed" }
    );
    vmkit_benches::finish(ok);
}

/// One start (the agent answers), a Ping, a shutdown; what it left.
async fn cycle(image: &GuestImage, i: usize, tap: Option<&str>) -> (Duration, Leaks) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let vm = QemuBackend
        .create_instance(image.config(&format!("soak{i}"), &state))
        .unwrap();
    if let Some(tap) = tap {
        vm.add_nic(NicConfig::tap("net0", tap, None)).unwrap();
    }
    let began = Instant::now();
    vm.start(StartOptions::new())
        .await
        .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    vm.agent()
        .await
        .unwrap()
        .ping(
            ttrpc::context::with_timeout(10_000_000_000),
            &PingRequest::new(),
        )
        .await
        .unwrap();
    vm.shutdown().await.unwrap();
    let took = began.elapsed();
    let layout = vm.config().layout();
    // The supervisor reaps at once; give the kernel a moment to drop the entries.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !mentioning(&state).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = Leaks {
        processes: mentioning(&state).len(),
        fds: 0,
        sockets: layout.sockets().iter().filter(|(_, p)| p.exists()).count(),
        lock_files: usize::from(layout.lock_file().exists()),
        taps: tap.map_or(0, |t| {
            usize::from(Path::new("/sys/class/net").join(t).exists())
        }),
    };
    (took, left)
}

/// A TAP name vmkit may create here, if any (root with /dev/net/tun).
fn tap_available() -> Option<String> {
    let name = format!("vmktsoak{}", std::process::id() % 10_000);
    vmkit_qemu::probe_tap(&name).ok().map(|()| name)
}
