//! Every hot-plug operation against `MockQmpServer` (QEMU's answers, refusals and
//! events, scripted) and the real vmkit-agent in its host test mode over a fake guest's
//! `/proc` and `/sys` — no VM, milliseconds each. The mock's command log proves what was
//! sent, in particular what a rollback removed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use vmkit_core::{
    Accel, CpuTopology, DiskConfig, Error as CoreError, MemoryHotplug, NicBackend, NicConfig,
    Resources, VmEvent,
};
use vmkit_proto::AgentClient;
use vmkit_qmp::{QmpClient, QmpOptions};
use vmkit_testkit::fake_guest::{FakeGuest, GuestDisk, MEMORY_BLOCK_BYTES};
use vmkit_testkit::{MockQmpServer, MockReply};
use vmkit_vsock::GuestAddr;

use super::context::{AgentSource, Context, Limits};
use super::state::Hotplug;
use super::{cpu, memory, pci};
use crate::options::Machine;
use crate::qmp::Qmp;

const MIB: u64 = 1 << 20;
const BOOT_MIB: u64 = 512;

/// The agent of the fake guest, over its host-mode socket.
struct HostAgent {
    client: AgentClient,
    runs: bool,
}

#[async_trait::async_trait]
impl AgentSource for HostAgent {
    fn guest_runs(&self) -> bool {
        self.runs
    }

    async fn agent(&self) -> vmkit_core::Result<AgentClient> {
        Ok(self.client.clone())
    }
}

/// A mock QEMU, a fake guest with its agent, and the context an operation runs on.
struct Rig {
    qmp: MockQmpServer,
    guest: FakeGuest,
    ctx: Context,
    _agent: vmkit_agent::Serving,
    _dir: tempfile::TempDir,
}

fn resources(memory_hotplug: MemoryHotplug) -> Resources {
    let dimm = memory_hotplug == MemoryHotplug::Dimm;
    Resources {
        boot_vcpus: 1,
        max_vcpus: 3,
        memory_mib: BOOT_MIB,
        max_memory_mib: Some(BOOT_MIB + 512),
        memory_slots: if dimm { 2 } else { 0 },
        memory_hotplug,
    }
}

impl Rig {
    async fn new(memory_hotplug: MemoryHotplug, accel: Accel) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let qmp = MockQmpServer::start(dir.path().join("qmp.sock"))
            .await
            .unwrap();
        let client = QmpClient::connect(
            qmp.path(),
            QmpOptions {
                command_timeout: Duration::from_secs(5),
                ..QmpOptions::default()
            },
        )
        .await
        .unwrap();
        let guest = FakeGuest::create(&dir.path().join("guest")).unwrap();
        guest.boot(&[0], BOOT_MIB * MIB, &[]).unwrap();
        std::fs::create_dir_all(guest.agent_dir()).unwrap();
        let agent = vmkit_agent::start_with_root(
            &vmkit_agent::Listen::Unix(guest.agent_dir()),
            vmkit_agent::Limits::default(),
            guest.root(),
        )
        .unwrap();
        let addr = GuestAddr::Unix {
            dir: guest.agent_dir(),
            port: vmkit_proto::AGENT_PORT,
        };
        let ttrpc = vmkit_vsock::connect_ttrpc(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let (events, _) = broadcast::channel(64);
        pump_events(&client, events.clone());
        let limits = Limits {
            vm_id: "vm1".into(),
            resources: resources(memory_hotplug),
            machine: Machine::Q35,
            hotplug_ports: 2,
            shares_ram: true,
            accel,
            deadline: Duration::from_millis(400),
            unplug_ask_again: Duration::from_millis(150),
            state_dir: dir.path().to_owned(),
            log_dir: dir.path().to_owned(),
            virtiofsd: "/nonexistent/virtiofsd".into(),
        };
        let agent_source = Arc::new(HostAgent {
            client: AgentClient::new(ttrpc),
            runs: true,
        });
        let ctx = Context::new(
            Qmp::new(client),
            agent_source,
            limits,
            events,
            Arc::new(Hotplug::new(1)),
            Arc::default(),
        );
        Rig {
            qmp,
            guest,
            ctx,
            _agent: agent,
            _dir: dir,
        }
    }

    async fn dimm() -> Rig {
        Rig::new(MemoryHotplug::Dimm, Accel::Kvm).await
    }

    /// The same QEMU and agent seen through a new context: a guest that `runs` or is
    /// paused, and `limits` (the events, hot-plug state and device table start afresh).
    async fn reframe(&mut self, runs: bool, limits: Limits) {
        let agent = Arc::new(HostAgent {
            client: self.ctx.agent().await.unwrap(),
            runs,
        });
        self.ctx = Context::new(
            self.ctx.qmp().clone(),
            agent,
            limits,
            broadcast::channel(4).0,
            Arc::new(Hotplug::new(1)),
            Arc::default(),
        );
    }

