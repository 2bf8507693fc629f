//! vmkit-qmp against the testkit's MockQmpServer: the faults a real QEMU cannot be made
//! to produce on demand. Each test asserts what the caller sees.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::time::{Duration, Instant};

use serde_json::json;
use vmkit_qmp::{CommandIds, Error, Event, QmpClient, QmpOptions, qapi_qmp};
use vmkit_testkit::{Greeting, MockQmpServer, MockReply};

struct Setup {
    _dir: tempfile::TempDir,
    server: MockQmpServer,
    qmp: QmpClient,
}

fn opts(ids: CommandIds) -> QmpOptions {
    QmpOptions {
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        command_ids: ids,
        ..QmpOptions::default()
    }
}

async fn setup_with(ids: CommandIds) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server = MockQmpServer::start(dir.path().join("qmp.sock"))
        .await
        .unwrap();
    let qmp = QmpClient::connect(server.path(), opts(ids)).await.unwrap();
    Setup {
        _dir: dir,
        server,
        qmp,
    }
}

async fn setup() -> Setup {
    setup_with(CommandIds::default()).await
}

async fn status(qmp: &QmpClient) -> vmkit_qmp::Result<qapi_qmp::StatusInfo> {
    qmp.execute(qapi_qmp::query_status {}).await
}

