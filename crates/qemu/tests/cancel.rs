//! A start whose caller gives up (issue 22): dropping `start()`'s future is a
//! cancellation, and a cancelled start ends like a failed one — the real QEMU and its
//! vsock daemon gone, no socket left in the state dir, `Shutdown`, and `wait()` saying
//! why — whichever phase the start was in.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

use vmkit_core::{ExitReason, Instance, StartOptions, VmState};
use vmkit_qemu::QemuBackend;

mod common;
use common::*;

/// Polls `check` until it holds, at most `within`; panics with `what` otherwise.
async fn within(within: Duration, what: &str, check: impl Fn() -> bool) {
    let began = Instant::now();
    while !check() {
        assert!(began.elapsed() < within, "{what} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_start_leaves_no_qemu_daemon_or_socket_in_any_phase() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    // Dropped while QEMU is spawned and QMP connects, while the guest boots, and while
    // its agent is dialled (a start with the agent takes about 2 s here).
    for (n, after) in [150u64, 500, 1300].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let vm = QemuBackend
            .create_instance(image.config(&format!("cancel-{n}"), &state))
            .unwrap();
        let mut events = vm.events();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(after), vm.start(StartOptions::new())).await;
        assert!(gave_up.is_err(), "the start finished within {after} ms");
        let dropped = Instant::now();
        within(
            Duration::from_secs(5),
            "QEMU or the daemon still runs",
            || processes_mentioning(&state).is_empty(),
        )
        .await;
        let layout = vm.config().layout();
        let left: Vec<_> = layout
            .sockets()
            .into_iter()
            .map(|(_, path)| path)
            .chain([layout.guest_dir()])
            .filter(|path| path.exists())
            .collect();
        assert!(
            left.is_empty(),
            "left after a start dropped at {after} ms: {left:?}"
        );
        assert_eq!(vm.state(), VmState::Shutdown);
        let exit = tokio::time::timeout(Duration::from_secs(1), vm.wait())
            .await
            .expect("wait resolves");
        assert_eq!(exit.reason, ExitReason::StartFailed, "{exit:?}");
        assert!(
            exit.message
                .as_deref()
                .is_some_and(|m| m.contains("cancelled")),
            "{exit:?}"
        );
        // The events say it too, in order, ending with the exit.
        let mut last = None;
        while let Ok(event) = events.try_recv() {
            last = Some(event);
        }
        assert_eq!(last, Some(vmkit_core::VmEvent::Exited(exit)));
        eprintln!(
            "start dropped at {after} ms: nothing left {:?} later",
            dropped.elapsed()
        );
        // The state dir is free again: a new VM on it starts.
        if n == 2 {
            let again = start(
                QemuBackend
                    .create_instance(image.config("cancel-again", &state))
                    .unwrap(),
            )
            .await;
            again.shutdown().await.unwrap();
        }
    }
}