    /// The names of the commands QEMU got, in order.
    fn sent(&self) -> Vec<String> {
        self.qmp
            .received_commands()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    /// The arguments of the last `name` command.
    fn args_of(&self, name: &str) -> Value {
        self.qmp
            .received_commands()
            .into_iter()
            .rev()
            .find(|c| c.name == name)
            .map(|c| c.arguments)
            .unwrap_or(Value::Null)
    }
}

/// QMP events into the context's stream, as the VM's event pump does.
fn pump_events(client: &QmpClient, events: broadcast::Sender<VmEvent>) {
    let mut rx = client.events();
    tokio::spawn(async move {
        while let Ok(event) = rx.recv().await {
            match crate::events::to_vm_event(&event) {
                Some(e) => {
                    let _ = events.send(e);
                }
                None => return,
            }
        }
    });
}

fn qemu_error(desc: &str) -> MockReply {
    MockReply::error("GenericError", desc)
}

// ---- vCPUs ----

/// `query-hotpluggable-cpus` and `query-cpus-fast` of QEMU 10 for `-smp 1,maxcpus=3`
/// with the cores in `plugged` present.
fn script_cpus(rig: &Rig, plugged: &'static [u32]) {
    let slots: Vec<Value> = (0..3u32)
        .rev()
        .map(|core| {
            let mut slot = json!({"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
                                  "props": {"socket-id": 0, "core-id": core, "thread-id": 0}});
            if core == 0 {
                slot["qom-path"] = json!("/machine/unattached/device[0]");
            } else if plugged.contains(&core) {
                slot["qom-path"] = json!(format!("/machine/peripheral/vmkit-cpu0-{core}-0"));
            }
            slot
        })
        .collect();
    rig.qmp
        .on("query-hotpluggable-cpus", MockReply::ok(json!(slots)));
    rig.qmp
        .on("query-cpus-fast", MockReply::ok(cpus_fast(plugged)));
}

fn cpus_fast(plugged: &[u32]) -> Value {
    let mut cores = vec![0];
    cores.extend_from_slice(plugged);
    json!(
        cores
            .iter()
            .map(|&core| {
                let path = if core == 0 {
                    "/machine/unattached/device[0]".to_owned()
                } else {
                    format!("/machine/peripheral/vmkit-cpu0-{core}-0")
                };
                json!({"cpu-index": core, "qom-path": path, "thread-id": 100 + core,
                       "props": {"socket-id": 0, "core-id": core, "thread-id": 0},
                       "target": "x86_64"})
            })
            .collect::<Vec<_>>()
    )
}

/// `device_add` of a vCPU that QEMU takes and the guest onlines (when `onlines`).
fn cpu_plug_works(rig: &Rig, onlines: bool) {
    let guest = rig.guest.clone();
    rig.qmp.on(
        "device_add",
        MockReply::from_fn(move |cmd| {
            let core = cmd.arguments["core-id"].as_u64().unwrap_or(0) as u32;
            if onlines {
                guest.set_online_cpus(&[0, core]).unwrap();
            }
            MockReply::ok(json!({}))
        }),
    );
}

#[tokio::test]
async fn a_vcpu_fills_the_first_free_slot_and_returns_once_online() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[]);
    cpu_plug_works(&rig, true);
    // Once plugged, QEMU lists core 1 (the query after device_add).
    let plugged = MockReply::ok(cpus_fast(&[1]));
    rig.qmp.on("query-cpus-fast", plugged);
    let cpu = cpu::add(&rig.ctx, None).await.unwrap();
    assert_eq!(cpu.index, 1);
    assert_eq!(cpu.device_id.as_deref(), Some("vmkit-cpu0-1-0"));
    assert_eq!(cpu.online, Some(true));
    let args = rig.args_of("device_add");
    assert_eq!(args["driver"], "qemu64-x86_64-cpu");
    assert_eq!(args["id"], "vmkit-cpu0-1-0");
    assert_eq!(
        (args["socket-id"].clone(), args["core-id"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(rig.ctx.state().vcpu_threads(), 2);
}

#[tokio::test]
async fn a_vcpu_qemu_refuses_comes_back_with_qemus_words() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[]);
    rig.qmp
        .on("device_add", qemu_error("CPU hot-plug not supported"));
    let err = cpu::add(&rig.ctx, None).await.unwrap_err();
    assert!(
        err.to_string().starts_with(
            "device_add cpu socket=0 core=1 thread=0: device_add: QMP error GenericError: CPU hot-plug not supported"
        ),
        "{err}"
    );
    assert_eq!(rig.ctx.state().vcpu_threads(), 1, "no thread was started");
}

#[tokio::test]
async fn no_free_vcpu_slot_is_exhausted_and_sends_nothing() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[1, 2]);
    let err = cpu::add(&rig.ctx, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Exhausted { .. }), "{err:?}");
    assert!(!rig.sent().contains(&"device_add".to_owned()));
}

#[tokio::test]
async fn a_named_slot_that_is_taken_or_missing_is_refused_before_device_add() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[2]);
    let at = |core| CpuTopology {
        socket: 0,
        core,
        thread: 0,
    };
    let taken = cpu::add(&rig.ctx, Some(at(2))).await.unwrap_err();
    assert!(matches!(taken, CoreError::BadArgument { .. }), "{taken:?}");
    let missing = cpu::add(&rig.ctx, Some(at(9))).await.unwrap_err();
    assert!(matches!(missing, CoreError::NotFound { .. }), "{missing:?}");
    assert!(!rig.sent().contains(&"device_add".to_owned()));
}

