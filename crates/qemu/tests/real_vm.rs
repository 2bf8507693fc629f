//! Real VMs: the test guest under real QEMU (TCG). Each test boots its own VM; a
//! semaphore lets one VM live at a time: on these 2-core machines two VMs plus the test
//! harness starve each other's deadlines. A VM whose vsock daemon never serves it (a
//! vhost-device-vsock 0.3 fault, docs/guest-communication.md) is started once more.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_core::{
    Capabilities, DeviceConfigurator, DiskConfig, ExitReason, GuestCommunicator, Instance,
    NicConfig, ResourceManager, ShutdownStage, StartOptions, VmEvent, VmState,
};
use vmkit_proto::agent::PingRequest;
use vmkit_proto::{AgentClient, StreamHeader};
use vmkit_qemu::{QemuBackend, QemuInstance};
use vmkit_testkit::GuestImage;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_with_a_disk_pauses_resumes_and_powers_off_by_acpi() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No agent: the ACPI stage is the first one that can act.
    let mut config = image.config("acpi", &dir.path().join("state"));
    config.transport = vmkit_core::GuestTransport::None;
    let vm = QemuBackend.create_instance(config).unwrap();
    let mut data = DiskConfig::new("data", disk(dir.path(), "data.img"));
    data.serial = Some("vmkit-data".into());
    vm.add_disk(data).unwrap();
    let mut events = vm.events();

    let vm = start(vm).await;
    assert_eq!(vm.state(), VmState::Running);
    let line = ready_line(&vm).await;
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:vmkit-data"), "{line}");
    let pid = vm.vm_info().pid.expect("a running VM has a pid");

    // Cold-plug is over once started.
    let late = vm.add_disk(DiskConfig::new("late", disk(dir.path(), "late.img")));
    assert_eq!(
        late.unwrap_err().to_string(),
        "add_device: not allowed while the VM is running"
    );

    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    vm.resume().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);

    let exit = vm.shutdown().await.unwrap();
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert_eq!(exit.stage, Some(ShutdownStage::AcpiPowerdown), "{exit:?}");
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(vm.shutdown().await.unwrap(), exit, "shutdown is idempotent");
    assert_eq!(vm.wait().await, exit);
    assert_gone(pid, &vm);

    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let has = |wanted: &VmEvent| seen.iter().any(|e| e == wanted);
    assert!(
        has(&VmEvent::StateChanged {
            from: VmState::New,
            to: VmState::Starting
        }),
        "{seen:?}"
    );
    assert!(
        has(&VmEvent::StateChanged {
            from: VmState::Starting,
            to: VmState::Running
        }),
        "{seen:?}"
    );
    assert!(has(&VmEvent::Stopped) && has(&VmEvent::Resumed), "{seen:?}");
    assert!(has(&VmEvent::Powerdown), "{seen:?}");
    assert!(
        has(&VmEvent::ShutdownRequested {
            guest: true,
            reason: "guest-shutdown".into()
        }),
        "{seen:?}"
    );
    assert!(
        matches!(seen.last(), Some(VmEvent::Exited(info)) if *info == exit),
        "{seen:?}"
    );
}

