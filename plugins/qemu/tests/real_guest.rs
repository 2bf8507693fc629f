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
    let binary = Path::new(env!("CARGO_BIN_EXE_vmkit-backend-qemu"));
    let channel = ProcessChannel::launch(binary, "qemu").unwrap();
    let backend = PluginBackend::describe(Arc::clone(&channel) as _).unwrap();
    check(backend, image).await;
}