#[tokio::test]
async fn a_vcpu_the_guest_never_onlines_times_out_naming_it() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[]);
    cpu_plug_works(&rig, false);
    rig.qmp
        .on("query-cpus-fast", MockReply::ok(cpus_fast(&[1])));
    let err = cpu::add(&rig.ctx, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("the guest onlining cpu1 (vmkit-cpu0-1-0)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_vcpu_qemu_does_not_list_after_device_add_is_not_listed() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[]);
    cpu_plug_works(&rig, true);
    let err = cpu::add(&rig.ctx, None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("QEMU does not list vmkit-cpu0-1-0 after its device_add"),
        "{err}"
    );
}

#[tokio::test]
async fn under_tcg_a_vcpu_past_max_threads_is_unsupported_and_qemu_is_spared() {
    let rig = Rig::new(MemoryHotplug::Dimm, Accel::Tcg).await;
    script_cpus(&rig, &[]);
    rig.ctx.state().count_vcpu_thread();
    rig.ctx.state().count_vcpu_thread();
    let err = cpu::add(&rig.ctx, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Unsupported { .. }), "{err:?}");
    assert!(!rig.sent().contains(&"device_add".to_owned()));
}

#[tokio::test]
async fn unplugging_a_vcpu_checks_it_then_waits_until_qemu_drops_it() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[1]);
    let missing = cpu::remove(&rig.ctx, 7).await.unwrap_err();
    assert!(matches!(missing, CoreError::NotFound { .. }), "{missing:?}");
    let boot = cpu::remove(&rig.ctx, 0).await.unwrap_err();
    assert!(matches!(boot, CoreError::BadArgument { .. }), "{boot:?}");
    assert!(!rig.sent().contains(&"device_del".to_owned()));
    // QEMU takes the device_del; the next query no longer lists it.
    rig.qmp.on("device_del", MockReply::ok(json!({})));
    rig.qmp
        .on_once("query-cpus-fast", MockReply::ok(cpus_fast(&[1])));
    rig.qmp.on("query-cpus-fast", MockReply::ok(cpus_fast(&[])));
    cpu::remove(&rig.ctx, 1).await.unwrap();
    assert_eq!(rig.args_of("device_del"), json!({"id": "vmkit-cpu0-1-0"}));
}

#[tokio::test]
async fn a_guest_that_refuses_the_eject_is_reported_at_once() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[1]);
    rig.qmp.on(
        "device_del",
        MockReply::ok(json!({})).then_event(
            "ACPI_DEVICE_OST",
            json!({"info": {"device": "vmkit-cpu0-1-0", "slot": "1", "slot-type": "CPU",
                            "source": 3, "status": 0x82}}),
        ),
    );
    let began = std::time::Instant::now();
    let err = cpu::remove(&rig.ctx, 1).await.unwrap_err();
    assert!(err.to_string().ends_with("(device busy)"), "{err}");
    assert!(
        began.elapsed() < Duration::from_millis(300),
        "before the deadline"
    );
}

#[tokio::test]
async fn a_vcpu_the_guest_never_releases_times_out() {
    let rig = Rig::dimm().await;
    script_cpus(&rig, &[1]);
    rig.qmp.on("device_del", MockReply::ok(json!({})));
    let err = cpu::remove(&rig.ctx, 1).await.unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
}

// ---- DIMMs ----

fn dimm_entry(id: &str, size_mib: u64, slot: u32) -> Value {
    json!({"type": "dimm", "data": {"id": id, "addr": 0x1_0000_0000u64 + u64::from(slot) * (1 << 30),
           "slot": slot, "node": 0, "memdev": format!("/objects/{id}-ram"),
           "size": size_mib * MIB, "hotplugged": true, "hotpluggable": true}})
}

/// `device_add pc-dimm` that QEMU takes and the guest onlines (when `onlines`).
fn dimm_plug_works(rig: &Rig, onlines: bool) {
    let guest = rig.guest.clone();
    rig.qmp.on("object-add", MockReply::ok(json!({})));
    rig.qmp.on(
        "device_add",
        MockReply::from_fn(move |_| {
            if onlines {
                guest.set_memory((BOOT_MIB + 256) * MIB).unwrap();
            }
            MockReply::ok(json!({}))
        }),
    );
}

#[tokio::test]
async fn a_dimm_gets_a_shared_backend_and_returns_once_the_guest_has_it() {
    let rig = Rig::dimm().await;
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    dimm_plug_works(&rig, true);
    let id = memory::add(&rig.ctx, 256, None).await.unwrap();
    assert_eq!(id, "vmkit-mem0");
    assert_eq!(
        rig.args_of("object-add"),
        json!({"qom-type": "memory-backend-memfd", "id": "vmkit-mem0-ram",
               "size": 256 * MIB, "share": true})
    );
    assert_eq!(
        rig.args_of("device_add"),
        json!({"driver": "pc-dimm", "id": "vmkit-mem0", "memdev": "vmkit-mem0-ram"})
    );
}

#[tokio::test]
async fn a_dimm_qemu_refuses_takes_its_backend_with_it() {
    let rig = Rig::dimm().await;
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    rig.qmp.on("object-add", MockReply::ok(json!({})));
    rig.qmp.on("object-del", MockReply::ok(json!({})));
    rig.qmp.on("device_add", qemu_error("slot 1 is busy"));
    let err = memory::add(&rig.ctx, 256, None).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("device_add pc-dimm vmkit-mem0 (256 MiB): device_add: QMP error"),
        "{err}"
    );
    assert!(err.to_string().contains("slot 1 is busy"), "{err}");
    assert_eq!(rig.args_of("object-del"), json!({"id": "vmkit-mem0-ram"}));
}

#[tokio::test]
async fn a_refused_backend_sends_no_device() {
    let rig = Rig::dimm().await;
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    rig.qmp
        .on("object-add", qemu_error("cannot allocate memory"));
    let err = memory::add(&rig.ctx, 256, None).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("object-add memory-backend-memfd vmkit-mem0-ram: object-add: QMP error"),
        "{err}"
    );
    assert!(!rig.sent().contains(&"device_add".to_owned()));
}