#[tokio::test]
async fn negotiates_oob_and_sends_compact_commands() {
    for (ids, expected) in [
        (CommandIds::WhenNeeded, r#"{"execute":"query-status"}"#),
        (CommandIds::Always, r#"{"execute":"query-status","id":0}"#),
    ] {
        let s = setup_with(ids).await;
        assert!(s.qmp.oob_enabled());
        assert_eq!(s.qmp.version().major, 10);
        status(&s.qmp).await.unwrap();
        let received = s.server.received();
        assert_eq!(
            received[0].line,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
        );
        assert_eq!(received[1].line, expected);
    }
}

#[tokio::test]
async fn without_oob_on_offer_none_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        MockQmpServer::with_greeting(dir.path().join("q.sock"), Greeting::Qemu { oob: false })
            .await
            .unwrap();
    let qmp = QmpClient::connect(server.path(), opts(CommandIds::default()))
        .await
        .unwrap();
    assert!(!qmp.oob_enabled());
    assert_eq!(
        server.received()[0].line,
        r#"{"execute":"qmp_capabilities"}"#
    );
}

#[tokio::test]
async fn connect_retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let connecting = tokio::spawn({
        let path = path.clone();
        async move { QmpClient::connect(&path, opts(CommandIds::default())).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _server = MockQmpServer::start(&path).await.unwrap();
    let qmp = connecting.await.unwrap().unwrap();
    assert!(status(&qmp).await.unwrap().running);
}

#[tokio::test]
async fn connect_gives_up_at_the_deadline_and_says_how_often_it_tried() {
    let dir = tempfile::tempdir().unwrap();
    let opts = QmpOptions {
        connect_timeout: Duration::from_millis(200),
        ..QmpOptions::default()
    };
    let started = Instant::now();
    let err = QmpClient::connect(dir.path().join("never.sock"), opts)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(300));
    let text = err.to_string();
    assert!(text.contains("no QMP server after"), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
    // Backoff starts at 1 ms: well over 5 attempts fit in 200 ms.
    let attempts: u32 = text
        .split("after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts > 5, "{text}");
}

#[tokio::test]
async fn a_server_that_never_greets_fails_the_handshake_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockQmpServer::with_greeting(dir.path().join("q.sock"), Greeting::None)
        .await
        .unwrap();
    let opts = QmpOptions {
        connect_timeout: Duration::from_millis(200),
        ..QmpOptions::default()
    };
    let err = QmpClient::connect(server.path(), opts).await.unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("no greeting and capabilities within 200ms")
    );
}

#[tokio::test]
async fn a_greeting_that_is_not_qmp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockQmpServer::with_greeting(
        dir.path().join("q.sock"),
        Greeting::Raw("SSH-2.0-OpenSSH_9.2".into()),
    )
    .await
    .unwrap();
    let err = QmpClient::connect(server.path(), opts(CommandIds::default()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("waiting for the greeting: a line is not a QMP JSON object"),
        "{text}"
    );
}

#[tokio::test]
async fn qmp_errors_keep_class_and_text() {
    let s = setup().await;
    s.server.on(
        "device_add",
        MockReply::error("GenericError", "Bus 'rp0' does not support hotplugging"),
    );
    let err = s
        .qmp
        .execute_raw("device_add", Some(json!({"driver": "virtio-blk-pci"})))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "device_add: QMP error GenericError: Bus 'rp0' does not support hotplugging"
    );
    assert!(
        status(&s.qmp).await.is_ok(),
        "the connection survives a QMP error"
    );
}

#[tokio::test]
async fn a_hung_command_times_out_alone_and_its_late_reply_is_discarded() {
    for ids in [CommandIds::WhenNeeded, CommandIds::Always] {
        let s = setup_with(ids).await;
        s.server.on_once(
            "query-status",
            MockReply::ok(json!({"running": false, "status": "paused"}))
                .delayed(Duration::from_millis(400)),
        );
        let started = Instant::now();
        let err = s
            .qmp
            .execute_with_timeout(qapi_qmp::query_status {}, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(started.elapsed() < Duration::from_millis(200));
        // The next command waits behind the late reply, which goes nowhere.
        let next = status(&s.qmp).await.unwrap();
        assert!(next.running, "{ids:?}: got the abandoned command's reply");
        assert!(s.qmp.closed_reason().is_none());
    }
}

#[tokio::test]
async fn never_answered_commands_end_at_their_deadline() {
    let s = setup().await;
    s.server.on("cont", MockReply::never());
    let started = Instant::now();
    let err = s
        .qmp
        .execute_with_timeout(qapi_qmp::cont {}, Duration::from_millis(150))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cont: no reply within 150ms (command #0 on this connection)"
    );
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[tokio::test]
async fn sixty_four_callers_get_their_own_replies_delivered_out_of_order() {
    let s = setup_with(CommandIds::Always).await;
    // Each echo is answered after 64 - n ms: the last sent is answered first.
    s.server.on(
        "echo",
        MockReply::from_fn(|cmd| {
            let n = cmd.arguments["n"].as_u64().unwrap();
            MockReply::ok(json!({"n": n}))
                .delayed(Duration::from_millis(64 - n))
                .out_of_order()
        }),
    );
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64u64)
        .map(|n| {
            let qmp = s.qmp.clone();
            let finished = std::sync::Arc::clone(&finished);
            tokio::spawn(async move {
                let reply = qmp
                    .execute_raw("echo", Some(json!({"n": n})))
                    .await
                    .unwrap();
                let rank = finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (n, reply["n"].as_u64().unwrap(), rank)
            })
        })
        .collect();
    let mut rank_of = vec![0; 64];
    for task in tasks {
        let (sent, got, rank) = task.await.unwrap();
        assert_eq!(sent, got, "caller {sent} got caller {got}'s reply");
        rank_of[usize::try_from(sent).unwrap()] = rank;
    }
    assert_eq!(s.server.received_commands().len(), 64);
    // The replies really came out of order: the last caller (1 ms) beat the first (64 ms).
    assert!(
        rank_of[63] < rank_of[0],
        "replies arrived in order: {rank_of:?}"
    );
}

async fn expect_disconnect(s: &Setup, reason_starts: &str) {
    let err = status(&s.qmp).await.unwrap_err();
    assert!(err.is_disconnected(), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "query-status: QMP connection lost: {reason_starts}"
        )),
        "{text}"
    );
    // And the connection stays closed for later callers, with the same reason.
    let later = status(&s.qmp).await.unwrap_err();
    assert_eq!(later.to_string(), text);
}

#[tokio::test]
async fn a_line_that_is_not_json_ends_the_connection_with_the_line_quoted() {
    let s = setup().await;
    s.server
        .on_once("query-status", MockReply::raw("this is not json\n"));
    expect_disconnect(&s, "a line is not a QMP JSON object").await;
    assert!(
        s.qmp
            .closed_reason()
            .unwrap()
            .ends_with("\"this is not json\"")
    );
}

#[tokio::test]
async fn a_reply_with_an_unknown_id_ends_the_connection() {
    let s = setup_with(CommandIds::Always).await;
    s.server.on_once(
        "query-status",
        MockReply::raw("{\"return\":{},\"id\":999}\n"),
    );
    expect_disconnect(
        &s,
        "a reply matches no command in flight: it carries id 999",
    )
    .await;
}

