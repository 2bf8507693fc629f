//! The guest channel over virtio-serial only (issue 16): the real test guest under real
//! QEMU with no vsock device in its argv, its agent on a `virtserialport`, reached
//! through vmkit's serial bridge — and, as on a Mac, a NIC on QEMU's user networking
//! instead of a TAP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

use vmkit_core::{GuestCommunicator, GuestTransport, Instance, NicBackend, NicConfig};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{ExecRequest, GuestInfoRequest, PingRequest};
use vmkit_qemu::QemuBackend;

mod common;
use common::*;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(20_000_000_000)
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    let mut req = ExecRequest::new();
    req.argv = argv.iter().map(|s| (*s).to_owned()).collect();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_works_over_virtio_serial_alone_and_survives_its_restart() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = image.config("serial", &state);
    config.transport = GuestTransport::VirtioSerial;
    // As on a Mac: no TAP either, QEMU's user networking.
    config.nics.push(NicConfig {
        id: "net0".into(),
        backend: NicBackend::User,
        mac: None,
    });
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let argv = qemu_argv(&vm);
    assert!(!argv.contains("vsock"), "no vsock device: {argv}");
    assert!(argv.contains("virtserialport"), "{argv}");
    assert!(argv.contains("-netdev user,id=vmkit-net0"), "{argv}");
    let mac = vmkit_qemu::stable_mac("serial", "net0");
    let line = ready_line(&vm).await;
    assert!(line.ends_with(&format!("nics=eth0:{mac}")), "{line}");
    assert_eq!(vm.vm_info().cid, None);

    let agent = vm.agent().await.unwrap();
    agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    let info = agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    assert_eq!(info.online_cpus, [0]);
    let uname = agent
        .exec(ctx(), &exec_req(&["uname", "-s"]))
        .await
        .unwrap();
    assert_eq!(
        (uname.exit_code, uname.stdout.as_slice()),
        (0, &b"Linux\n"[..])
    );

    // 16 MiB through an echo stream, byte-exact.
    let big: Vec<u8> = (0..(16 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let back = echo(&vm, big.clone()).await;
    assert_eq!(back.len(), big.len());
    assert!(back == big, "16 MiB came back altered");

    // Two calls and a stream at once over the one port.
    let second = AgentClient::new(vm.dial_client().await.unwrap());
    let small: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 7) as u8).collect();
    let slow = exec_req(&["sh", "-c", "sleep 0.3; echo a"]);
    let info_req = GuestInfoRequest::new();
    let (a, b, streamed) = tokio::join!(
        agent.exec(ctx(), &slow),
        second.guest_info(ctx(), &info_req),
        echo(&vm, small.clone()),
    );
    assert_eq!(a.unwrap().stdout, b"a\n");
    assert!(!b.unwrap().kernel_release.is_empty());
    assert!(streamed == small);

    // The agent is killed in the guest; init starts a new one on the same port.
    let killer = "(sleep 0.2; kill -9 $(pidof vmkit-agent)) >/dev/null 2>&1 &";
    let _ = agent.exec(ctx(), &exec_req(&["sh", "-c", killer])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    let again = vm.agent().await.unwrap();
    again.ping(ctx(), &PingRequest::new()).await.unwrap();
    eprintln!(
        "agent answered again {:?} after its restart",
        began.elapsed()
    );
    let client = vm.client().await.unwrap();
    AgentClient::new(client)
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();

    let layout = vm.config().layout();
    let left = [
        layout.serial_socket(),
        layout.guest_dir(),
        layout.control_socket(),
    ];
    shut_down_leaving_nothing(&vm, &state, &left).await;
}
