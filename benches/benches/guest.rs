//! Guest communication over hybrid vsock, on one VM of the test guest, in one run,
//! interleaved:
//!
//! - latency: a TTRPC `Ping` through vmkit's cached agent client, against the raw
//!   baseline: an 8-byte round trip on an echo stream that the bench drives by hand
//!   (one connection, `CONNECT 1026`, the header, then bare frames on the socket);
//! - throughput: 32 MiB through `QemuInstance::open_stream` (echo), against the same
//!   bytes written as bare frames on a hand-driven echo connection.
//!
//! Targets (issue 5): `Ping` p50 within 1.5x of the raw echo round trip; stream
//! throughput at least 0.7x of the raw echo's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmkit_benches::percentile;
use vmkit_core::{Instance, StartOptions};
use vmkit_proto::agent::PingRequest;
use vmkit_proto::framed::MAX_FRAME;
use vmkit_proto::{AgentClient, StreamHeader};
use vmkit_qemu::QemuBackend;
use vmkit_testkit::{qemu::require_qemu, require_guest_image};

const PINGS: usize = 1000;
const STREAM_BYTES: usize = 32 << 20;
const STREAM_ROUNDS: usize = 3;

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let ok = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let vm = QemuBackend
            .create_instance(image.config("bench", &dir.path().join("state")))
            .unwrap();
        vm.start(StartOptions::new()).await.unwrap();
        let uds = vm.config().layout().vsock_socket();
        // Nothing here may hang: each phase has a generous deadline.
        let phase = Duration::from_secs(120);
        let latency_ok = tokio::time::timeout(phase, latency(&vm, &uds))
            .await
            .expect("the latency phase hung for 120 s");
        let throughput_ok = tokio::time::timeout(phase, throughput(&vm, &uds))
            .await
            .expect("the throughput phase hung for 120 s");
        let ok = latency_ok && throughput_ok;
        vm.shutdown().await.unwrap();
        ok
    });
    vmkit_benches::finish(ok);
}

/// The baseline's connection: `CONNECT 1026`, the echo header, both answers.
async fn raw_echo(uds: &Path) -> UnixStream {
    let mut conn = UnixStream::connect(uds).await.unwrap();
    conn.write_all(b"CONNECT 1026\n").await.unwrap();
    // "OK <port>\n" from the daemon.
    while conn.read_u8().await.unwrap() != b'\n' {}
    conn.write_all(&StreamHeader::Echo.encode().unwrap())
        .await
        .unwrap();
    // "OK\n" from the agent.
    while conn.read_u8().await.unwrap() != b'\n' {}
    conn
}

async fn latency(vm: &vmkit_qemu::QemuInstance, uds: &Path) -> bool {
    let agent: AgentClient = vm.agent().await.unwrap();
    let mut raw = raw_echo(uds).await;
    let frame = [0u8, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut back = [0u8; 12];
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    let req = PingRequest::new();
    for _ in 0..50 {
        agent.ping(ctx(), &req).await.unwrap();
        raw.write_all(&frame).await.unwrap();
        raw.read_exact(&mut back).await.unwrap();
    }
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..PINGS {
        let t = Instant::now();
        agent.ping(ctx(), &req).await.unwrap();
        ours.push(t.elapsed());
        let t = Instant::now();
        raw.write_all(&frame).await.unwrap();
        raw.read_exact(&mut back).await.unwrap();
        base.push(t.elapsed());
        assert_eq!(back, frame);
    }
    ours.sort();
    base.sort();
    let p = |v: &[Duration], q| percentile(v, q).unwrap().as_secs_f64() * 1e6;
    let ratio = p(&ours, 50.0) / p(&base, 50.0);
    println!("round trip over hybrid vsock (TCG guest), {PINGS} each, interleaved:");
    println!(
        "  raw echo, 8 bytes : p50 {:7.1} µs  p99 {:7.1} µs",
        p(&base, 50.0),
        p(&base, 99.0)
    );
    println!(
        "  TTRPC Ping        : p50 {:7.1} µs  p99 {:7.1} µs",
        p(&ours, 50.0),
        p(&ours, 99.0)
    );
    println!("  ratio p50 (Ping / raw echo) : {ratio:.2}  (target <= 1.5)");
    vmkit_benches::Row::new(
        "guest",
        "TTRPC Ping p50, hybrid vsock",
        "µs",
        p(&ours, 50.0),
        PINGS,
    )
    .against("raw hybrid-vsock echo round trip", p(&base, 50.0))
    .ratio_at_most(1.5)
    .record();
    ratio <= 1.5
}

async fn throughput(vm: &vmkit_qemu::QemuInstance, uds: &Path) -> bool {
    let data: Vec<u8> = (0..STREAM_BYTES).map(|i| (i % 251) as u8).collect();
    let (mut ours, mut base) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..STREAM_ROUNDS {
        // vmkit: the framed stream, written and read at once.
        let t = Instant::now();
        let stream = vm.open_stream(&StreamHeader::Echo).await.unwrap();
        let (mut read, mut write) = tokio::io::split(stream);
        let send = async {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut back = Vec::with_capacity(STREAM_BYTES);
        let (_, got) = tokio::join!(send, read.read_to_end(&mut back));
        got.unwrap();
        ours += t.elapsed();
        assert!(back == data);

        // Baseline: bare frames on a hand-driven connection.
        let t = Instant::now();
        let conn = raw_echo(uds).await;
        let (mut read, mut write) = conn.into_split();
        let send = async {
            for chunk in data.chunks(MAX_FRAME) {
                write
                    .write_all(&(chunk.len() as u32).to_be_bytes())
                    .await
                    .unwrap();
                write.write_all(chunk).await.unwrap();
            }
            write.write_all(&[0; 4]).await.unwrap();
        };
        let receive = async {
            let mut total = 0;
            let mut header = [0u8; 4];
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                read.read_exact(&mut header).await.unwrap();
                let len = u32::from_be_bytes(header) as usize;
                if len == 0 {
                    return total;
                }
                read.read_exact(&mut buf[..len]).await.unwrap();
                total += len;
            }
        };
        let (_, total) = tokio::join!(send, receive);
        base += t.elapsed();
        assert_eq!(total, STREAM_BYTES);
    }
    let mib = (STREAM_BYTES * STREAM_ROUNDS) as f64 / f64::from(1u32 << 20);
    let (ours_rate, base_rate) = (mib / ours.as_secs_f64(), mib / base.as_secs_f64());
    let ratio = ours_rate / base_rate;
    println!("echo throughput, {STREAM_ROUNDS} x 32 MiB each way, interleaved:");
    println!("  raw frames by hand   : {base_rate:6.1} MiB/s");
    println!("  vmkit open_stream    : {ours_rate:6.1} MiB/s");
    println!("  ratio (vmkit / raw)  : {ratio:.2}  (target >= 0.7)");
    vmkit_benches::Row::new(
        "guest",
        "stream echo throughput, hybrid vsock",
        "MiB/s",
        ours_rate,
        STREAM_ROUNDS,
    )
    .against("raw frames on a hand-driven connection", base_rate)
    .ratio_at_least(0.7)
    .record();
    ratio >= 0.7
}