#[tokio::test]
async fn a_reply_without_a_command_ends_the_connection() {
    let s = setup().await;
    assert!(s.server.send_raw("{\"return\":{}}\n"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    expect_disconnect(&s, "a reply matches no command in flight: it carries no id").await;
}

#[tokio::test]
async fn an_oversized_message_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = MockQmpServer::start(dir.path().join("q.sock"))
        .await
        .unwrap();
    let qmp = QmpClient::connect(
        server.path(),
        QmpOptions {
            max_message_size: 4096,
            ..opts(CommandIds::default())
        },
    )
    .await
    .unwrap();
    let huge = format!("{{\"return\":\"{}\"}}\n", "x".repeat(10_000));
    server.on_once("query-status", MockReply::raw(huge));
    let s = Setup {
        _dir: dir,
        server,
        qmp,
    };
    expect_disconnect(&s, "a message exceeded the 4096-byte limit").await;
}

#[tokio::test]
async fn eof_in_mid_reply_fails_the_waiter_clearly() {
    let s = setup().await;
    s.server
        .on_once("query-status", MockReply::disconnect_mid_reply());
    expect_disconnect(&s, "QEMU closed the connection in the middle of a message").await;
}

#[tokio::test]
async fn a_dead_connection_fails_every_waiter_at_once_and_tells_subscribers() {
    let s = setup().await;
    s.server.on("stop", MockReply::never());
    let mut events = s.qmp.events();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let qmp = s.qmp.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = qmp
                    .execute_with_timeout(qapi_qmp::stop {}, Duration::from_secs(30))
                    .await;
                (r, started.elapsed())
            })
        })
        .collect();
    assert!(
        s.server
            .wait_for_connections(1, Duration::from_secs(1))
            .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.server.disconnect();
    for w in waiters {
        let (result, took) = w.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            "stop: QMP connection lost: QEMU closed the connection"
        );
        assert!(took < Duration::from_secs(2), "a waiter hung for {took:?}");
    }
    let event = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(event, Event::Disconnected { ref reason } if reason == "QEMU closed the connection")
    );
}

#[tokio::test]
async fn an_unknown_event_is_delivered_raw_and_the_stream_goes_on() {
    let s = setup().await;
    let mut events = s.qmp.events();
    assert!(
        s.server
            .emit_event("VMKIT_FUTURE_EVENT", json!({"answer": 42}))
    );
    assert!(s.server.emit_event("STOP", json!({})));
    let first = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .unwrap()
        .unwrap();
    match first {
        Event::Unknown {
            name,
            data,
            timestamp,
        } => {
            assert_eq!(name, "VMKIT_FUTURE_EVENT");
            assert_eq!(data, json!({"answer": 42}));
            assert!(timestamp.seconds > 1_700_000_000);
        }
        other => panic!("{other:?}"),
    }
    let second = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&second, Event::Qmp { name, event, .. } if name == "STOP" && matches!(**event, qapi_qmp::Event::STOP { .. })),
        "{second:?}"
    );
}

#[tokio::test]
async fn a_known_event_with_an_unknown_value_arrives_raw() {
    let s = setup().await;
    let mut events = s.qmp.events();
    // A SHUTDOWN reason newer than the schema: typed parsing fails, raw delivery works.
    s.server.emit_event(
        "SHUTDOWN",
        json!({"guest": true, "reason": "vmkit-new-reason"}),
    );
    let event = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .unwrap()
        .unwrap();
    match event {
        Event::Unknown { name, data, .. } => {
            assert_eq!(name, "SHUTDOWN");
            assert_eq!(data["reason"], "vmkit-new-reason");
        }
        other => panic!("{other:?}"),
    }
    assert!(status(&s.qmp).await.is_ok());
}

#[tokio::test]
async fn a_reply_of_the_wrong_shape_is_a_decode_error_not_a_panic() {
    let s = setup().await;
    s.server
        .on_once("query-status", MockReply::ok(json!({"running": "yes"})));
    let err = status(&s.qmp).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("query-status: unexpected reply {"),
        "{err}"
    );
    assert!(status(&s.qmp).await.is_ok());
}
