//! FakeBackend keeps the Instance contract with no VM: the state table, events, devices
//! and resources as the config allows, a real agent, injected faults, nothing left.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_core::{
    Backend, DeviceConfigurator, DiskConfig, Error, ExitReason, GuestCommunicator, Instance,
    InstanceConfig, NicConfig, Registry, ResourceManager, ShutdownStage, StartOptions, VmEvent,
    VmState,
};
use vmkit_proto::agent::{ExecRequest, PingRequest};
use vmkit_proto::{AgentClient, StreamHeader};
use vmkit_testkit::fake_backend::{FAKE_BACKEND, FakeBackend, FakeInstance, Fault, Op};

struct Vm {
    dir: tempfile::TempDir,
    vm: FakeInstance,
}

fn fake(edit: impl FnOnce(&mut InstanceConfig)) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"never read").unwrap();
    let mut config = InstanceConfig::new("fake-vm", dir.path().join("state"), &kernel);
    config.resources.max_vcpus = 4;
    config.resources.memory_slots = 2;
    config.resources.max_memory_mib = Some(1024);
    config.timeouts.command = Duration::from_millis(200);
    edit(&mut config);
    let vm = FakeBackend::new().create_fake(config).unwrap();
    Vm { dir, vm }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

fn changes(events: &mut tokio::sync::broadcast::Receiver<VmEvent>) -> Vec<(VmState, VmState)> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let VmEvent::StateChanged { from, to } = event {
            seen.push((from, to));
        }
    }
    seen
}

/// Nothing of the VM is left in its state dir: no agent socket, no lock.
fn assert_released(f: &Vm) {
    let state = &f.vm.config().state_dir;
    for name in ["agent.sock", "stream.sock", "vmkit.lock"] {
        assert!(!state.join(name).exists(), "{name} left behind");
    }
}

/// A boxed or shared instance is itself an `Instance` (vmkit-core forwards every
/// method), so it goes where one is expected.
#[tokio::test]
async fn boxed_and_shared_instances_are_instances() {
    fn generic_state(vm: &impl vmkit_core::Instance) -> VmState {
        vm.state()
    }
    let Vm { dir: _dir, vm } = fake(|_| {});
    let shared: std::sync::Arc<dyn vmkit_core::Instance> = std::sync::Arc::new(vm);
    let boxed: Box<dyn vmkit_core::Instance> = Box::new(std::sync::Arc::clone(&shared));
    boxed.start(StartOptions::new()).await.unwrap();
    assert_eq!(generic_state(&shared), VmState::Running);
    assert_eq!(generic_state(&boxed), VmState::Running);
    assert!(
        boxed.cpu_hotplugger().is_some(),
        "the pointee's hot-plugger"
    );
    let exit = boxed.shutdown().await.unwrap();
    assert_eq!(shared.wait().await, exit);
}

#[test]
fn it_registers_as_fake() {
    let registry = Registry::from_inventory().unwrap();
    assert!(registry.names().contains(&FAKE_BACKEND.to_owned()));
    assert_eq!(FakeBackend::new().name(), "fake");
}

#[tokio::test]
async fn a_life_with_a_real_agent_then_nothing_left() {
    let f = fake(|_| {});
    let mut events = f.vm.events();
    f.vm.start(StartOptions::new()).await.unwrap();
    assert_eq!(f.vm.state(), VmState::Running);
    let agent = AgentClient::new(f.vm.client().await.unwrap());
    agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    let mut echo = ExecRequest::new();
    echo.argv = vec!["echo".into(), "from the fake guest".into()];
    let out = agent.exec(ctx(), &echo).await.unwrap();
    assert_eq!(out.stdout, b"from the fake guest\n");
    // A fresh connection and a raw stream are real too.
    AgentClient::new(
        f.vm.dial_client_with_retry(Duration::from_secs(2))
            .await
            .unwrap(),
    )
    .ping(ctx(), &PingRequest::new())
    .await
    .unwrap();
    let mut stream = f.vm.start_stream(vmkit_proto::STREAM_PORT).await.unwrap();
    stream
        .write_all(&StreamHeader::Echo.encode().unwrap())
        .await
        .unwrap();
    let mut ok = [0u8; 3];
    stream.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"OK\n");
    let exit = f.vm.shutdown().await.unwrap();
    assert_eq!(
        (exit.reason.clone(), exit.stage),
        (
            ExitReason::GuestShutdown,
            Some(ShutdownStage::AcpiPowerdown)
        )
    );
    assert_eq!(f.vm.wait().await, exit);
    assert_released(&f);
    let (n, s, r, d) = (
        VmState::New,
        VmState::Starting,
        VmState::Running,
        VmState::Shutdown,
    );
    assert_eq!(changes(&mut events), [(n, s), (s, r), (r, d)]);
    drop(f.dir);
}

