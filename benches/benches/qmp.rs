//! QMP latency and throughput: vmkit-qmp against a minimal raw JSON-lines client, on one
//! paused real QEMU with two QMP monitors, in one process, interleaved.
//!
//! Targets (issue 3): sequential `query-status` p50 within 1.1x of the raw client's;
//! 16 concurrent callers at least 1.8x the raw client's sequential throughput.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step should panic

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmkit_benches::percentile;
use vmkit_qmp::{CommandIds, QmpClient, QmpOptions, qapi_qmp};
use vmkit_testkit::qemu::{PausedQemu, require_qemu};

const SEQUENTIAL: usize = 2000;
const CONCURRENT_CALLERS: usize = 16;
const CONCURRENT_CALLS_EACH: usize = 250;

/// The baseline: write a command line, read lines until a reply, parse it. No ids, no
/// tasks, no timeouts.
struct RawClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    line: String,
}

impl RawClient {
    async fn connect(path: &Path) -> RawClient {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut client = RawClient {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        };
        client.read_reply().await; // greeting
        client
            .command(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await;
        client
    }

    async fn read_reply(&mut self) -> serde_json::Value {
        loop {
            self.line.clear();
            self.reader.read_line(&mut self.line).await.unwrap();
            let value: serde_json::Value = serde_json::from_str(&self.line).unwrap();
            if value.get("event").is_none() {
                return value;
            }
        }
    }

    async fn command(&mut self, bytes: &[u8]) -> serde_json::Value {
        self.writer.write_all(bytes).await.unwrap();
        self.read_reply().await
    }

    async fn query_status(&mut self) -> bool {
        let reply = self.command(b"{\"execute\":\"query-status\"}\n").await;
        reply["return"]["running"].as_bool().unwrap()
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let Some(binary) = require_qemu() else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut ok = true;
    for ids in [CommandIds::WhenNeeded, CommandIds::Always] {
        let met = runtime.block_on(run(&binary, ids));
        // The targets apply to the default; `Always` is measured to show what ids cost.
        if ids == CommandIds::default() {
            ok = met;
        }
    }
    if check && !ok {
        std::process::exit(1);
    }
}

async fn run(binary: &Path, command_ids: CommandIds) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let raw_socket = dir.path().join("raw.sock");
    let monitor = format!("unix:{},server=on,wait=off", raw_socket.display());
    let qemu =
        PausedQemu::spawn(binary, &dir.path().join("qmp.sock"), &["-qmp", &monitor]).unwrap();
    let opts = QmpOptions {
        connect_timeout: Duration::from_secs(30),
        command_ids,
        ..QmpOptions::default()
    };
    let qmp = QmpClient::connect(qemu.qmp_path(), opts).await.unwrap();
    let mut raw = RawClient::connect(&raw_socket).await;
    let role = if command_ids == CommandIds::default() {
        "the default; targets apply"
    } else {
        "for comparison: what ids cost"
    };
    println!(
        "\n== vmkit-qmp with CommandIds::{command_ids:?} ({role}); QEMU {}, oob: {} ==",
        qmp.version(),
        qmp.oob_enabled()
    );

    // Warm up both paths.
    for _ in 0..200 {
        qmp.execute(qapi_qmp::query_status {}).await.unwrap();
        raw.query_status().await;
    }

    // Sequential latency, interleaved so both see the same machine.
    let mut ours = Vec::with_capacity(SEQUENTIAL);
    let mut base = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        let time_ours = async || {
            let t = Instant::now();
            qmp.execute(qapi_qmp::query_status {}).await.unwrap();
            t.elapsed()
        };
        if i % 2 == 0 {
            ours.push(time_ours().await);
            let t = Instant::now();
            raw.query_status().await;
            base.push(t.elapsed());
        } else {
            let t = Instant::now();
            raw.query_status().await;
            base.push(t.elapsed());
            ours.push(time_ours().await);
        }
    }
    ours.sort();
    base.sort();
    let (o50, o99) = (
        percentile(&ours, 50.0).unwrap(),
        percentile(&ours, 99.0).unwrap(),
    );
    let (b50, b99) = (
        percentile(&base, 50.0).unwrap(),
        percentile(&base, 99.0).unwrap(),
    );
    let latency_ratio = o50.as_secs_f64() / b50.as_secs_f64();
    println!("sequential query-status, {SEQUENTIAL} calls each, interleaved:");
    println!(
        "  raw JSON-lines client : p50 {:7.1} µs  p99 {:7.1} µs",
        micros(b50),
        micros(b99)
    );
    println!(
        "  vmkit-qmp             : p50 {:7.1} µs  p99 {:7.1} µs",
        micros(o50),
        micros(o99)
    );
    println!("  ratio p50 (vmkit/raw) : {latency_ratio:.3}  (target <= 1.10)");

    // Throughput: the raw client sequentially, then 16 concurrent vmkit callers.
    let calls = CONCURRENT_CALLERS * CONCURRENT_CALLS_EACH;
    let t = Instant::now();
    for _ in 0..calls {
        raw.query_status().await;
    }
    let raw_rate = calls as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT_CALLERS)
        .map(|_| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                for _ in 0..CONCURRENT_CALLS_EACH {
                    qmp.execute(qapi_qmp::query_status {}).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let ours_rate = calls as f64 / t.elapsed().as_secs_f64();
    let throughput_ratio = ours_rate / raw_rate;
    println!("throughput, {calls} query-status:");
    println!("  raw client, sequential        : {raw_rate:8.0} /s");
    println!("  vmkit-qmp, {CONCURRENT_CALLERS} concurrent callers : {ours_rate:8.0} /s");
    println!("  ratio (vmkit/raw)             : {throughput_ratio:.2}  (target >= 1.80)");

    let ok = latency_ratio <= 1.10 && throughput_ratio >= 1.80;
    println!("targets {}", if ok { "met" } else { "MISSED" });
    ok
}
