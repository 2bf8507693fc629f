//! Backends that arrive at run time against the same backend linked in, in one run,
//! interleaved round by round: the QEMU backend static (`vmkit_qemu::QemuBackend`),
//! loaded from its library (`libvmkit_plugin_qemu.so`) and out of process
//! (`vmkit-backend-qemu`), each booting the test guest with its agent.
//!
//! Per transport: `start()` to agent-ready (start, then the first `Ping` through
//! `client()`), the agent `Ping` round trip on the cached client, and the cost of the
//! contract's cheap synchronous calls `state()` and `vm_info()`.
//!
//! Targets (issue 14): Ping and start-to-ready of each plugin transport within 1.05x of
//! the static backend's; the cheap calls are reported in µs. `cargo xtask bench` builds
//! the plugin library and executable (release) first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmkit_benches::percentile;
use vmkit_core::{Backend, StartOptions};
use vmkit_plugin::PluginBackend;
use vmkit_plugin::process::ProcessChannel;
use vmkit_testkit::{GuestImage, qemu::require_qemu, require_guest_image};

const ROUNDS: usize = 3;
const PINGS: usize = 200;
const CHEAP: usize = 1000;

/// What one boot measured.
#[derive(Default)]
struct Samples {
    ready: Vec<Duration>,
    ping: Vec<Duration>,
    state: Vec<Duration>,
    info: Vec<Duration>,
}

fn main() {
    let (Some(_), Some(image)) = (require_qemu(), require_guest_image()) else {
        return;
    };
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    let (library, executable) = (
        dir.join("libvmkit_plugin_qemu.so"),
        dir.join("vmkit-backend-qemu"),
    );
    for built in [&library, &executable] {
        assert!(
            built.exists(),
            "{} is missing: cargo build --release -p vmkit-plugin-qemu (cargo xtask bench does)",
            built.display()
        );
    }
    let runtime = vmkit_benches::runtime().unwrap();
    let process = ProcessChannel::launch(&executable, "qemu").unwrap();
    let backends: Vec<(&str, Arc<dyn Backend>)> = vec![
        ("static", Arc::new(vmkit_qemu::QemuBackend)),
        (
            "library",
            Arc::new(vmkit_plugin::loader::load(&library).unwrap()),
        ),
        (
            "process",
            Arc::new(PluginBackend::describe(Arc::clone(&process) as _).unwrap()),
        ),
    ];
    // One warm-up boot each (page cache, the sandbox probe), not counted.
    for (_, backend) in &backends {
        runtime.block_on(boot(backend.as_ref(), &image, &mut Samples::default()));
    }
    let mut samples: Vec<Samples> = backends.iter().map(|_| Samples::default()).collect();
    for _ in 0..ROUNDS {
        for ((_, backend), s) in backends.iter().zip(samples.iter_mut()) {
            runtime.block_on(boot(backend.as_ref(), &image, s));
        }
    }
    println!(
        "plugins: the QEMU backend static, from its library, out of process (TCG, {ROUNDS} boots each, interleaved)"
    );
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        percentile(v, 50.0).unwrap()
    };
    let mut medians = Vec::new();
    for ((name, _), s) in backends.iter().zip(samples.iter_mut()) {
        let m = (
            p50(&mut s.ready),
            p50(&mut s.ping),
            p50(&mut s.state),
            p50(&mut s.info),
        );
        println!(
            "  {name:<8}: start->agent ready p50 {:?}  Ping p50 {:?}  state() p50 {:.1} µs  vm_info() p50 {:.1} µs",
            m.0,
            m.1,
            m.2.as_secs_f64() * 1e6,
            m.3.as_secs_f64() * 1e6
        );
        medians.push(m);
    }
    let mut ok = true;
    for (i, (name, _)) in backends.iter().enumerate().skip(1) {
        let ready = medians[i].0.as_secs_f64() / medians[0].0.as_secs_f64();
        let ping = medians[i].1.as_secs_f64() / medians[0].1.as_secs_f64();
        let met = ready <= 1.05 && ping <= 1.05;
        ok &= met;
        println!(
            "  {name} / static: start->ready {ready:.3}, Ping {ping:.3} (targets <= 1.05: {})",
            if met { "met" } else { "missed" }
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        vmkit_benches::Row::new(
            "plugin",
            &format!("start -> agent ready, {name}"),
            "ms",
            ms(medians[i].0),
            ROUNDS,
        )
        .against("the static backend", ms(medians[0].0))
        .ratio_at_most(1.05)
        .record();
        vmkit_benches::Row::new(
            "plugin",
            &format!("Ping p50, {name}"),
            "µs",
            us(medians[i].1),
            ROUNDS,
        )
        .against("the static backend", us(medians[0].1))
        .ratio_at_most(1.05)
        .record();
        vmkit_benches::Row::new(
            "plugin",
            &format!("state() p50, {name}"),
            "µs",
            us(medians[i].2),
            ROUNDS,
        )
        .against("the static backend", us(medians[0].2))
        .record();
    }
    vmkit_benches::finish(ok);
}

async fn boot(backend: &dyn Backend, image: &GuestImage, s: &mut Samples) {
    let dir = tempfile::tempdir().unwrap();
    let vm = backend
        .create(image.config("bench", &dir.path().join("state")))
        .unwrap();
    let began = Instant::now();
    vm.start(StartOptions::new()).await.unwrap();
    let agent = vmkit_proto::AgentClient::new(vm.client().await.unwrap());
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    agent
        .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
        .await
        .unwrap();
    s.ready.push(began.elapsed());
    let mut pings = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        agent
            .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
            .await
            .unwrap();
        pings.push(t.elapsed());
    }
    pings.sort();
    s.ping.push(percentile(&pings, 50.0).unwrap());
    let cheap = |f: &dyn Fn()| {
        let mut all: Vec<Duration> = (0..CHEAP)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        all.sort();
        percentile(&all, 50.0).unwrap()
    };
    s.state.push(cheap(&|| {
        std::hint::black_box(vm.state());
    }));
    s.info.push(cheap(&|| {
        std::hint::black_box(vm.vm_info());
    }));
    vm.shutdown().await.unwrap();
}