#[tokio::test]
async fn a_dimm_the_guest_never_onlines_is_rolled_back() {
    let rig = Rig::dimm().await;
    dimm_plug_works(&rig, false);
    rig.qmp
        .on_once("query-memory-devices", MockReply::ok(json!([])));
    // The rollback's eject: QEMU lists the DIMM once more, then not.
    rig.qmp.on_once(
        "query-memory-devices",
        MockReply::ok(json!([dimm_entry("vmkit-mem0", 256, 0)])),
    );
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    rig.qmp.on("device_del", MockReply::ok(json!({})));
    rig.qmp.on("object-del", MockReply::ok(json!({})));
    let err = memory::add(&rig.ctx, 256, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("the guest onlining vmkit-mem0"),
        "{err}"
    );
    assert_eq!(rig.args_of("device_del"), json!({"id": "vmkit-mem0"}));
    assert_eq!(rig.args_of("object-del"), json!({"id": "vmkit-mem0-ram"}));
}

#[tokio::test]
async fn dimm_sizes_and_limits_are_checked_before_anything_changes() {
    let rig = Rig::dimm().await;
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    let odd = memory::add(&rig.ctx, 100, None).await.unwrap_err();
    assert!(matches!(odd, CoreError::BadArgument { .. }), "{odd:?}");
    assert!(
        odd.to_string().contains(&format!(
            "memory block size ({} MiB)",
            MEMORY_BLOCK_BYTES / MIB
        )),
        "{odd}"
    );
    let too_much = memory::add(&rig.ctx, 640, None).await.unwrap_err();
    assert!(
        matches!(too_much, CoreError::Exhausted { .. }),
        "{too_much:?}"
    );
    rig.qmp.on(
        "query-memory-devices",
        MockReply::ok(json!([
            dimm_entry("vmkit-mem0", 128, 0),
            dimm_entry("vmkit-mem1", 128, 1)
        ])),
    );
    let no_slot = memory::add(&rig.ctx, 128, None).await.unwrap_err();
    assert!(
        no_slot.to_string().contains("all 2 DIMM slots are in use"),
        "{no_slot}"
    );
    assert!(
        rig.sent().iter().all(|c| c == "query-memory-devices"),
        "{:?}",
        rig.sent()
    );
}

#[tokio::test]
async fn unplugging_a_dimm_ejects_it_then_deletes_its_backend() {
    let rig = Rig::dimm().await;
    rig.qmp.on_once(
        "query-memory-devices",
        MockReply::ok(json!([dimm_entry("vmkit-mem0", 128, 0)])),
    );
    let missing = memory::remove(&rig.ctx, "vmkit-mem7").await.unwrap_err();
    assert!(matches!(missing, CoreError::NotFound { .. }), "{missing:?}");
    rig.qmp.on_once(
        "query-memory-devices",
        MockReply::ok(json!([dimm_entry("vmkit-mem0", 128, 0)])),
    );
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    rig.qmp.on("device_del", MockReply::ok(json!({})));
    rig.qmp.on("object-del", MockReply::ok(json!({})));
    memory::remove(&rig.ctx, "vmkit-mem0").await.unwrap();
    let sent = rig.sent();
    let del = sent.iter().position(|c| c == "device_del").unwrap();
    let obj = sent.iter().position(|c| c == "object-del").unwrap();
    assert!(del < obj, "the device goes before its backend: {sent:?}");
}

// ---- virtio-mem ----

fn virtio_mem(size_mib: u64, requested_mib: u64) -> Value {
    json!([{"type": "virtio-mem", "data": {"id": crate::command::VIRTIO_MEM_ID,
            "memaddr": 0x1_0000_0000u64, "requested-size": requested_mib * MIB,
            "size": size_mib * MIB, "max-size": 512 * MIB, "block-size": 2 * MIB,
            "node": 0, "memdev": "/objects/vmkit-vmem-ram"}}])
}

#[tokio::test]
async fn virtio_mem_raises_the_request_and_rolls_it_back_when_the_guest_never_plugs() {
    let rig = Rig::new(MemoryHotplug::VirtioMem, Accel::Kvm).await;
    rig.qmp
        .on("query-memory-devices", MockReply::ok(virtio_mem(0, 0)));
    let guest = rig.guest.clone();
    rig.qmp.on_once(
        "qom-set",
        MockReply::from_fn(move |_| {
            guest.set_memory((BOOT_MIB + 128) * MIB).unwrap();
            MockReply::ok(json!({}))
        }),
    );
    let id = memory::add(&rig.ctx, 128, None).await.unwrap();
    assert_eq!(id, "vmkit-vmem.0");
    assert_eq!(rig.args_of("qom-set")["value"], json!(128 * MIB));
    // A second grant the guest never plugs: the request goes back to what it was.
    rig.qmp.on("qom-set", MockReply::ok(json!({})));
    rig.qmp
        .on("query-memory-devices", MockReply::ok(virtio_mem(128, 128)));
    let err = memory::add(&rig.ctx, 128, None).await.unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
    assert_eq!(rig.args_of("qom-set")["value"], json!(128 * MIB));
    assert_eq!(rig.ctx.state().grants().len(), 1, "only the first grant");
    let slot = memory::add(&rig.ctx, 128, Some(0)).await.unwrap_err();
    assert!(matches!(slot, CoreError::BadArgument { .. }), "{slot:?}");
    let odd = memory::add(&rig.ctx, 3, None).await.unwrap_err();
    assert!(matches!(odd, CoreError::BadArgument { .. }), "{odd:?}");
    let too_much = memory::add(&rig.ctx, 512, None).await.unwrap_err();
    assert!(
        matches!(too_much, CoreError::Exhausted { .. }),
        "{too_much:?}"
    );
}

