//! The agent over a serial link (its host test mode: a Unix socket stands in for the
//! virtio-serial port, as QEMU's chardev socket is on the host): TTRPC calls and a raw
//! stream at once over the one link, and an agent restart that fails the old channels
//! at once while new ones reach the new agent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use vmkit_agent::{Limits, Listen, SerialEnd};
use vmkit_proto::agent::{GuestInfoRequest, PingRequest};
use vmkit_proto::{AGENT_PORT, AgentClient, STREAM_PORT, StreamHeader};
use vmkit_serial::{Channel, Mux, Side};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

/// Opens a channel, retrying while the agent is not there yet or restarted.
async fn open(mux: &Mux, port: u32) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mux.open(port, Duration::from_millis(500)).await {
            Ok(channel) => return channel,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn client(channel: Channel) -> AgentClient {
    AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(channel),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttrpc_and_a_stream_share_the_link_and_survive_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("port.sock");
    // The host's side of the "port": QEMU's chardev listens, the agent's end connects.
    let listener = UnixListener::bind(&port).unwrap();
    let end = Listen::Serial(SerialEnd::Socket(port.clone()));
    let agent = vmkit_agent::start(&end, Limits::default()).unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let (host, _) = Mux::new(conn, Side::Host);

    let rpc = client(open(&host, AGENT_PORT).await);
    rpc.ping(ctx(), &PingRequest::new()).await.unwrap();
    // A stream and calls at once.
    let stream = open(&host, STREAM_PORT).await;
    let mut echo = vmkit_vsock::begin_stream(
        stream,
        &StreamHeader::Echo,
        Duration::from_secs(5),
        "serial",
    )
    .await
    .unwrap();
    let payload: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut echo);
    let sent = payload.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let calls = async {
        for _ in 0..20 {
            let info = rpc
                .guest_info(ctx(), &GuestInfoRequest::new())
                .await
                .unwrap();
            assert!(!info.kernel_release.is_empty());
        }
    };
    let ((), back, ()) = tokio::join!(writer, reader, calls);
    assert!(back == payload, "the stream's bytes changed");

    // The agent restarts: its end reconnects and says hello with a new epoch.
    drop(agent);
    let agent = vmkit_agent::start(&end, Limits::default()).unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let began = Instant::now();
    let stale = rpc.ping(ctx(), &PingRequest::new()).await;
    assert!(stale.is_err(), "a call on the old agent's channel fails");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    let (host, _) = Mux::new(conn, Side::Host);
    let rpc = client(open(&host, AGENT_PORT).await);
    rpc.ping(ctx(), &PingRequest::new()).await.unwrap();
    drop(agent);
}

#[tokio::test]
async fn a_port_the_agent_does_not_serve_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("port.sock");
    let listener = UnixListener::bind(&port).unwrap();
    let _agent = vmkit_agent::start(
        &Listen::Serial(SerialEnd::Socket(port.clone())),
        Limits::default(),
    )
    .unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let (host, _) = Mux::new(conn, Side::Host);
    let err = host.open(4000, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "port 4000: refused: nothing serves port 4000"
    );
}