#[tokio::test]
async fn calls_outside_their_states_are_refused_as_the_table_says() {
    let f = fake(|_| {});
    let err = f.vm.pause().await.unwrap_err();
    assert_eq!(err.to_string(), "pause: not allowed while the VM is new");
    assert!(f.vm.client().await.is_err());
    f.vm.add_disk(DiskConfig::new("data", f.vm.config().kernel.path.clone()))
        .unwrap();
    let dup =
        f.vm.add_disk(DiskConfig::new("data", f.vm.config().kernel.path.clone()))
            .unwrap_err();
    assert!(matches!(dup, Error::InvalidConfig { .. }), "{dup:?}");
    f.vm.start(StartOptions::new()).await.unwrap();
    let late =
        f.vm.add_nic(NicConfig::tap("net0", "tap0", None))
            .unwrap_err();
    assert_eq!(
        late.to_string(),
        "add_device: not allowed while the VM is running"
    );
    assert_eq!(
        f.vm.start(StartOptions::new())
            .await
            .unwrap_err()
            .to_string(),
        "start: not allowed while the VM is running"
    );
    f.vm.pause().await.unwrap();
    let hot =
        f.vm.hotplug_disk(DiskConfig::new("hot", f.vm.config().kernel.path.clone()))
            .await
            .unwrap_err();
    assert_eq!(
        hot.to_string(),
        "hotplug_disk: not allowed while the VM is paused"
    );
    // Shutdown twice and at once: the same exit; a paused guest is quit.
    let (a, b) = tokio::join!(f.vm.shutdown(), f.vm.shutdown());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert_eq!(a.stage, Some(ShutdownStage::Quit));
    assert_eq!(f.vm.shutdown().await.unwrap(), a);
    assert_eq!(
        f.vm.resume().await.unwrap_err().to_string(),
        "resume: not allowed while the VM is shutdown"
    );
    assert_released(&f);
}

