//! The process service on the test guest over hybrid vsock, in one run, interleaved
//! (issue 23):
//!
//! - spawn → exit of `true` through `vmkit-process` (SpawnProcess, three attach streams,
//!   WaitProcess) against today's `Exec` of `true` (one call);
//! - stdout throughput: 128 MiB from `dd` read through a process's stdout against the
//!   same `dd` on a raw exec stream (`VMKIT-STREAM/1 exec`, the stream port's own
//!   framing, nothing else). Target: at least 0.8x.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use vmkit_benches::percentile;
use vmkit_core::{Instance, StartOptions};
use vmkit_process::{Command, Processes};
use vmkit_proto::StreamHeader;
use vmkit_proto::agent::ExecRequest;
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::{qemu::require_qemu, require_guest_image};

const SPAWNS: usize = 40;
const DD_BYTES: u64 = 128 << 20;
const DD: [&str; 4] = ["dd", "if=/dev/zero", "bs=65536", "count=2048"];
const ROUNDS: usize = 2;

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let runtime = vmkit_benches::runtime().unwrap();
    let ok = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let vm = Arc::new(
            QemuBackend
                .create_instance(image.config("bench-proc", &dir.path().join("state")))
                .unwrap(),
        );
        vm.start(StartOptions::new()).await.unwrap();
        let phase = Duration::from_secs(300);
        tokio::time::timeout(phase, spawn_to_exit(&vm))
            .await
            .expect("the spawn phase hung for 300 s");
        let ok = tokio::time::timeout(phase, throughput(&vm))
            .await
            .expect("the throughput phase hung for 300 s");
        vm.shutdown().await.unwrap();
        ok
    });
    vmkit_benches::finish(ok);
}

async fn drain(mut from: impl AsyncRead + Unpin) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match from.read(&mut buf).await.unwrap() {
            0 => return n,
            k => n += k as u64,
        }
    }
}

/// Spawns `argv`, reads its outputs, waits: the bytes of stdout.
async fn run(p: &Processes, argv: &[&str]) -> u64 {
    let deadline = Duration::from_secs(120);
    let mut proc = p
        .spawn(&Command::new(argv.iter().copied()), deadline)
        .await
        .unwrap();
    let (out, err) = (proc.take_stdout().unwrap(), proc.take_stderr().unwrap());
    drop(proc.take_stdin());
    let (n, _, status) = tokio::join!(drain(out), drain(err), proc.wait(deadline));
    assert!(status.unwrap().success());
    n
}

async fn spawn_to_exit(vm: &Arc<QemuInstance>) {
    let p = Processes::new(vm.clone());
    let agent = vm.agent().await.unwrap();
    let mut exec = ExecRequest::new();
    exec.argv = vec!["true".into()];
    let ctx = || ttrpc::context::with_timeout(30_000_000_000);
    for _ in 0..5 {
        run(&p, &["true"]).await;
        agent.exec(ctx(), &exec).await.unwrap();
    }
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..SPAWNS {
        let t = Instant::now();
        run(&p, &["true"]).await;
        ours.push(t.elapsed());
        let t = Instant::now();
        let done = agent.exec(ctx(), &exec).await.unwrap();
        base.push(t.elapsed());
        assert_eq!(done.exit_code, 0);
    }
    ours.sort();
    base.sort();
    let ms = |v: &[Duration], q| percentile(v, q).unwrap().as_secs_f64() * 1e3;
    println!("spawn -> exit of `true` (TCG guest, hybrid vsock), {SPAWNS} each, interleaved:");
    println!(
        "  Exec (one call)                 : p50 {:6.2} ms  p99 {:6.2} ms",
        ms(&base, 50.0),
        ms(&base, 99.0)
    );
    println!(
        "  vmkit-process spawn/attach/wait : p50 {:6.2} ms  p99 {:6.2} ms",
        ms(&ours, 50.0),
        ms(&ours, 99.0)
    );
    println!(
        "  ratio p50 (process / Exec)      : {:.2}  (reported; no target)",
        ms(&ours, 50.0) / ms(&base, 50.0)
    );
    vmkit_benches::Row::new(
        "process",
        "spawn -> exit of `true` p50",
        "ms",
        ms(&ours, 50.0),
        SPAWNS,
    )
    .against("one Exec call", ms(&base, 50.0))
    .record();
}

async fn throughput(vm: &Arc<QemuInstance>) -> bool {
    let p = Processes::new(vm.clone());
    let (mut ours, mut base) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let n = run(&p, &DD).await;
        ours += t.elapsed();
        assert_eq!(n, DD_BYTES);

        let t = Instant::now();
        let argv = DD.iter().map(|s| (*s).to_owned()).collect();
        let stream = vm.open_stream(&StreamHeader::Exec { argv }).await.unwrap();
        // stdout and dd's closing lines on stderr, interleaved.
        let n = drain(stream).await;
        base += t.elapsed();
        assert!(n >= DD_BYTES, "{n} bytes from the exec stream");
    }
    #[allow(clippy::cast_precision_loss)] // figures to print
    let mib = (DD_BYTES as usize * ROUNDS) as f64 / f64::from(1u32 << 20);
    let (ours_rate, base_rate) = (mib / ours.as_secs_f64(), mib / base.as_secs_f64());
    let ratio = ours_rate / base_rate;
    println!("stdout throughput, {ROUNDS} x 128 MiB from dd, interleaved:");
    println!("  raw exec stream       : {base_rate:6.1} MiB/s");
    println!("  vmkit-process stdout  : {ours_rate:6.1} MiB/s");
    println!("  ratio (process / raw) : {ratio:.2}  (target >= 0.8)");
    vmkit_benches::Row::new(
        "process",
        "stdout throughput (128 MiB from dd)",
        "MiB/s",
        ours_rate,
        ROUNDS,
    )
    .against("raw exec stream", base_rate)
    .ratio_at_least(0.8)
    .record();
    ratio >= 0.8
}