#[tokio::test]
async fn a_virtio_mem_grant_the_guest_only_partly_releases_shrinks() {
    let rig = Rig::new(MemoryHotplug::VirtioMem, Accel::Kvm).await;
    rig.ctx.state().grants().push(super::state::Grant {
        id: "vmkit-vmem.0".into(),
        size_mib: 256,
    });
    let missing = memory::remove(&rig.ctx, "vmkit-vmem.9").await.unwrap_err();
    assert!(matches!(missing, CoreError::NotFound { .. }), "{missing:?}");
    rig.qmp.on("qom-set", MockReply::ok(json!({})));
    // The guest gives back 128 of the 256 MiB and no more.
    rig.qmp
        .on_once("query-memory-devices", MockReply::ok(virtio_mem(256, 256)));
    rig.qmp
        .on("query-memory-devices", MockReply::ok(virtio_mem(128, 0)));
    let err = memory::remove(&rig.ctx, "vmkit-vmem.0").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the guest released 128 of 256 MiB"),
        "{err}"
    );
    assert_eq!(
        rig.ctx.state().grants()[0].size_mib,
        128,
        "the grant keeps what is still plugged"
    );
    assert_eq!(
        rig.args_of("qom-set")["value"],
        json!(128 * MIB),
        "QEMU stops asking for more than is plugged"
    );
}

// ---- disks and NICs ----

fn disk(dir: &std::path::Path, id: &str) -> DiskConfig {
    let path = dir.join(format!("{id}.img"));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let mut disk = DiskConfig::new(id, path);
    disk.serial = Some(format!("ser-{id}"));
    disk
}

/// `device_del` of `id` answered, and the device gone (`DEVICE_DELETED`).
fn device_deleted(id: &str) -> MockReply {
    MockReply::ok(json!({})).then_event(
        "DEVICE_DELETED",
        json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
    )
}

/// Hot-plugs the disk `data` (its block node added, the guest listing it).
async fn plug_disk_data(rig: &Rig) {
    rig.qmp.on("blockdev-add", MockReply::ok(json!({})));
    disk_plug_works(rig);
    pci::add_disk(&rig.ctx, disk(rig._dir.path(), "data"))
        .await
        .unwrap();
}

/// `device_add` of the disk `data` (serial `ser-data`) that QEMU takes and the guest
/// lists.
fn disk_plug_works(rig: &Rig) {
    let guest = rig.guest.clone();
    rig.qmp.on(
        "device_add",
        MockReply::from_fn(move |_| {
            guest
                .put_disk(&GuestDisk {
                    name: "vda".into(),
                    serial: "ser-data".into(),
                    size_bytes: 4096,
                })
                .unwrap();
            MockReply::ok(json!({}))
        }),
    );
}

#[tokio::test]
async fn a_disk_lands_on_a_free_port_and_returns_once_the_guest_lists_it() {
    let rig = Rig::dimm().await;
    plug_disk_data(&rig).await;
    let device = rig.args_of("device_add");
    assert_eq!(device["driver"], "virtio-blk-pci");
    assert_eq!(device["id"], "data");
    assert_eq!(device["bus"], "vmkit-rp0");
    assert_eq!(device["drive"], rig.args_of("blockdev-add")["node-name"]);
    assert_eq!(rig.ctx.devices().hot_count(), 1);
}

