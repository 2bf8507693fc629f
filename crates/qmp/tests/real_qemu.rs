//! vmkit-qmp against the real QEMU binary (`-accel tcg -machine q35 -S`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vmkit_qmp::{Error, Event, QmpClient, QmpOptions, qapi_qmp};
use vmkit_testkit::qemu::{PausedQemu, require_qemu};

struct Vm {
    _dir: tempfile::TempDir,
    qemu: PausedQemu,
}

/// A paused QEMU, or `None` (skip) when QEMU is missing outside CI.
fn paused_qemu() -> Option<Vm> {
    let binary = require_qemu()?;
    let dir = tempfile::tempdir().unwrap();
    let qemu = PausedQemu::spawn(&binary, &dir.path().join("qmp.sock"), &[]).unwrap();
    Some(Vm { _dir: dir, qemu })
}

fn opts() -> QmpOptions {
    QmpOptions {
        connect_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(10),
        ..QmpOptions::default()
    }
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<Event>, name: &str) -> Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.unwrap();
            if event.name() == name {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event within 10 s"))
}

#[tokio::test]
async fn connects_while_qemu_is_still_starting_and_reports_its_version() {
    let Some(vm) = paused_qemu() else { return };
    // Spawned just now: QEMU creates the socket only after it has initialised, so
    // connect starts before the socket exists and must retry.
    let existed_at_start = vm.qemu.qmp_path().exists();
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    assert!(qmp.version().major >= 7, "version {}", qmp.version());
    assert!(qmp.oob_enabled(), "QEMU offers oob and we asked for it");
    assert!(
        !existed_at_start,
        "the socket existed before connect: nothing was retried"
    );
}

#[tokio::test]
async fn query_status_cpus_and_hotpluggable_cpus() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();

    let status = qmp.execute(qapi_qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    assert!(matches!(status.status, qapi_qmp::RunState::prelaunch));

    let cpus = qmp.execute(qapi_qmp::query_cpus_fast {}).await.unwrap();
    assert_eq!(cpus.len(), 1, "-smp 1,maxcpus=4 boots one vCPU");

    let slots = qmp
        .execute_raw("query-hotpluggable-cpus", None)
        .await
        .unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 4);
    let free = slots.iter().filter(|s| s.get("qom-path").is_none()).count();
    assert_eq!(free, 3, "three slots are free for hotplug: {slots:?}");
}

#[tokio::test]
async fn qemu_errors_carry_class_and_text() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    let err = qmp
        .execute_raw("device_del", Some(serde_json::json!({"id": "nope"})))
        .await
        .unwrap_err();
    assert_eq!(err.qmp_class(), Some("DeviceNotFound"), "{err}");
    assert_eq!(
        err.to_string(),
        "device_del: QMP error DeviceNotFound: Device 'nope' not found"
    );
    let err = qmp.execute_raw("no-such-command", None).await.unwrap_err();
    assert_eq!(err.qmp_class(), Some("CommandNotFound"), "{err}");
    // The connection is still good.
    qmp.execute(qapi_qmp::query_status {}).await.unwrap();
}

#[tokio::test]
async fn cont_and_stop_emit_resume_and_stop() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    let mut events = qmp.events();

    qmp.execute(qapi_qmp::cont {}).await.unwrap();
    match next_event(&mut events, "RESUME").await {
        Event::Qmp { event, .. } => {
            assert!(matches!(*event, qapi_qmp::Event::RESUME { .. }))
        }
        other => panic!("RESUME arrived untyped: {other:?}"),
    }
    assert!(
        qmp.execute(qapi_qmp::query_status {})
            .await
            .unwrap()
            .running
    );

    qmp.execute(qapi_qmp::stop {}).await.unwrap();
    next_event(&mut events, "STOP").await;
    assert!(
        !qmp.execute(qapi_qmp::query_status {})
            .await
            .unwrap()
            .running
    );
}

