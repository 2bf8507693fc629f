//! The guest agent restarts, slowly, twenty times in a row (issue 22): after each death
//! the host's `agent()` and `client()` must reach the next agent however long it takes
//! to come — over hybrid vsock and over virtio-serial, where nothing crosses the link
//! when the agent dies (QEMU's `VSERPORT_CHANGE` says so, but at most once a second).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

use vmkit_core::{GuestCommunicator, GuestTransport, Instance};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::PingRequest;
use vmkit_qemu::QemuBackend;

mod common;
use common::*;

/// How many deaths in a row.
const RESTARTS: u32 = 20;

/// The restart delay of death `n`: 0.1 s to 1.3 s, so most restarts are slower than
/// the old test's fixed half-second wait.
fn delay(n: u32) -> Duration {
    Duration::from_millis(100 + u64::from(n % 4) * 400)
}

/// Gives the host a moment in which it can know the agent died: over vsock the guest
/// resets the dead agent's connection (within milliseconds); over virtio-serial nothing
/// crosses, and QEMU's `VSERPORT_CHANGE` comes at most once a second, so the host must
/// find out by itself when asked for a client — which is what this tests.
const AFTER_DEATH: Duration = Duration::from_millis(300);

async fn restarts_in_a_row(id: &str, transport: GuestTransport) {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config(id, &dir.path().join("state"));
    config.transport = transport;
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let mut pid = agent_pid(&vm.agent().await.unwrap()).await;
    for n in 0..RESTARTS {
        let slow = delay(n);
        let killer = format!(
            "echo {}.{:03} > /run/vmkit-agent.restart_delay; \
             (sleep 0.1; kill -9 $(pidof vmkit-agent)) >/dev/null 2>&1 &",
            slow.as_secs(),
            slow.subsec_millis()
        );
        let agent = vm.agent().await.unwrap();
        agent
            .exec(ctx(), &exec_req(&["sh", "-c", &killer]))
            .await
            .unwrap();
        let killed_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(100) + AFTER_DEATH).await;

        // The cached client is known dead: `agent()` waits for the next agent.
        let again = vm
            .agent()
            .await
            .unwrap_or_else(|e| panic!("restart {n}: {e}"));
        again
            .ping(ctx(), &PingRequest::new())
            .await
            .unwrap_or_else(|e| panic!("restart {n} ({slow:?}): ping the new agent: {e}"));
        let took = killed_at.elapsed();
        assert!(
            took >= slow,
            "restart {n}: answered {took:?} after the kill, before its {slow:?} restart"
        );
        let next = agent_pid(&again).await;
        assert_ne!(next, pid, "restart {n}: a new agent answered");
        pid = next;
        // `client()` hands out the same live connection.
        AgentClient::new(vm.client().await.unwrap())
            .ping(ctx(), &PingRequest::new())
            .await
            .unwrap_or_else(|e| panic!("restart {n}: client(): {e}"));
    }
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_restarts_over_virtio_serial_are_reached_twenty_times_in_a_row() {
    restarts_in_a_row("restart-serial", GuestTransport::VirtioSerial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_agent_restarts_over_hybrid_vsock_are_reached_twenty_times_in_a_row() {
    let hybrid = GuestTransport::HybridVsock {
        uds: None,
        port: vmkit_proto::AGENT_PORT,
    };
    restarts_in_a_row("restart-hybrid", hybrid).await;
}