/// Issue 15: with an agent, shutdown's first stage is the agent's `PowerOff`: the guest
/// powers itself off, without the ACPI button (no Powerdown event), even a guest that
/// ignores ACPI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_powers_the_guest_off_through_its_agent_first() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("agent-off", &dir.path().join("state"));
    config.kernel.cmdline.push("vmkit.ignore_acpi".into());
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let pid = vm.vm_info().pid.unwrap();
    let mut events = vm.events();
    let began = Instant::now();
    let exit = vm.shutdown().await.unwrap();
    let took = began.elapsed();
    assert_eq!(exit.stage, Some(ShutdownStage::GuestPowerOff), "{exit:?}");
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert!(took < vm.config().timeouts.shutdown_grace, "took {took:?}");
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(!seen.contains(&VmEvent::Powerdown), "{seen:?}");
    assert!(
        seen.contains(&VmEvent::ShutdownRequested {
            guest: true,
            reason: "guest-shutdown".into()
        }),
        "{seen:?}"
    );
    assert_gone(pid, &vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_acpi_is_quit_within_grace_plus_one_second() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("deaf", &dir.path().join("state"));
    config.kernel.cmdline.push("vmkit.ignore_acpi".into());
    // No agent to power it off first: the guest is left with the button it ignores.
    config.transport = vmkit_core::GuestTransport::None;
    config.timeouts.shutdown_grace = Duration::from_secs(1);
    let vm = QemuBackend.create_instance(config).unwrap();
    let vm = start(vm).await;
    let pid = vm.vm_info().pid.unwrap();

    let began = Instant::now();
    let exit = vm.shutdown().await.unwrap();
    let took = began.elapsed();
    assert_eq!(exit.stage, Some(ShutdownStage::Quit), "{exit:?}");
    assert_eq!(exit.reason, ExitReason::HostShutdown, "{exit:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}, grace 1 s");
    assert!(
        took >= Duration::from_secs(1),
        "quit before the grace ended: {took:?}"
    );
    assert_gone(pid, &vm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_path_with_commas_and_equals_is_one_path() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Were the comma not escaped, QEMU would read `format=qcow2` and `serial=evil` as
    // options of their own.
    let path = disk(dir.path(), "d,format=qcow2,serial=evil.img");
    let state = dir.path().join("st,ate=x");
    let vm = QemuBackend
        .create_instance(image.config("commas", &state))
        .unwrap();
    vm.add_disk(DiskConfig::new("odd", &path)).unwrap();
    let vm = start(vm).await;
    let line = ready_line(&vm).await;
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:"), "{line}");
    assert!(!line.contains("evil"), "{line}");
    vm.shutdown().await.unwrap();
}

/// A TAP device vmkit may create here, or `None` (with a note) where the host refuses
/// TAP: without root or `/dev/net/tun`. Under CI the machine is root with a tun device,
/// so a refusal there fails the test instead of skipping it.
fn tap_name(tag: &str) -> Option<String> {
    // IFNAMSIZ is 16 with the NUL: "vmkt" + tag + pid stays well under it.
    let name = format!("vmkt{tag}{}", std::process::id() % 100_000);
    match vmkit_qemu::probe_tap(&name) {
        Ok(()) => Some(name),
        Err(e) if vmkit_testkit::qemu::under_ci() => {
            panic!("CI is set but TAP {name} cannot be created: {e}")
        }
        Err(e) => {
            eprintln!("note: TAP {name} unavailable ({e}); skipping a test that needs it");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_nics_appear_in_the_guest_with_their_macs_and_vanish_with_the_vm() {
    let Some(image) = setup() else { return };
    let (Some(first), Some(second)) = (tap_name("a"), tap_name("b")) else {
        return;
    };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = QemuBackend
        .create_instance(image.config("nics", &dir.path().join("state")))
        .unwrap();
    let chosen: vmkit_core::MacAddr = "52:54:00:12:34:56".parse().unwrap();
    vm.add_nic(NicConfig::tap("net0", &first, Some(chosen)))
        .unwrap();
    vm.add_nic(NicConfig::tap("net1", &second, None)).unwrap();
    let vm = start(vm).await;

    let line = ready_line(&vm).await;
    let derived = vmkit_qemu::stable_mac("nics", "net1");
    assert!(
        line.ends_with(&format!("nics=eth0:{chosen},eth1:{derived}")),
        "{line}"
    );
    for tap in [&first, &second] {
        assert!(
            Path::new("/sys/class/net").join(tap).exists(),
            "TAP {tap} missing while the VM runs"
        );
    }

    vm.shutdown().await.unwrap();
    for tap in [&first, &second] {
        assert!(
            !Path::new("/sys/class/net").join(tap).exists(),
            "TAP {tap} outlived its VM"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_with_a_virtio_mmio_disk_and_powers_off_by_acpi() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = image.microvm_config("micro", &dir.path().join("state"));
    let vm = QemuBackend.create_instance(config).unwrap();
    let mut data = DiskConfig::new("data", disk(dir.path(), "data.img"));
    data.serial = Some("micro-data".into());
    vm.add_disk(data).unwrap();
    let vm = start(vm).await;
    let line = ready_line(&vm).await;
    assert!(line.contains(" disks=vda "), "{line}");
    assert!(line.contains("serials=vda:micro-data"), "{line}");
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert_eq!(exit.stage, Some(ShutdownStage::GuestPowerOff), "{exit:?}");
}

// --- The guest agent over hybrid vsock (vhost-device-vsock) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_ping_info_and_exec_and_nothing_is_left_after_shutdown() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let vm = QemuBackend
        .create_instance(image.config("agent", &state))
        .unwrap();
    let mut data = DiskConfig::new("data", disk(dir.path(), "data.img"));
    data.serial = Some("agent-data".into());
    vm.add_disk(data).unwrap();
    let vm = start(vm).await;
    let info = vm.vm_info();
    assert_eq!(info.cid, Some(3), "{info:?}");
    assert!(
        info.capabilities
            .contains(Capabilities::GUEST_AGENT | Capabilities::HYBRID_VSOCK)
    );
    assert!(!info.capabilities.contains(Capabilities::VSOCK), "{info:?}");
    let daemons = processes_mentioning(&state);
    assert_eq!(daemons.len(), 2, "QEMU and vhost-device-vsock: {daemons:?}");

    let agent = vm.agent().await.unwrap();
    let pong = agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    assert!(!pong.agent_version.is_empty());
    let guest = guest_info(&agent).await;
    assert!(guest.kernel_release.ends_with("-cloud-amd64"), "{guest:?}");
    assert_eq!(guest.online_cpus, [0]);
    assert!(guest.mem_total_bytes > 100 << 20, "{guest:?}");
    assert_eq!(guest.disks.len(), 1, "{guest:?}");
    assert_eq!(
        (guest.disks[0].name.as_str(), guest.disks[0].serial.as_str()),
        ("vda", "agent-data")
    );
    assert_eq!(guest.disks[0].size_bytes, 8 << 20);

    let uname = agent
        .exec(ctx(), &exec_req(&["uname", "-a"]))
        .await
        .unwrap();
    assert_eq!(uname.exit_code, 0);
    assert!(String::from_utf8_lossy(&uname.stdout).starts_with("Linux "));
    let failing = agent
        .exec(ctx(), &exec_req(&["sh", "-c", "echo oops >&2; exit 7"]))
        .await
        .unwrap();
    assert_eq!(
        (failing.exit_code, failing.stderr.as_slice()),
        (7, &b"oops\n"[..])
    );

    // A request over ttrpc's 4 MiB limit is refused; the agent keeps serving.
    let mut huge = exec_req(&["cat"]);
    huge.stdin = vec![b'x'; 5 << 20];
    assert!(agent.exec(ctx(), &huge).await.is_err());
    vm.agent()
        .await
        .unwrap()
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();

    let layout = vm.config().layout();
    let sockets = [layout.vsock_socket(), layout.vhost_user_vsock_socket()];
    shut_down_leaving_nothing(&vm, &state, &sockets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_stream_echoes_byte_exact_and_exec_streams_carry_stdio() {
    let Some(booted) = boot("stream").await else {
        return;
    };
    let vm = &booted.vm;

    let mut stream = vm.open_stream(&StreamHeader::Echo).await.unwrap();
    let payload: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    // In 64 KiB steps, each read back before the next is sent: vhost-device-vsock 0.3
    // can stall for good when both directions run at full speed at once (its credit
    // accounting; see docs/guest-communication.md). The deadline turns a stall into a
    // failure instead of a hang.
    let mut back = Vec::with_capacity(payload.len());
    let echo = async {
        for chunk in payload.chunks(64 << 10) {
            stream.write_all(chunk).await.unwrap();
            let mut part = vec![0u8; chunk.len()];
            stream.read_exact(&mut part).await.unwrap();
            back.extend_from_slice(&part);
        }
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{} bytes after the end", rest.len());
    };
    tokio::time::timeout(Duration::from_secs(120), echo)
        .await
        .expect("the 16 MiB echo stalled");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the echo changed bytes");

    let header = StreamHeader::Exec {
        argv: vec!["sh".into(), "-c".into(), "tr a-z A-Z; echo bye >&2".into()],
    };
    let mut exec = vm.open_stream(&header).await.unwrap();
    exec.write_all(b"hello guest\n").await.unwrap();
    exec.shutdown().await.unwrap();
    let mut out = String::new();
    exec.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "HELLO GUEST\nbye\n");

    let refused = vm
        .open_stream(&StreamHeader::Exec {
            argv: vec!["/no/such/program".into()],
        })
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("the agent refused: program /no/such/program: no such file"),
        "{refused}"
    );
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cached_client_redials_and_retry_waits_for_a_late_agent_or_says_why_not() {
    let Some(booted) = boot("redial").await else {
        return;
    };
    let vm = &booted.vm;
    let first = agent_pid(&vm.agent().await.unwrap()).await;

    // The agent dies (its connection with it); the guest's init restarts it 0.2 s later.
    let killed = vm
        .agent()
        .await
        .unwrap()
        .exec(ctx(), &exec_req(&["sh", "-c", "kill -9 $PPID"]))
        .await;
    assert!(killed.is_err(), "the agent cannot answer its own death");
    // Retrying dials reach the new agent once it listens.
    let began = Instant::now();
    let late = AgentClient::new(
        vm.dial_client_with_retry(Duration::from_secs(10))
            .await
            .unwrap(),
    );
    late.ping(ctx(), &PingRequest::new()).await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    // The cached client re-dials once its connection is seen closed. Through
    // vhost-device-vsock the old connection's EOF can trail the agent's death: a call
    // may still meet the dead connection (a transport error), and then the next
    // `client()` must re-dial.
    let cached = vm.agent().await.unwrap();
    let second = match cached
        .exec(ctx(), &exec_req(&["sh", "-c", "echo $PPID"]))
        .await
    {
        Ok(out) => String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        Err(ttrpc::Error::Socket(e)) => {
            eprintln!("the cached connection was still the dead one ({e}); client() re-dials");
            agent_pid(&vm.agent().await.unwrap()).await
        }
        Err(other) => panic!("not a transport error: {other:?}"),
    };
    assert_ne!(first, second, "a new agent answered");

    // Now an agent that never comes back: retry gives up with the count and the cause.
    let fresh = AgentClient::new(
        vm.dial_client_with_retry(Duration::from_secs(10))
            .await
            .unwrap(),
    );
    let _ = fresh
        .exec(
            ctx(),
            &exec_req(&["sh", "-c", "touch /run/vmkit-agent.stop; kill -9 $PPID"]),
        )
        .await;
    let began = Instant::now();
    let Err(err) = vm.dial_client_with_retry(Duration::from_secs(1)).await else {
        panic!("dialled an agent that was stopped for good");
    };
    let err = err.to_string();
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(
        err.starts_with("dial_client_with_retry: dial hvsock://")
            && err.contains(":1025: no connection after ")
            && err.contains("; last: closed before OK: nothing listens on guest port 1025 yet"),
        "{err}"
    );
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_agent_never_answers_fails_start_and_leaves_nothing() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = image.config("mute", &state);
    config.kernel.cmdline.push("vmkit.no_agent".into());
    let vm = QemuBackend.create_instance(config).unwrap();
    // Long enough for the guest's vsock to be up under a loaded host (before that, the
    // daemon resets dials instead of closing them), so the last cause is the agent's.
    let err = vm
        .start(StartOptions::with_timeout(Duration::from_secs(15)))
        .await
        .unwrap_err();
    let err = err.to_string();
    // The last dial saw the guest's refusal, or, on a guest still booting under load,
    // the daemon closing dials until the guest's vsock is up.
    assert!(
        err.starts_with("start: waiting for the guest agent to answer Ping (")
            && err.contains(" dials of hvsock://")
            && (err.contains(
                "; last: closed before OK: nothing listens on guest port 1025 yet; \
                 QEMU reports the guest's vsock device started)"
            ) || err.contains("; last: write CONNECT 1025: Broken pipe"))
            && err.ends_with(": timed out after 15s"),
        "{err}"
    );
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(vm.wait().await.reason, ExitReason::StartFailed);
    assert_eq!(processes_mentioning(&state), Vec::<u32>::new());
    let layout = vm.config().layout();
    for socket in [
        layout.control_socket(),
        layout.vsock_socket(),
        layout.vhost_user_vsock_socket(),
    ] {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

// --- vCPU hot-plug ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_vcpus_grows_to_four_online_in_the_guest_and_back_to_one() {
    let Some(booted) = boot("cpus").await else {
        return;
    };
    let vm = &booted.vm;
    assert!(
        vm.vm_info()
            .capabilities
            .contains(Capabilities::CPU_HOTPLUG)
    );
    let cpus = vm
        .cpu_hotplugger()
        .expect("q35 with an agent and max_vcpus 4");

    for bad in [0, 5] {
        let err = cpus.set_vcpus(bad).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!("set_vcpus {bad}: bad argument count: must be within 1..=4 (max_vcpus)")
        );
    }
    let err = cpus.unplug_cpu(0).await.unwrap_err().to_string();
    assert!(err.contains("vCPU 0 was there at boot"), "{err}");

    let grown = cpus.set_vcpus(4).await.unwrap();
    assert_eq!((grown.before, grown.achieved), (1, 4), "{grown:?}");
    assert!(grown.failures.is_empty(), "{grown:?}");
    let agent = vm.agent().await.unwrap();
    let info = guest_info(&agent).await;
    assert_eq!(info.online_cpus, [0, 1, 2, 3]);
    let listed = cpus.query_cpus().await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|c| c.online == Some(true)), "{listed:?}");
    assert_eq!(listed[0].device_id, None, "the boot vCPU");
    assert!(
        listed[1]
            .device_id
            .as_deref()
            .unwrap()
            .starts_with("vmkit-cpu")
    );
    let full = cpus.hotplug_cpu().await.unwrap_err().to_string();
    assert_eq!(
        full,
        "hotplug_cpu: no vCPU slot left: all 4 vCPUs are present (resources.max_vcpus)"
    );

    let shrunk = cpus.set_vcpus(1).await.unwrap();
    if shrunk.failures.is_empty() {
        assert_eq!(shrunk.achieved, 1, "{shrunk:?}");
        let info = guest_info(&agent).await;
        assert_eq!(info.online_cpus, [0]);
    } else {
        // Where QEMU cannot unplug, the error says why and the VM stays healthy.
        eprintln!("vCPU unplug failed: {shrunk:?}");
        assert!(shrunk.achieved < 4 || !shrunk.failures.is_empty());
    }
    vm.agent()
        .await
        .unwrap()
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();
    assert_eq!(vm.state(), VmState::Running);
    vm.shutdown().await.unwrap();
}

/// Under TCG, QEMU never reuses an unplugged vCPU's translation context: with
/// `max_vcpus` 3, the boot vCPU and two hot-plugs use all three, and a third hot-plug
/// would abort QEMU. vmkit refuses it, says why, and the VM keeps serving.
/// Issue 15: the caller names the slot a vCPU goes into; a taken slot, or one the VM
/// does not have, is refused with its kind before QEMU is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vcpu_goes_into_the_slot_the_caller_names() {
    let Some(booted) = boot("cpu-slot").await else {
        return;
    };
    let cpus = booted.vm.cpu_hotplugger().unwrap();
    // QEMU 10 lays `-smp 1,maxcpus=4` out as cores 0-3 of socket 0.
    let slot = |core| vmkit_core::CpuTopology {
        socket: 0,
        core,
        thread: 0,
    };
    let third = cpus.hotplug_cpu_at(slot(2)).await.unwrap();
    assert_eq!(third.topology, slot(2), "{third:?}");
    assert_eq!(third.online, Some(true));
    assert_eq!(third.device_id.as_deref(), Some("vmkit-cpu0-2-0"));
    let listed = cpus.query_cpus().await.unwrap();
    let cores: Vec<u32> = listed.iter().map(|c| c.topology.core).collect();
    assert_eq!(cores, [0, 2], "slot 1 stays free: {listed:?}");
    // The guest calls core 2 cpu1 (its lowest free number); vmkit matches by place.
    assert!(
        listed.iter().all(|c| c.online == Some(true)),
        "both online: {listed:?}"
    );
    let taken = cpus.hotplug_cpu_at(slot(2)).await.unwrap_err();
    assert!(
        matches!(taken, vmkit_core::Error::BadArgument { .. }),
        "{taken:?}"
    );
    assert_eq!(
        taken.to_string(),
        "hotplug_cpu_at socket=0 core=2 thread=0: bad argument at: the slot holds a vCPU already"
    );
    let missing = cpus.hotplug_cpu_at(slot(9)).await.unwrap_err();
    assert!(
        matches!(missing, vmkit_core::Error::NotFound { .. }),
        "{missing:?}"
    );
    assert!(
        missing.to_string().ends_with(
            "not found: no such vCPU slot (socket/core/thread: 0/0/0, 0/1/0, 0/2/0, 0/3/0)"
        ),
        "{missing}"
    );
    // The next free slot is still the lowest one.
    let next = cpus.hotplug_cpu().await.unwrap();
    assert_eq!(next.topology, slot(1));
    booted.vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replugging_vcpus_under_tcg_stops_before_qemu_would_abort() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("replug", &dir.path().join("state"));
    config.resources.max_vcpus = 3;
    config.accel = vmkit_core::Accel::Tcg;
    let vm = QemuBackend.create_instance(config).unwrap();
    let vm = start(vm).await;
    let cpus = vm.cpu_hotplugger().unwrap();
    for _ in 0..2 {
        let cpu = cpus.hotplug_cpu().await.unwrap();
        assert_eq!(cpu.online, Some(true));
        cpus.unplug_cpu(cpu.index).await.unwrap();
    }
    let err = cpus.hotplug_cpu().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "hotplug_cpu: not supported by the qemu backend: under TCG QEMU starts at most \
         max_vcpus (3) vCPU threads in a VM's life and never reuses an unplugged vCPU's; 3 \
         have started, and one more would abort QEMU"
    );
    // set_vcpus reports the same reason per vCPU and QEMU keeps running.
    let resize = cpus.set_vcpus(2).await.unwrap();
    assert_eq!((resize.before, resize.achieved), (1, 1));
    assert_eq!(resize.failures.len(), 1, "{resize:?}");
    assert!(
        resize.failures[0]
            .error
            .to_string()
            .contains("one more would abort QEMU"),
        "{resize:?}"
    );
    assert_eq!(vm.state(), VmState::Running);
    let agent = vm.agent().await.unwrap();
    agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    assert_eq!(cpus.query_cpus().await.unwrap().len(), 1);
    let exit = vm.shutdown().await.unwrap();
    assert_ne!(exit.reason, ExitReason::Crashed, "{exit:?}");
}

// --- Memory hot-plug ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_grows_by_dimms_shrinks_by_unplug_and_refuses_bad_sizes_first() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("memory", &dir.path().join("state"));
    config.resources.memory_slots = 4;
    config.resources.max_memory_mib = Some(2048);
    let vm = QemuBackend.create_instance(config).unwrap();
    let vm = start(vm).await;
    assert!(
        vm.vm_info()
            .capabilities
            .contains(Capabilities::MEMORY_HOTPLUG)
    );
    let memory = vm.memory_hotplugger().expect("q35 with slots and an agent");
    let agent = vm.agent().await.unwrap();
    let total = || guest_total_mib(&agent);
    let base = total().await;

    // Refused before any QMP command, with the reason.
    let unaligned = memory.hotplug_memory(100).await.unwrap_err().to_string();
    assert_eq!(
        unaligned,
        "hotplug_memory 100 MiB: bad argument size_mib: not a multiple of the guest's memory block size (128 MiB)"
    );
    let too_big = memory.hotplug_memory(4096).await.unwrap_err().to_string();
    assert_eq!(
        too_big,
        "hotplug_memory 4096 MiB: no memory left: 256 MiB boot + 0 MiB plugged + 4096 MiB exceeds max_memory_mib 2048"
    );

    // A slot QEMU rejects: its own words in our error, and no backend object left.
    let rejected = vm
        .hotplug_memory_in_slot(256, 99)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        rejected.contains("device_add pc-dimm vmkit-mem0 (256 MiB)")
            && rejected.contains("invalid slot number 99, valid range is [0-3]"),
        "{rejected}"
    );
    assert_eq!(memory.query_memory().await.unwrap().dimms, []);
    let objects = vm
        .qmp_query("qom-list", Some(serde_json::json!({"path": "/objects"})))
        .await
        .unwrap();
    assert!(
        !objects.to_string().contains("vmkit-mem"),
        "a stray backend object: {objects}"
    );

    let first = memory.hotplug_memory(256).await.unwrap();
    assert_eq!(total().await, base + 256);
    let second = memory.hotplug_memory(512).await.unwrap();
    assert_eq!(total().await, base + 768);
    let info = memory.query_memory().await.unwrap();
    assert_eq!(
        (info.base_mib, info.plugged_mib, info.max_mib),
        (256, 768, 2048)
    );
    assert_eq!(info.dimms.len(), 2, "{info:?}");
    assert_eq!(info.guest_total_mib, Some(base + 768));

    memory.unplug_memory(&first).await.unwrap();
    assert_eq!(total().await, base + 512);
    let unknown = memory.unplug_memory("nope").await.unwrap_err().to_string();
    assert!(
        unknown.starts_with("unplug_memory nope: not found: no such DIMM"),
        "{unknown}"
    );
    let left = memory.query_memory().await.unwrap();
    assert_eq!(left.dimms.len(), 1);
    assert_eq!(left.dimms[0].id, second);
    vm.shutdown().await.unwrap();
}