#[tokio::test]
async fn a_disk_qemu_refuses_takes_its_block_node_with_it() {
    let rig = Rig::dimm().await;
    rig.qmp.on("blockdev-add", MockReply::ok(json!({})));
    rig.qmp.on("blockdev-del", MockReply::ok(json!({})));
    rig.qmp.on(
        "device_add",
        qemu_error("Bus 'vmkit-rp0' does not support hotplugging"),
    );
    let err = pci::add_disk(&rig.ctx, disk(rig._dir.path(), "data"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("device_add virtio-blk-pci data on vmkit-rp0: device_add: QMP error"),
        "{err}"
    );
    assert_eq!(
        rig.args_of("blockdev-del")["node-name"],
        rig.args_of("blockdev-add")["node-name"]
    );
    assert!((rig.ctx.devices().hot_count() == 0));
}

#[tokio::test]
async fn a_refused_block_node_sends_no_device() {
    let rig = Rig::dimm().await;
    rig.qmp.on(
        "blockdev-add",
        qemu_error("Could not open '/nope': No such file"),
    );
    let err = pci::add_disk(&rig.ctx, disk(rig._dir.path(), "data"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("blockdev-add vmkit-hot0"),
        "{err}"
    );
    assert!(!rig.sent().contains(&"device_add".to_owned()));
}

#[tokio::test]
async fn ports_run_out_and_ids_must_be_free() {
    let rig = Rig::dimm().await;
    rig.qmp.on("blockdev-add", MockReply::ok(json!({})));
    rig.qmp.on("device_add", MockReply::ok(json!({})));
    let dir = rig._dir.path().to_owned();
    let mut no_serial = disk(&dir, "a");
    no_serial.serial = None;
    // Without a serial the guest's disk count must go up: make the fake guest show one.
    let guest = rig.guest.clone();
    rig.qmp.on(
        "device_add",
        MockReply::from_fn(move |cmd| {
            let n = cmd.seq;
            guest
                .put_disk(&GuestDisk {
                    name: format!("vd{}", (b'a' + (n % 26) as u8) as char),
                    serial: String::new(),
                    size_bytes: 4096,
                })
                .unwrap();
            MockReply::ok(json!({}))
        }),
    );
    pci::add_disk(&rig.ctx, no_serial).await.unwrap();
    let mut b = disk(&dir, "b");
    b.serial = None;
    pci::add_disk(&rig.ctx, b).await.unwrap();
    let full = pci::add_disk(&rig.ctx, disk(&dir, "c")).await.unwrap_err();
    assert!(matches!(full, CoreError::Exhausted { .. }), "{full:?}");
    let again = pci::add_disk(&rig.ctx, disk(&dir, "a")).await.unwrap_err();
    assert!(matches!(again, CoreError::BadArgument { .. }), "{again:?}");
}

fn tap_fd_nic(id: &str, fd: &vmkit_core::HostFd) -> NicConfig {
    NicConfig {
        id: id.into(),
        backend: NicBackend::TapFd { fd: fd.clone() },
        mac: None,
    }
}

fn an_fd() -> vmkit_core::HostFd {
    let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    fd.into()
}

#[tokio::test]
async fn a_nic_passes_its_fd_and_each_refusal_removes_what_came_before() {
    let rig = Rig::dimm().await;
    let fd = an_fd();
    rig.qmp.on("getfd", MockReply::ok(json!({})));
    rig.qmp.on("closefd", MockReply::ok(json!({})));
    rig.qmp.on_once("netdev_add", qemu_error("tap: bad fd"));
    let err = pci::add_nic(&rig.ctx, tap_fd_nic("net0", &fd))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("netdev_add tap vmkit-hotnet0"),
        "{err}"
    );
    assert_eq!(
        rig.args_of("closefd"),
        json!({"fdname": "vmkit-hotnet0-fd"})
    );
    assert_eq!(
        rig.args_of("netdev_add"),
        json!({"type": "tap", "id": "vmkit-hotnet0", "fd": "vmkit-hotnet0-fd"})
    );
    // The netdev is taken; the device is refused: the netdev goes again.
    rig.qmp.on("netdev_add", MockReply::ok(json!({})));
    rig.qmp.on("netdev_del", MockReply::ok(json!({})));
    rig.qmp.on_once("device_add", qemu_error("MAC in use"));
    let err = pci::add_nic(&rig.ctx, tap_fd_nic("net0", &fd))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MAC in use"), "{err}");
    assert_eq!(rig.args_of("netdev_del"), json!({"id": "vmkit-hotnet0"}));
    assert!((rig.ctx.devices().hot_count() == 0));
}

#[tokio::test]
async fn a_nic_returns_once_the_guest_lists_its_mac() {
    let rig = Rig::dimm().await;
    let fd = an_fd();
    for ok in ["getfd", "netdev_add", "device_add"] {
        rig.qmp.on(ok, MockReply::ok(json!({})));
    }
    // The fake guest lists no NICs: the call waits for the MAC, then times out.
    let err = pci::add_nic(&rig.ctx, tap_fd_nic("net0", &fd))
        .await
        .unwrap_err();
    let mac = crate::devices::stable_mac("vm1", "net0").to_string();
    assert!(
        err.to_string().contains(&format!("a NIC with MAC {mac}")),
        "{err}"
    );
    assert_eq!(rig.args_of("device_add")["mac"], json!(mac));
    assert_eq!(rig.args_of("device_add")["bus"], "vmkit-rp0");
}

#[tokio::test]
async fn unplugging_a_device_waits_for_device_deleted_then_removes_its_backend() {
    let rig = Rig::dimm().await;
    let missing = pci::remove_device(&rig.ctx, "nope").await.unwrap_err();
    assert!(matches!(missing, CoreError::NotFound { .. }), "{missing:?}");
    rig.qmp.on("blockdev-del", MockReply::ok(json!({})));
    plug_disk_data(&rig).await;
    // No DEVICE_DELETED: a timeout, and the device stays recorded.
    rig.qmp.on_once("device_del", MockReply::ok(json!({})));
    let err = pci::remove_device(&rig.ctx, "data").await.unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
    assert_eq!(rig.ctx.devices().hot_count(), 1);
    rig.qmp.on("device_del", device_deleted("data"));
    pci::remove_device(&rig.ctx, "data").await.unwrap();
    assert!((rig.ctx.devices().hot_count() == 0));
    assert!(
        rig.sent()
            .ends_with(&["device_del".to_owned(), "blockdev-del".to_owned()])
    );
}

/// A guest that ignored the first `device_del` (pressed while it still brought the slot
/// up) is asked again, and the unplug ends when it answers the repeat.
#[tokio::test]
async fn an_unplug_the_guest_ignored_is_asked_again() {
    let rig = Rig::dimm().await;
    rig.qmp.on("blockdev-del", MockReply::ok(json!({})));
    plug_disk_data(&rig).await;
    rig.qmp.on("device_del", device_deleted("data"));
    rig.qmp.on_once("device_del", MockReply::ok(json!({})));
    pci::remove_device(&rig.ctx, "data").await.unwrap();
    assert_eq!(rig.ctx.devices().hot_count(), 0);
    let dels = rig.sent().iter().filter(|c| *c == "device_del").count();
    assert_eq!(dels, 2, "{:?}", rig.sent());
}

#[tokio::test]
async fn a_paused_guest_is_not_asked_by_a_query() {
    let mut rig = Rig::dimm().await;
    script_cpus(&rig, &[]);
    let ctx = rig.ctx.clone();
    let cpus = cpu::query(&ctx).await.unwrap();
    assert_eq!(cpus[0].online, Some(true), "a running guest is asked");
    // The same context with a paused guest: QEMU's view only.
    let limits = rig.ctx.limits().clone();
    rig.reframe(false, limits).await;
    let cpus = cpu::query(&rig.ctx).await.unwrap();
    assert_eq!(cpus[0].online, None);
}

#[tokio::test]
async fn query_cpus_matches_the_guests_cpus_by_place_when_it_reports_them() {
    let rig = Rig::dimm().await;
    // Core 2 plugged first: QEMU calls it cpu-index 2, the guest calls it cpu1.
    script_cpus(&rig, &[2]);
    rig.guest.set_online_cpus(&[0, 1]).unwrap();
    let by_number = cpu::query(&rig.ctx).await.unwrap();
    assert_eq!(
        by_number.iter().map(|c| c.online).collect::<Vec<_>>(),
        [Some(true), Some(false)],
        "without topology only the numbers can be matched (and they differ)"
    );
    for (cpu, core) in [(0, "0"), (1, "2")] {
        let topo = rig
            .guest
            .root()
            .join(format!("sys/devices/system/cpu/cpu{cpu}/topology"));
        std::fs::create_dir_all(&topo).unwrap();
        std::fs::write(topo.join("physical_package_id"), "0").unwrap();
        std::fs::write(topo.join("core_id"), core).unwrap();
        std::fs::write(topo.join("thread_siblings_list"), cpu.to_string()).unwrap();
    }
    let by_place = cpu::query(&rig.ctx).await.unwrap();
    assert_eq!(
        by_place
            .iter()
            .map(|c| (c.topology.core, c.online))
            .collect::<Vec<_>>(),
        [(0, Some(true)), (2, Some(true))]
    );
}

/// An operation under test, and the QMP commands it sends on its way to success.
struct Steps {
    name: &'static str,
    commands: &'static [&'static str],
}