#[tokio::test]
async fn quit_emits_shutdown_then_disconnects() {
    let Some(mut vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    let mut events = qmp.events();

    qmp.execute(qapi_qmp::quit {}).await.unwrap();
    match next_event(&mut events, "SHUTDOWN").await {
        Event::Qmp { event, .. } => match *event {
            qapi_qmp::Event::SHUTDOWN { data, .. } => {
                assert!(!data.guest);
                assert!(matches!(
                    data.reason,
                    qapi_qmp::ShutdownCause::host_qmp_quit
                ));
            }
            other => panic!("{other:?}"),
        },
        other => panic!("SHUTDOWN arrived untyped: {other:?}"),
    }
    match next_event(&mut events, "DISCONNECTED").await {
        Event::Disconnected { reason } => assert_eq!(reason, "QEMU closed the connection"),
        other => panic!("{other:?}"),
    }
    let err = qmp.execute(qapi_qmp::query_status {}).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    assert_eq!(
        err.to_string(),
        "query-status: QMP connection lost: QEMU closed the connection"
    );
    assert!(vm.qemu.wait_exit(Duration::from_secs(10)).await.is_some());
}

#[tokio::test]
async fn a_frozen_qemu_times_out_within_timeout_plus_100ms_and_recovers() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    qmp.execute(qapi_qmp::query_status {}).await.unwrap();

    vm.qemu.signal(Signal::SIGSTOP).unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = qmp
        .execute_with_timeout(qapi_qmp::query_status {}, timeout)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(100),
        "timed out after {took:?} for a {timeout:?} deadline"
    );
    assert!(matches!(err, Error::Timeout { ref command, .. } if command == "query-status"));

    // Thawed, QEMU answers the abandoned command late (discarded) and the next one.
    vm.qemu.signal(Signal::SIGCONT).unwrap();
    let status = qmp.execute(qapi_qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    assert!(qmp.closed_reason().is_none());
}

#[tokio::test]
async fn connecting_to_a_frozen_qemu_fails_at_the_deadline() {
    let Some(vm) = paused_qemu() else { return };
    // Let it create the socket, then freeze it: it accepts but never greets.
    QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    vm.qemu.signal(Signal::SIGSTOP).unwrap();
    let connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = QmpClient::connect(
        vm.qemu.qmp_path(),
        QmpOptions {
            connect_timeout,
            ..opts()
        },
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(
        took < connect_timeout + Duration::from_millis(100),
        "{took:?}"
    );
    assert!(
        err.to_string()
            .contains("no greeting and capabilities within 300ms"),
        "{err}"
    );
    vm.qemu.signal(Signal::SIGCONT).unwrap();
}

#[tokio::test]
async fn many_concurrent_callers_share_one_connection() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    qmp.execute(qapi_qmp::query_status {}).await.map(|_| ())
                } else {
                    qmp.execute(qapi_qmp::query_cpus_fast {})
                        .await
                        .map(|c| assert_eq!(c.len(), 1))
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn getfd_receives_the_fd_passed_with_the_command() {
    let Some(vm) = paused_qemu() else { return };
    let qmp = QmpClient::connect(vm.qemu.qmp_path(), opts())
        .await
        .unwrap();
    let args = || Some(serde_json::json!({"fdname": "passed"}));
    // Without an fd QEMU refuses; with one it keeps it under the name.
    let err = qmp.execute_raw("getfd", args()).await.unwrap_err();
    assert!(
        err.to_string().contains("No file descriptor supplied"),
        "{err}"
    );
    let file = std::fs::File::open("/dev/null").unwrap();
    qmp.execute_raw_with_fd("getfd", args(), std::os::fd::AsFd::as_fd(&file))
        .await
        .unwrap();
    qmp.execute_raw("closefd", args()).await.unwrap();
    let gone = qmp.execute_raw("closefd", args()).await.unwrap_err();
    assert!(gone.to_string().contains("not found"), "{gone}");
}