/// A VM with virtio-mem memory hot-plug (256 MiB boot, up to 1280 MiB) and extra kernel
/// arguments, started.
async fn boot_virtio_mem(
    image: &GuestImage,
    id: &str,
    dir: &Path,
    cmdline: &[&str],
    hotplug_timeout: Duration,
) -> QemuInstance {
    let mut config = image.config(id, &dir.join("state"));
    config.resources.memory_hotplug = vmkit_core::MemoryHotplug::VirtioMem;
    config.resources.max_memory_mib = Some(1280);
    config.timeouts.hotplug = hotplug_timeout;
    config
        .kernel
        .cmdline
        .extend(cmdline.iter().map(|a| (*a).to_owned()));
    let vm = QemuBackend.create_instance(config).unwrap();
    start(vm).await
}

/// What the agent reports the guest sees.
async fn guest_total_mib(agent: &AgentClient) -> u64 {
    guest_info(agent).await.mem_total_bytes >> 20
}

/// QEMU's `requested-size` and `size` of the virtio-mem device, in MiB.
async fn virtio_mem_sizes(vm: &QemuInstance) -> (u64, u64) {
    let devices = vm.qmp_query("query-memory-devices", None).await.unwrap();
    let data = &devices[0]["data"];
    assert_eq!(devices[0]["type"], "virtio-mem", "{devices}");
    (
        data["requested-size"].as_u64().unwrap() >> 20,
        data["size"].as_u64().unwrap() >> 20,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_mem_grows_by_grants_shrinks_by_unplug_and_refuses_bad_sizes_first() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_virtio_mem(&image, "vmem", dir.path(), &[], Duration::from_secs(30)).await;
    assert!(
        vm.vm_info()
            .capabilities
            .contains(Capabilities::MEMORY_HOTPLUG)
    );
    let memory = vm
        .memory_hotplugger()
        .expect("q35 with virtio-mem and an agent");
    let agent = vm.agent().await.unwrap();
    let base = guest_total_mib(&agent).await;

    // Refused before any QMP command, with the reason.
    let unaligned = memory.hotplug_memory(3).await.unwrap_err().to_string();
    assert_eq!(
        unaligned,
        "hotplug_memory 3 MiB (virtio-mem): bad argument size_mib: not a multiple of the virtio-mem block size (2 MiB)"
    );
    let too_big = memory.hotplug_memory(1026).await.unwrap_err().to_string();
    assert_eq!(
        too_big,
        "hotplug_memory 1026 MiB (virtio-mem): no memory left: 256 MiB boot + 0 MiB plugged + 1026 MiB exceeds max_memory_mib 1280"
    );
    let slot = vm
        .hotplug_memory_in_slot(256, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(slot.contains("virtio-mem has no DIMM slots"), "{slot}");
    assert_eq!(virtio_mem_sizes(&vm).await, (0, 0));

    // 256 MiB, 512 MiB, and 66 MiB (not a whole 128 MiB guest memory block).
    let first = memory.hotplug_memory(256).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 256);
    let second = memory.hotplug_memory(512).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 768);
    let third = memory.hotplug_memory(66).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 834);
    assert_eq!(virtio_mem_sizes(&vm).await, (834, 834));
    let info = memory.query_memory().await.unwrap();
    assert_eq!(
        (info.base_mib, info.plugged_mib, info.max_mib),
        (256, 834, 1280)
    );
    let grants: Vec<(&str, u64)> = info
        .dimms
        .iter()
        .map(|d| (d.id.as_str(), d.size_mib))
        .collect();
    assert_eq!(
        grants,
        [
            (first.as_str(), 256),
            (second.as_str(), 512),
            (third.as_str(), 66)
        ]
    );
    assert_eq!(info.guest_total_mib, Some(base + 834));

    // Unplug: the guest gives the blocks back and MemTotal shrinks by the grant.
    memory.unplug_memory(&first).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 578);
    assert_eq!(virtio_mem_sizes(&vm).await, (578, 578));
    memory.unplug_memory(&third).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 512);
    let unknown = memory.unplug_memory(&first).await.unwrap_err().to_string();
    assert!(
        unknown.starts_with(&format!(
            "unplug_memory {first} (virtio-mem): not found: no such grant"
        )),
        "{unknown}"
    );
    // The room freed is usable again, up to the ceiling.
    let again = memory.hotplug_memory(512).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base + 1024);
    assert_eq!(virtio_mem_sizes(&vm).await, (1024, 1024));
    let left: Vec<String> = memory
        .query_memory()
        .await
        .unwrap()
        .dimms
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [second, again]);
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_mem_in_a_guest_without_the_driver_times_out_and_rolls_back() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vm = boot_virtio_mem(
        &image,
        "vmem-nodrv",
        dir.path(),
        &["module_blacklist=virtio_mem"],
        Duration::from_secs(3),
    )
    .await;
    let memory = vm.memory_hotplugger().unwrap();
    let agent = vm.agent().await.unwrap();
    let base = guest_total_mib(&agent).await;
    let began = Instant::now();
    let err = memory.hotplug_memory(256).await.unwrap_err();
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(
        err.to_string(),
        "hotplug_memory 256 MiB (virtio-mem): the guest plugging the memory (does its kernel load virtio_mem?): timed out after 3s"
    );
    // Nothing is left asked for, and the VM still serves.
    assert_eq!(virtio_mem_sizes(&vm).await, (0, 0));
    let info = memory.query_memory().await.unwrap();
    assert_eq!((info.plugged_mib, info.dimms.len()), (0, 0));
    assert_eq!(guest_total_mib(&agent).await, base);
    assert_eq!(vm.state(), VmState::Running);
    vm.shutdown().await.unwrap();
}

