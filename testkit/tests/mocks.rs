//! The mocks as a downstream runtime uses them: its cleanup path after a failed start,
//! and the two ways a mock fails a test (a call nobody expected, an expected call that
//! never came), so that a test written with them can fail.
#![cfg(feature = "mocks")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::time::Duration;

use vmkit_core::{Error, ExitInfo, Instance, StartOptions};
use vmkit_testkit::mocks::MockInstance;

/// Downstream code: start, and on failure make sure the VM is stopped (and report the
/// start's error, not the shutdown's).
async fn start_or_clean_up(vm: &dyn Instance) -> vmkit_core::Result<()> {
    if let Err(e) = vm.start(StartOptions::new()).await {
        let _ = vm.shutdown().await;
        return Err(e);
    }
    Ok(())
}

#[tokio::test]
async fn a_failed_start_is_cleaned_up_exactly_once() {
    let mut vm = MockInstance::new();
    vm.expect_start().times(1).returning(|_| {
        Err(Error::Timeout {
            op: "start: waiting for the guest agent to answer Ping".into(),
            after: Duration::from_secs(30),
        })
    });
    vm.expect_shutdown()
        .times(1)
        .returning(|| Ok(ExitInfo::never_started()));
    let err = start_or_clean_up(&vm).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}

#[tokio::test]
#[should_panic(expected = "No matching expectation found")]
async fn a_call_nobody_expected_fails_the_test() {
    let vm = MockInstance::new();
    let _ = vm.pause().await;
}

#[test]
#[should_panic(expected = "called 0 time(s) which is fewer than expected 1")]
fn an_expected_call_that_never_came_fails_the_test() {
    let mut vm = MockInstance::new();
    vm.expect_shutdown()
        .times(1)
        .returning(|| Ok(ExitInfo::never_started()));
    drop(vm); // the expectation is checked here
}
