//! The QEMU backend arriving at run time, with the real test guest under QEMU (TCG):
//! loaded from this crate's library (`libvmkit_plugin_qemu.so`, which `cargo xtask
//! test` builds first) and served out of process by `vmkit-backend-qemu`. Each
//! transport passes the whole conformance suite, and a VM started through it answers
//! `Ping` and `Exec` on its agent and takes a vCPU — as the static backend does in
//! vmkit-qemu's own tests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use vmkit_core::{Backend, Instance, InstanceConfig, StartOptions, VmState};
use vmkit_plugin::PluginBackend;
use vmkit_plugin::process::ProcessChannel;
use vmkit_testkit::GuestImage;
use vmkit_testkit::conformance::{self, Target};

/// One real VM at a time on these 2-core machines.
static VMS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(1));

fn setup() -> Option<GuestImage> {
    vmkit_testkit::qemu::require_qemu()?;
    vmkit_testkit::require_guest_image()
}

/// `target/<profile>/libvmkit_plugin_qemu.so`.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join("libvmkit_plugin_qemu.so");
    assert!(
        path.is_file(),
        "{} is missing: `cargo build -p vmkit-plugin-qemu` (cargo xtask test does)",
        path.display()
    );
    path
}

struct Plugged {
    backend: PluginBackend,
    image: GuestImage,
    dir: tempfile::TempDir,
}

#[async_trait::async_trait]
impl Target for Plugged {
    fn backend(&self) -> &dyn Backend {
        &self.backend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        self.image.config(id, &self.dir.path().join(id))
    }

    fn disk(&self) -> Option<PathBuf> {
        let path = self.dir.path().join("conformance.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(8 << 20))
            .unwrap();
        Some(path)
    }

    /// A TAP NIC: vmkit creates it (root with `/dev/net/tun`, as under CI; elsewhere
    /// the NIC part is left out, and the check's note says so).
    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        vmkit_testkit::qemu::tap_nic(id, vmkit_qemu::probe_tap)
    }

    async fn crash(&self, vm: &dyn Instance) -> bool {
        vmkit_testkit::conformance::kill_vmm(vm)
    }