/// Turns the guest's ACPI memory and CPU hot-plug handling on or off, through the agent.
async fn guest_acpi_hotplug(agent: &AgentClient, on: bool) {
    let value = if on { "1" } else { "0" };
    let script = format!(
        "echo {value} > /sys/firmware/acpi/hotplug/memory/enabled && \
         echo {value} > /sys/firmware/acpi/hotplug/processor/enabled"
    );
    let out = agent
        .exec(ctx(), &exec_req(&["sh", "-c", &script]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
}

/// A guest that refuses to eject memory or a vCPU answers QEMU's eject request with an
/// ACPI _OST failure; vmkit ends the unplug at once with the guest's reason (not after
/// the deadline), the device stays and works, and once the guest agrees, unplug works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplug_the_guest_refuses_fails_at_once_with_its_reason() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("refuse", &dir.path().join("state"));
    config.resources.memory_slots = 2;
    config.resources.max_memory_mib = Some(1024);
    config.resources.max_vcpus = 3;
    let vm = QemuBackend.create_instance(config).unwrap();
    let vm = start(vm).await;
    let agent = vm.agent().await.unwrap();
    let memory = vm.memory_hotplugger().unwrap();
    let cpus = vm.cpu_hotplugger().unwrap();
    let base = guest_total_mib(&agent).await;
    let dimm = memory.hotplug_memory(128).await.unwrap();
    let cpu = cpus.hotplug_cpu().await.unwrap();

    guest_acpi_hotplug(&agent, false).await;
    let began = Instant::now();
    let err = memory.unplug_memory(&dimm).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "unplug_memory {dimm}: the guest refused to eject it: ACPI _OST status 0x80 \
             (ejection not supported by the guest: its ACPI hot-plug is off or cannot remove \
             this device)"
        )
    );
    let err = cpus.unplug_cpu(cpu.index).await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "unplug_cpu {} (vmkit-cpu0-1-0): the guest refused to eject it: ACPI _OST status 0x80",
            cpu.index
        )),
        "{err}"
    );
    // Both answers came long before the 30 s deadline.
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(guest_total_mib(&agent).await, base + 128);
    let online = guest_info(&agent).await.online_cpus;
    assert_eq!(online, [0, cpu.index]);

    guest_acpi_hotplug(&agent, true).await;
    memory.unplug_memory(&dimm).await.unwrap();
    cpus.unplug_cpu(cpu.index).await.unwrap();
    assert_eq!(guest_total_mib(&agent).await, base);
    assert_eq!(cpus.query_cpus().await.unwrap().len(), 1);
    vm.shutdown().await.unwrap();
}