impl Steps {
    async fn rig(&self) -> Rig {
        let memory = if self.name == "hotplug_virtio_mem" {
            MemoryHotplug::VirtioMem
        } else {
            MemoryHotplug::Dimm
        };
        Rig::new(memory, Accel::Kvm).await
    }
}

/// Scripts every command an operation sends to succeed (and the guest to follow), so
/// that one of them can then be made to fail.
fn script_success(rig: &Rig, name: &str) {
    let ok = || MockReply::ok(json!({}));
    match name {
        "hotplug_cpu" => {
            script_cpus(rig, &[]);
            cpu_plug_works(rig, true);
            rig.qmp
                .on("query-cpus-fast", MockReply::ok(cpus_fast(&[1])));
        }
        "unplug_cpu" => {
            script_cpus(rig, &[1]);
            rig.qmp.on("device_del", ok());
            rig.qmp
                .on_once("query-cpus-fast", MockReply::ok(cpus_fast(&[1])));
            rig.qmp.on("query-cpus-fast", MockReply::ok(cpus_fast(&[])));
        }
        "hotplug_memory" => {
            rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
            dimm_plug_works(rig, true);
            rig.qmp.on("object-del", ok());
        }
        "hotplug_virtio_mem" => {
            rig.qmp
                .on("query-memory-devices", MockReply::ok(virtio_mem(0, 0)));
            let guest = rig.guest.clone();
            rig.qmp.on(
                "qom-set",
                MockReply::from_fn(move |_| {
                    guest.set_memory((BOOT_MIB + 128) * MIB).unwrap();
                    MockReply::ok(json!({}))
                }),
            );
        }
        "hotplug_disk" | "hotplug_nic" => {
            for command in [
                "blockdev-add",
                "blockdev-del",
                "getfd",
                "closefd",
                "netdev_add",
                "netdev_del",
            ] {
                rig.qmp.on(command, ok());
            }
            disk_plug_works(rig);
        }
        other => panic!("no script for {other}"),
    }
}

async fn run(rig: &Rig, name: &str) -> vmkit_core::Result<()> {
    match name {
        "hotplug_cpu" => cpu::add(&rig.ctx, None).await.map(drop),
        "unplug_cpu" => cpu::remove(&rig.ctx, 1).await,
        "hotplug_memory" => memory::add(&rig.ctx, 256, None).await.map(drop),
        "hotplug_virtio_mem" => memory::add(&rig.ctx, 128, None).await.map(drop),
        "hotplug_disk" => pci::add_disk(&rig.ctx, disk(rig._dir.path(), "data")).await,
        "hotplug_nic" => pci::add_nic(&rig.ctx, tap_fd_nic("net0", &an_fd())).await,
        other => panic!("no operation {other}"),
    }
}

