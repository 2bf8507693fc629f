//! QMP latency and throughput: vmkit-qmp against a minimal raw JSON-lines client, on one
//! paused real QEMU with two QMP monitors, in one process, interleaved.
//!
//! Targets (issue 3): sequential `query-status` p50 within 1.1x of the raw client's;
//! 16 concurrent callers at least 1.8x the raw client's sequential throughput.
//!
//! The raw client is also run pipelined, with `oob` negotiated and 8 or 16 commands on
//! the wire: what QEMU itself allows with no client overhead at all. On the 2-core
//! machines this was built on, QEMU's two threads (the monitor I/O thread reading one
//! byte per system call, the main loop dispatching) take ~87% of the CPU and cap that
//! raw pipeline at 1.5–1.65x sequential; vmkit-qmp's 16 callers reach the same or a
//! little more (1.47–1.70x).

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
const CONCURRENT_CALLS_EACH: usize = 50;
const THROUGHPUT_ROUNDS: usize = 5;
/// Pipelining windows of the raw client: QEMU queues up to 8 in-band commands.
const CEILING_WINDOWS: [usize; 2] = [8, 16];

/// The baseline: write a command line, read lines until a reply, parse it. No ids, no
/// tasks, no timeouts.
struct RawClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    line: String,
}

impl RawClient {
    /// Connects and negotiates; `oob` asks for the capability that lets QEMU queue
    /// commands (without it QEMU reads no further until it has answered).
    async fn connect(path: &Path, oob: bool) -> RawClient {
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
        let negotiate: &[u8] = if oob {
            b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n"
        } else {
            b"{\"execute\":\"qmp_capabilities\"}\n"
        };
        let reply = client.command(negotiate).await;
        assert!(reply.get("return").is_some(), "{reply}");
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

    /// `calls` query-status with up to `window` on the wire at once: the most QEMU
    /// itself allows, with no routing, tasks or timeouts on our side.
    async fn pipelined(&mut self, calls: usize, window: usize) {
        const CMD: &[u8] = b"{\"execute\":\"query-status\"}\n";
        let mut sent = 0;
        for _ in 0..window.min(calls) {
            self.writer.write_all(CMD).await.unwrap();
            sent += 1;
        }
        for _ in 0..calls {
            self.read_reply().await;
            if sent < calls {
                self.writer.write_all(CMD).await.unwrap();
                sent += 1;
            }
        }
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
    let Some(binary) = require_qemu() else { return };
    let runtime = vmkit_benches::runtime().unwrap();
    let mut ok = true;
    for ids in [CommandIds::WhenNeeded, CommandIds::Always] {
        let met = runtime.block_on(run(&binary, ids));
        // The targets apply to the default; `Always` is measured to show what ids cost.
        if ids == CommandIds::default() {
            ok = met;
        }
    }
    vmkit_benches::finish(ok);
}

async fn run(binary: &Path, command_ids: CommandIds) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let raw_socket = dir.path().join("raw.sock");
    let pipe_socket = dir.path().join("pipe.sock");
    let monitor = |path: &Path| format!("unix:{},server=on,wait=off", path.display());
    let qemu = PausedQemu::spawn(
        binary,
        &dir.path().join("qmp.sock"),
        &[
            "-qmp",
            &monitor(&raw_socket),
            "-qmp",
            &monitor(&pipe_socket),
        ],
    )
    .unwrap();
    let opts = QmpOptions {
        connect_timeout: Duration::from_secs(30),
        command_ids,
        ..QmpOptions::default()
    };
    let qmp = QmpClient::connect(qemu.qmp_path(), opts).await.unwrap();
    let mut raw = RawClient::connect(&raw_socket, false).await;
    let mut pipe = RawClient::connect(&pipe_socket, true).await;
    let role_has_targets = command_ids == CommandIds::default();
    let role = if role_has_targets {
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
    let latency_row = vmkit_benches::Row::new(
        "qmp",
        &format!("query-status latency p50 (CommandIds::{command_ids:?})"),
        "µs",
        micros(o50),
        SEQUENTIAL,
    )
    .against("raw JSON-lines client", micros(b50));
    if role_has_targets {
        latency_row.ratio_at_most(1.10).record();
    } else {
        latency_row.record();
    }

    // Throughput, in interleaved rounds so that drift on a noisy machine hits both
    // sides alike: the raw client sequentially, then 16 concurrent vmkit callers, then
    // the raw client keeping `window` commands on the wire (what QEMU itself allows).
    let calls_per_round = CONCURRENT_CALLERS * CONCURRENT_CALLS_EACH;
    let (mut raw_time, mut ours_time) = (Duration::ZERO, Duration::ZERO);
    let mut ceiling_time = [Duration::ZERO; CEILING_WINDOWS.len()];
    for _ in 0..THROUGHPUT_ROUNDS {
        let t = Instant::now();
        for _ in 0..calls_per_round {
            raw.query_status().await;
        }
        raw_time += t.elapsed();
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
        ours_time += t.elapsed();
        for (window, time) in CEILING_WINDOWS.iter().zip(&mut ceiling_time) {
            let t = Instant::now();
            pipe.pipelined(calls_per_round, *window).await;
            *time += t.elapsed();
        }
    }
    let calls = (calls_per_round * THROUGHPUT_ROUNDS) as f64;
    let raw_rate = calls / raw_time.as_secs_f64();
    let ours_rate = calls / ours_time.as_secs_f64();
    let throughput_ratio = ours_rate / raw_rate;
    println!(
        "throughput, {THROUGHPUT_ROUNDS} interleaved rounds of {calls_per_round} query-status each:"
    );
    println!("  raw client, sequential           : {raw_rate:8.0} /s");
    println!("  vmkit-qmp, {CONCURRENT_CALLERS} concurrent callers : {ours_rate:8.0} /s");
    println!("  ratio (vmkit/raw)                : {throughput_ratio:.2}  (target >= 1.80)");
    let throughput_row = vmkit_benches::Row::new(
        "qmp",
        &format!("throughput, {CONCURRENT_CALLERS} callers (CommandIds::{command_ids:?})"),
        "/s",
        ours_rate,
        THROUGHPUT_ROUNDS,
    )
    .against("raw client, sequential", raw_rate);
    if role_has_targets {
        throughput_row.ratio_at_least(1.80).record();
    } else {
        throughput_row.record();
    }
    for (window, time) in CEILING_WINDOWS.iter().zip(ceiling_time) {
        let rate = calls / time.as_secs_f64();
        println!(
            "  raw client, oob, {window:2} on the wire: {rate:8.0} /s  ({:.2}x sequential)",
            rate / raw_rate
        );
    }

    let ok = latency_ratio <= 1.10 && throughput_ratio >= 1.80;
    println!("targets {}", if ok { "met" } else { "MISSED" });
    ok
}
