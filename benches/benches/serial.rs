//! The guest channel over virtio-serial beside hybrid vsock, in one run: two VMs of the
//! test guest (one per transport), measured in turns so that both see the same machine.
//!
//! - latency: a TTRPC `Ping` through vmkit's cached agent client;
//! - throughput: 32 MiB through `QemuInstance::open_stream` (echo), both directions at
//!   once.
//!
//! Target (issue 16): virtio-serial `Ping` p50 within 1.5x of hybrid vsock's. Both
//! throughputs are reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_benches::percentile;
use vmkit_core::{GuestTransport, Instance, StartOptions};
use vmkit_proto::StreamHeader;
use vmkit_proto::agent::PingRequest;
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

const ROUNDS: usize = 4;
const PINGS: usize = 250;
const STREAM_BYTES: usize = 32 << 20;

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let ok = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let hybrid = boot(&image, &dir.path().join("hybrid"), None).await;
        let serial = boot(
            &image,
            &dir.path().join("serial"),
            Some(GuestTransport::VirtioSerial),
        )
        .await;
        let (mut pings, mut rates) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for _ in 0..ROUNDS {
            for (n, vm) in [&hybrid, &serial].into_iter().enumerate() {
                pings[n].extend(ping(vm).await);
                rates[n].push(throughput(vm).await);
            }
        }
        for v in pings.iter_mut() {
            v.sort();
        }
        for r in rates.iter_mut() {
            r.sort_by(f64::total_cmp);
        }
        let p50 = |v: &[Duration]| percentile(v, 50.0).unwrap();
        let (hp, sp) = (p50(&pings[0]), p50(&pings[1]));
        let ratio = sp.as_secs_f64() / hp.as_secs_f64();
        let median = |r: &[f64]| r[r.len() / 2];
        println!(
            "guest channel, virtio-serial beside hybrid vsock (TCG, {ROUNDS} rounds in turns)"
        );
        println!(
            "  Ping p50        : hybrid vsock {hp:?}  virtio-serial {sp:?}  ratio {ratio:.2} (target <= 1.5)"
        );
        println!(
            "  32 MiB echo     : hybrid vsock {:.1} MiB/s  virtio-serial {:.1} MiB/s",
            median(&rates[0]),
            median(&rates[1])
        );
        vmkit_benches::Row::new(
            "serial",
            "TTRPC Ping p50, virtio-serial",
            "µs",
            sp.as_secs_f64() * 1e6,
            pings[1].len(),
        )
        .against("the same over hybrid vsock", hp.as_secs_f64() * 1e6)
        .ratio_at_most(1.5)
        .record();
        vmkit_benches::Row::new(
            "serial",
            "32 MiB stream echo, virtio-serial",
            "MiB/s",
            median(&rates[1]),
            ROUNDS,
        )
        .against("the same over hybrid vsock", median(&rates[0]))
        .record();
        hybrid.shutdown().await.unwrap();
        serial.shutdown().await.unwrap();
        ratio <= 1.5
    });
    vmkit_benches::finish(ok);
}

async fn boot(
    image: &GuestImage,
    state: &std::path::Path,
    transport: Option<GuestTransport>,
) -> QemuInstance {
    let mut config = image.config("bench", state);
    if let Some(transport) = transport {
        config.transport = transport;
    }
    let vm = QemuBackend.create_instance(config).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    vm
}

/// `PINGS` round trips on the cached client (after a few to warm it).
async fn ping(vm: &QemuInstance) -> Vec<Duration> {
    let agent = vm.agent().await.unwrap();
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    for _ in 0..10 {
        agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    }
    let mut took = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        agent.ping(ctx(), &PingRequest::new()).await.unwrap();
        took.push(t.elapsed());
    }
    took
}

/// MiB/s of `STREAM_BYTES` through an echo stream, written and read at once.
async fn throughput(vm: &QemuInstance) -> f64 {
    let stream = vm.open_stream(&StreamHeader::Echo).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let chunk = vec![0x5au8; 64 << 10];
    let t = Instant::now();
    let writer = async move {
        let mut sent = 0;
        while sent < STREAM_BYTES {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got += n;
        }
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got, STREAM_BYTES);
    (STREAM_BYTES as f64 / f64::from(1 << 20)) / t.elapsed().as_secs_f64()
}