#[tokio::test]
async fn a_qmp_error_at_any_step_is_reported_with_qemus_words_and_leaves_nothing_recorded() {
    let table = [
        Steps {
            name: "hotplug_cpu",
            commands: &["query-hotpluggable-cpus", "device_add", "query-cpus-fast"],
        },
        Steps {
            name: "unplug_cpu",
            commands: &["query-cpus-fast", "device_del"],
        },
        Steps {
            name: "hotplug_memory",
            commands: &["query-memory-devices", "object-add", "device_add"],
        },
        Steps {
            name: "hotplug_virtio_mem",
            commands: &["query-memory-devices", "qom-set"],
        },
        Steps {
            name: "hotplug_disk",
            commands: &["blockdev-add", "device_add"],
        },
        Steps {
            name: "hotplug_nic",
            commands: &["getfd", "netdev_add", "device_add"],
        },
    ];
    for steps in &table {
        // The scripted path works end to end first, so each failure below is the
        // injected one.
        let rig = steps.rig().await;
        script_success(&rig, steps.name);
        if steps.name != "hotplug_nic" {
            run(&rig, steps.name)
                .await
                .unwrap_or_else(|e| panic!("{}: the scripted path fails: {e}", steps.name));
        }
        for failing in steps.commands {
            let rig = steps.rig().await;
            script_success(&rig, steps.name);
            rig.qmp.on_once(failing, qemu_error("injected"));
            let err = run(&rig, steps.name).await.unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("{failing}: QMP error GenericError: injected")),
                "{} with {failing} failing: {text}",
                steps.name
            );
            assert!(
                (rig.ctx.devices().hot_count() == 0),
                "{} with {failing} failing: a device stays recorded",
                steps.name
            );
        }
    }
}

#[tokio::test]
async fn virtio_mem_needs_its_device_and_keeps_to_its_size() {
    let rig = Rig::new(MemoryHotplug::VirtioMem, Accel::Kvm).await;
    rig.qmp.on("query-memory-devices", MockReply::ok(json!([])));
    let missing = memory::add(&rig.ctx, 128, None).await.unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("QEMU does not list the virtio-mem device vmkit-vmem"),
        "{missing}"
    );
    // Someone else (not vmkit's grants) asked QEMU for all of it already.
    rig.qmp
        .on("query-memory-devices", MockReply::ok(virtio_mem(512, 512)));
    let full = memory::add(&rig.ctx, 128, None).await.unwrap_err();
    assert!(matches!(full, CoreError::Exhausted { .. }), "{full:?}");
    assert!(!rig.sent().contains(&"qom-set".to_owned()));
}

#[tokio::test]
async fn a_virtio_mem_grant_given_back_whole_is_gone() {
    let rig = Rig::new(MemoryHotplug::VirtioMem, Accel::Kvm).await;
    rig.ctx.state().grants().push(super::state::Grant {
        id: "vmkit-vmem.0".into(),
        size_mib: 128,
    });
    rig.qmp.on("qom-set", MockReply::ok(json!({})));
    rig.qmp
        .on_once("query-memory-devices", MockReply::ok(virtio_mem(128, 128)));
    rig.qmp
        .on("query-memory-devices", MockReply::ok(virtio_mem(0, 0)));
    memory::remove(&rig.ctx, "vmkit-vmem.0").await.unwrap();
    assert_eq!(rig.args_of("qom-set")["value"], json!(0));
    assert!(rig.ctx.state().grants().is_empty());
    let info = memory::query(&rig.ctx).await.unwrap();
    assert_eq!((info.plugged_mib, info.dimms.len()), (0, 0));
    assert_eq!(info.guest_total_mib, Some(BOOT_MIB));
}

#[tokio::test]
async fn a_disk_the_guest_never_lists_times_out_naming_it() {
    let rig = Rig::dimm().await;
    rig.qmp.on("blockdev-add", MockReply::ok(json!({})));
    rig.qmp.on("device_add", MockReply::ok(json!({})));
    let err = pci::add_disk(&rig.ctx, disk(rig._dir.path(), "data"))
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("the guest showing the new disk"),
        "{err}"
    );
}

#[tokio::test]
async fn a_hot_plug_may_not_take_a_cold_devices_id() {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::dimm().await;
    rig.ctx
        .devices()
        .add_cold(disk(dir.path(), "root").into(), || Ok(()))
        .unwrap();
    let err = pci::add_disk(&rig.ctx, disk(dir.path(), "root"))
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::BadArgument { .. }), "{err:?}");
    assert!(
        err.to_string().contains("a cold-plugged device has it"),
        "{err}"
    );
    assert!(rig.sent().is_empty(), "{:?}", rig.sent());
}

#[tokio::test]
async fn a_backend_qemu_will_not_delete_after_the_device_went_is_reported() {
    let rig = Rig::dimm().await;
    plug_disk_data(&rig).await;
    rig.qmp.on("device_del", device_deleted("data"));
    rig.qmp
        .on("blockdev-del", qemu_error("Node vmkit-hot0 is in use"));
    let err = pci::remove_device(&rig.ctx, "data").await.unwrap_err();
    assert!(
        err.to_string().starts_with("blockdev-del vmkit-hot0"),
        "{err}"
    );
    assert!(
        (rig.ctx.devices().hot_count() == 0),
        "the device itself is gone from QEMU"
    );
}

#[tokio::test]
async fn a_nic_without_tap_is_not_hot_plugged() {
    let rig = Rig::dimm().await;
    let user = NicConfig {
        id: "net9".into(),
        backend: NicBackend::User,
        mac: None,
    };
    let err = pci::add_nic(&rig.ctx, user).await.unwrap_err();
    assert!(matches!(err, CoreError::Unsupported { .. }), "{err:?}");
    assert!(rig.sent().is_empty(), "{:?}", rig.sent());
}