// --- Disk hot-plug ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hotplugged_disk_appears_with_its_serial_and_size_and_goes_on_unplug() {
    let Some(booted) = boot("hotdisk").await else {
        return;
    };
    let vm = &booted.vm;
    assert!(
        vm.vm_info()
            .capabilities
            .contains(Capabilities::DISK_HOTPLUG)
    );
    let agent = vm.agent().await.unwrap();
    let disks = || async {
        guest_info(&agent)
            .await
            .disks
            .into_iter()
            .map(|d| (d.serial, d.size_bytes))
            .collect::<Vec<_>>()
    };
    assert_eq!(disks().await, []);

    let path = booted.dir.path().join("hot.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut hot = DiskConfig::new("hot", &path);
    hot.serial = Some("hot-data".into());
    vm.hotplug_disk(hot.clone()).await.unwrap();
    assert_eq!(disks().await, [("hot-data".to_owned(), 16u64 << 20)]);
    let again = vm.hotplug_disk(hot).await.unwrap_err().to_string();
    assert!(again.contains("duplicate device id \"hot\""), "{again}");

    vm.unplug("hot").await.unwrap();
    assert_eq!(disks().await, []);
    let unknown = vm.unplug("hot").await.unwrap_err().to_string();
    assert!(
        unknown.contains("no hot-plugged device with that id"),
        "{unknown}"
    );
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_hotplug_ends_it_with_a_clear_error() {
    let Some(booted) = boot("interrupt").await else {
        return;
    };
    let vm = Arc::new(booted.vm);
    let adding = {
        let vm = Arc::clone(&vm);
        // A vCPU takes ~0.7 s to come online under TCG: the shutdown lands inside it.
        tokio::spawn(async move { vm.cpu_hotplugger().unwrap().hotplug_cpu().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let exit = vm.shutdown().await.unwrap();
    let err = adding.await.unwrap().unwrap_err().to_string();
    assert_eq!(err, "hotplug_cpu: the VM is shutting down");
    assert_eq!(vm.state(), VmState::Shutdown, "{exit:?}");
    let after = vm
        .cpu_hotplugger()
        .unwrap()
        .hotplug_cpu()
        .await
        .unwrap_err();
    assert_eq!(
        after.to_string(),
        "hotplug_cpu: not allowed while the VM is shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hotplugged_tap_nic_appears_with_its_mac_and_goes_with_its_tap_on_unplug() {
    let Some(tap) = tap_name("h") else { return };
    let Some(booted) = boot("hotnic").await else {
        return;
    };
    let vm = &booted.vm;
    assert!(
        vm.vm_info()
            .capabilities
            .contains(Capabilities::NIC_HOTPLUG)
    );
    let agent = vm.agent().await.unwrap();
    let macs = || async {
        guest_info(&agent)
            .await
            .nics
            .into_iter()
            .map(|n| n.mac)
            .collect::<Vec<_>>()
    };
    assert_eq!(macs().await, Vec::<String>::new());
    let mac: vmkit_core::MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
    vm.hotplug_nic(NicConfig::tap("hot0", &tap, Some(mac)))
        .await
        .unwrap();
    assert_eq!(macs().await, [mac.to_string()]);
    assert!(Path::new("/sys/class/net").join(&tap).exists());

    vm.unplug("hot0").await.unwrap();
    assert_eq!(macs().await, Vec::<String>::new());
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "TAP {tap} outlived its unplugged NIC"
    );
    vm.shutdown().await.unwrap();
}