    /// A real guest's boot takes about 2 s here.
    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        Some(self.config(id))
    }

    fn environment_fault(&self, failure: &str) -> bool {
        vmkit_testkit::guest::vsock_daemon_fault(failure)
    }

    /// The CID a kernel-vsock VM leased: the plugin's QEMU backend takes its lease in
    /// the same lock dir, so the lock file tells from this process.
    fn held_outside(&self, info: &vmkit_core::VmInfo) -> Result<Vec<String>, String> {
        Ok(conformance::cid_still_leased(info, vmkit_qemu::cid_in_use))
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// Start (once more if the vsock daemon never served it), Ping, Exec, a vCPU, shutdown.
async fn drive(target: &Plugged) {
    let mut vm = target.backend.create(target.config("drive")).unwrap();
    if let Err(e) = vm.start(StartOptions::new()).await {
        assert!(target.environment_fault(&e.to_string()), "start: {e}");
        vm = target.backend.create(target.config("drive-again")).unwrap();
        vm.start(StartOptions::new()).await.unwrap();
    }
    assert_eq!(vm.state(), VmState::Running);
    let agent = vmkit_proto::AgentClient::new(vm.client().await.unwrap());
    agent
        .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
        .await
        .unwrap();
    let mut exec = vmkit_proto::agent::ExecRequest::new();
    exec.argv = vec!["/bin/sh".into(), "-c".into(), "echo plugged".into()];
    let out = agent.exec(ctx(), &exec).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plugged\n");
    let cpu = vm.cpu_hotplugger().unwrap().hotplug_cpu().await.unwrap();
    assert_eq!(cpu.online, Some(true), "{cpu:?}");
    assert_eq!(
        vm.cpu_hotplugger()
            .unwrap()
            .query_cpus()
            .await
            .unwrap()
            .len(),
        2
    );
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(vm.state(), VmState::Shutdown);
    assert_eq!(vm.shutdown().await.unwrap(), exit);
}

/// A start whose caller gives up while the guest boots: the call is cancelled in the
/// plugin, whose QEMU backend then ends the VM — no QEMU, vsock daemon or socket is
/// left within 5 s, and the host's state says so.
async fn dropped_start(target: &Plugged) {
    for (n, after) in [300u64, 1300].into_iter().enumerate() {
        let config = target.config(&format!("dropped-{n}"));
        let vm = target.backend.create(config.clone()).unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(after), vm.start(StartOptions::new())).await;
        assert!(gave_up.is_err(), "the start finished within {after} ms");
        let dropped = Instant::now();
        let layout = config.layout();
        loop {
            let running = vmkit_testkit::leaks::processes_mentioning(&config.state_dir);
            let sockets: Vec<_> = layout
                .sockets()
                .into_iter()
                .map(|(_, path)| path)
                .filter(|path| path.exists())
                .collect();
            if running.is_empty() && sockets.is_empty() && vm.state() == VmState::Shutdown {
                break;
            }
            assert!(
                dropped.elapsed() < Duration::from_secs(5),
                "a start dropped at {after} ms left processes {running:?}, sockets {sockets:?}, \
                 state {}",
                vm.state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "start dropped at {after} ms: nothing left {:?} later",
            dropped.elapsed()
        );
    }
}

async fn check(backend: PluginBackend, image: GuestImage) {
    let target = Plugged {
        backend,
        image,
        dir: tempfile::tempdir().unwrap(),
    };
    assert_eq!(target.backend.name(), "qemu");
    let report = conformance::run(&target).await;
    report.assert_complete();
    drive(&target).await;
    dropped_start(&target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qemu_backend_loaded_from_its_library_passes_every_check() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let backend = vmkit_plugin::loader::load(&library()).unwrap();
    check(backend, image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qemu_backend_out_of_process_passes_every_check() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    check(out_of_process(), image).await;
}

/// The QEMU backend served by `vmkit-backend-qemu`.
fn out_of_process() -> PluginBackend {
    let binary = Path::new(env!("CARGO_BIN_EXE_vmkit-backend-qemu"));
    let channel = ProcessChannel::launch(binary, "qemu").unwrap();
    PluginBackend::describe(Arc::clone(&channel) as _).unwrap()
}

/// What `script` printed, run by the guest agent's `sh`.
async fn sh(agent: &vmkit_proto::AgentClient, script: &str) -> String {
    let mut exec = vmkit_proto::agent::ExecRequest::new();
    exec.argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let out = agent.exec(ctx(), &exec).await.unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The guest agent's pid, as the agent's own `sh` child sees its parent.
async fn agent_pid(agent: &vmkit_proto::AgentClient) -> String {
    sh(agent, "echo $PPID").await
}

/// Over virtio-serial the backend process's relay keeps the host's connection open
/// while the guest's agent restarts, and QEMU says the port closed at most once a
/// second: the host's `client()` must still reach each new agent, however slowly it
/// comes (issue 22), through the process boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reaches_a_restarted_agent_over_virtio_serial_out_of_process() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let backend = out_of_process();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("restart", &dir.path().join("restart"));
    config.transport = vmkit_core::GuestTransport::VirtioSerial;
    let vm = backend.create(config).unwrap();
    vm.start(StartOptions::new()).await.unwrap();
    let mut pid = agent_pid(&vmkit_proto::AgentClient::new(vm.client().await.unwrap())).await;
    for (n, slow_ms) in [300u64, 1100, 700, 1300, 100].into_iter().enumerate() {
        let slow = Duration::from_millis(slow_ms);
        let killer = format!(
            "echo {}.{:03} > /run/vmkit-agent.restart_delay; \
             (sleep 0.1; kill -9 $(pidof vmkit-agent)) >/dev/null 2>&1 &",
            slow.as_secs(),
            slow.subsec_millis()
        );
        sh(
            &vmkit_proto::AgentClient::new(vm.client().await.unwrap()),
            &killer,
        )
        .await;
        // Past the kill; the new agent may be up or still coming, and nothing has
        // told the host either way.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let again = vm
            .client()
            .await
            .unwrap_or_else(|e| panic!("restart {n} ({slow_ms} ms): client(): {e}"));
        let again = vmkit_proto::AgentClient::new(again);
        again
            .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
            .await
            .unwrap_or_else(|e| panic!("restart {n} ({slow_ms} ms): ping the new agent: {e}"));
        let next = agent_pid(&again).await;
        assert_ne!(next, pid, "restart {n}: a new agent answered");
        pid = next;
    }
    vm.shutdown().await.unwrap();
}