#[tokio::test]
async fn resources_follow_the_config() {
    let f = fake(|c| {
        c.backend_options.insert("hotplug_ports".into(), "1".into());
    });
    f.vm.start(StartOptions::new()).await.unwrap();
    let cpus = f.vm.cpu_hotplugger().expect("max_vcpus 4 > 1");
    let grown = cpus.set_vcpus(4).await.unwrap();
    assert_eq!((grown.before, grown.achieved), (1, 4));
    assert!(
        matches!(cpus.hotplug_cpu().await, Err(Error::Exhausted { .. })),
        "no fifth vCPU slot"
    );
    assert_eq!(cpus.set_vcpus(2).await.unwrap().achieved, 2);
    assert_eq!(cpus.query_cpus().await.unwrap().len(), 2);
    let core = |core| vmkit_core::CpuTopology {
        socket: 0,
        core,
        thread: 0,
    };
    assert_eq!(
        cpus.hotplug_cpu_at(core(2)).await.unwrap().topology,
        core(2)
    );
    assert!(matches!(
        cpus.hotplug_cpu_at(core(2)).await,
        Err(Error::BadArgument { .. })
    ));
    assert!(matches!(
        cpus.hotplug_cpu_at(core(9)).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(cpus.set_vcpus(2).await.unwrap().achieved, 2);

    let memory = f.vm.memory_hotplugger().expect("two slots up to 1 GiB");
    let err = memory.hotplug_memory(100).await.unwrap_err();
    assert!(matches!(err, Error::BadArgument { .. }), "{err:?}");
    let err = err.to_string();
    assert!(
        err.contains("not a multiple of the guest's memory block size (128 MiB)"),
        "{err}"
    );
    let a = memory.hotplug_memory(256).await.unwrap();
    memory.hotplug_memory(128).await.unwrap();
    let full = memory.hotplug_memory(128).await.unwrap_err();
    assert!(matches!(full, Error::Exhausted { .. }), "{full:?}");
    let full = full.to_string();
    assert!(full.contains("all 2 memory slots are in use"), "{full}");
    memory.unplug_memory(&a).await.unwrap();
    let over = memory.hotplug_memory(1024).await.unwrap_err().to_string();
    assert!(over.contains("exceeds max_memory_mib 1024"), "{over}");
    assert_eq!(memory.query_memory().await.unwrap().plugged_mib, 128);

    let disk = || DiskConfig::new("d1", f.vm.config().kernel.path.clone());
    f.vm.hotplug_disk(disk()).await.unwrap();
    let ports =
        f.vm.hotplug_disk(DiskConfig::new("d2", f.vm.config().kernel.path.clone()))
            .await
            .unwrap_err()
            .to_string();
    assert!(ports.contains("all 1 hot-plug ports are in use"), "{ports}");
    f.vm.unplug("d1").await.unwrap();
    assert!(matches!(
        f.vm.unplug("d1").await.unwrap_err(),
        Error::NotFound { .. }
    ));
    f.vm.shutdown().await.unwrap();

    // Without room above boot, no hot-pluggers at all (capability honesty).
    let plain = fake(|c| {
        c.resources.max_vcpus = 1;
        c.resources.memory_slots = 0;
        c.resources.max_memory_mib = None;
    });
    assert!(plain.vm.cpu_hotplugger().is_none() && plain.vm.memory_hotplugger().is_none());
    let caps = plain.vm.vm_info().capabilities;
    assert!(!caps.contains(vmkit_core::Capabilities::CPU_HOTPLUG));
    assert!(!caps.contains(vmkit_core::Capabilities::MEMORY_HOTPLUG));
}

#[tokio::test]
async fn injected_faults_fail_the_operation_the_way_a_real_vmm_would() {
    // An error at start: StartFailed, nothing left.
    let f = fake(|_| {});
    f.vm.inject(Op::Start, Some(Fault::Error("QEMU said no".into())));
    let err = f.vm.start(StartOptions::new()).await.unwrap_err();
    assert_eq!(err.to_string(), "start: injected fault: QEMU said no");
    assert_eq!(f.vm.wait().await.reason, ExitReason::StartFailed);
    assert_released(&f);

    // A hang: the operation's deadline ends it; the VM still runs.
    let f = fake(|_| {});
    f.vm.start(StartOptions::new()).await.unwrap();
    f.vm.inject(Op::Pause, Some(Fault::Hang));
    let began = std::time::Instant::now();
    assert!(matches!(
        f.vm.pause().await.unwrap_err(),
        Error::Timeout { .. }
    ));
    assert!(began.elapsed() >= Duration::from_millis(200));
    assert_eq!(f.vm.state(), VmState::Running);
    f.vm.inject(Op::Pause, None);
    f.vm.pause().await.unwrap();

    // A crash during a hot-plug: the VM is gone, wait() says so.
    f.vm.resume().await.unwrap();
    f.vm.inject(Op::HotplugCpu, Some(Fault::Crash));
    let cpus = f.vm.cpu_hotplugger().unwrap();
    assert!(cpus.hotplug_cpu().await.is_err());
    let exit = f.vm.wait().await;
    assert_eq!(exit.reason, ExitReason::Crashed);
    assert_eq!(f.vm.state(), VmState::Shutdown);
    assert_eq!(
        f.vm.shutdown().await.unwrap(),
        exit,
        "shutdown reports the crash"
    );
    assert_released(&f);
}

#[tokio::test]
async fn a_crash_ends_the_agents_connections_and_a_silent_agent_times_start_out() {
    let f = fake(|_| {});
    f.vm.start(StartOptions::new()).await.unwrap();
    let agent = AgentClient::new(f.vm.client().await.unwrap());
    agent.ping(ctx(), &PingRequest::new()).await.unwrap();
    assert_eq!(f.vm.crash().await.reason, ExitReason::Crashed);
    let after = tokio::time::timeout(
        Duration::from_secs(2),
        agent.ping(ctx(), &PingRequest::new()),
    )
    .await
    .expect("the call ends instead of hanging");
    assert!(after.is_err(), "the crashed VM's agent still answered");
    assert_released(&f);

    let silent = fake(|c| c.timeouts.start = Duration::from_millis(300));
    silent.vm.silence_agent(true).unwrap();
    let err = silent.vm.start(StartOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(silent.vm.wait().await.reason, ExitReason::StartFailed);
    assert_released(&silent);
}

#[tokio::test]
async fn a_second_instance_on_a_live_state_dir_is_refused() {
    let first = fake(|_| {});
    first.vm.start(StartOptions::new()).await.unwrap();
    let config = first.vm.config().clone();
    let second = FakeBackend::new().create_fake(config).unwrap();
    let err = second.start(StartOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err:?}");
    // The first one's agent is untouched.
    AgentClient::new(first.vm.client().await.unwrap())
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();
    first.vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn dropping_a_running_fake_vm_leaves_nothing() {
    let f = fake(|_| {});
    f.vm.start(StartOptions::new()).await.unwrap();
    let state = f.vm.config().state_dir.clone();
    assert!(state.join("agent.sock").exists());
    let Vm { dir, vm } = f;
    drop(vm);
    for name in ["agent.sock", "stream.sock", "vmkit.lock"] {
        assert!(!state.join(name).exists(), "{name} left behind");
    }
    drop(dir);
}
