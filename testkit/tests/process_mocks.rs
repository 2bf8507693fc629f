//! vmkit-process as a consumer of `GuestCommunicator`, driven by the mock: a guest that
//! cannot be reached, and a stream port that fails after the spawn — each a typed error
//! naming the call, and no process left running in the agent.
#![cfg(feature = "mocks")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::{Error as CoreError, GuestAddr};
use vmkit_process::{Command, Error, Processes};
use vmkit_proto::AGENT_PORT;
use vmkit_testkit::mocks::MockGuestCommunicator;

#[tokio::test]
async fn a_guest_that_cannot_be_reached_is_a_guest_error_naming_the_call() {
    let mut guest = MockGuestCommunicator::new();
    guest.expect_client().times(1).returning(|| {
        Err(CoreError::Unsupported {
            op: "client".into(),
            backend: "mock".into(),
            reason: "no guest agent".into(),
        })
    });
    let p = Processes::new(Arc::new(guest));
    let err = p
        .spawn(&Command::new(["true"]), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Guest { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("spawn [\"true\"]: reach the guest"),
        "{err}"
    );
}

/// The agent spawns, then the stream port fails: the spawn is an error, and the process
/// it started is killed rather than left holding the agent's buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_whose_streams_fail_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let _agent = vmkit_agent::start(
        &vmkit_agent::Listen::Unix(dir.path().into()),
        vmkit_agent::Limits::default(),
    )
    .unwrap();
    let addr = GuestAddr::Unix {
        dir: dir.path().into(),
        port: AGENT_PORT,
    };
    // A real client to the real agent, dialled on this runtime; the mock hands it out.
    let client = vmkit_vsock::connect_ttrpc(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut guest = MockGuestCommunicator::new();
    guest.expect_client().returning(move || Ok(client.clone()));
    guest.expect_start_stream().returning(|port| {
        Err(CoreError::Backend {
            op: format!("start_stream {port}"),
            source: "the stream port is gone".into(),
        })
    });
    let p = Processes::new(Arc::new(guest));
    let deadline = Duration::from_secs(5);
    let err = p
        .spawn(&Command::new(["sleep", "600"]), deadline)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Guest { .. }), "{err:?}");
    assert!(err.to_string().contains("attach"), "{err}");
    let left = async {
        loop {
            let listed = p.list(deadline).await.unwrap();
            if listed.iter().all(|l| l.exited) {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let listed = tokio::time::timeout(Duration::from_secs(5), left)
        .await
        .expect("the orphaned spawn was killed");
    assert_eq!(listed.len(), 1, "{listed:?}");
}
