//! Mutants: FakeBackend broken on purpose, one contract violation each, and the
//! conformance check that must catch it — with a message that says what to fix. A
//! suite that passes a mutant has a check that cannot fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmkit_core::{
    Backend, Capabilities, CpuHotplugger, DeviceConfigurator, DeviceInfo, DeviceSpec, Error,
    ExitInfo, GuestClient, GuestCommunicator, GuestStream, Instance, InstanceConfig,
    MemoryHotplugger, ResourceManager, StartOptions, StateDirLock, VmEvent, VmInfo, VmState,
};
use vmkit_testkit::conformance::{self, Target};
use vmkit_testkit::fake_backend::{FakeBackend, FakeInstance};

/// One contract violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    /// Shutdown leaves a bound Unix socket in the state dir.
    LeakSocket,
    /// Start spawns a helper process naming the state dir that nothing ends.
    LeakHelper,
    /// Shutdown takes the state dir's lock again and keeps it.
    HoldLock,
    /// `events()` says `Starting → Running` before `New → Starting` (the mutant
    /// publishes its own events).
    EventsOutOfOrder,
    /// `pause` in `New` is `Unsupported` instead of `InvalidState`.
    WrongErrorKind,
    /// Reports CPU_HOTPLUG without a vCPU hot-plugger.
    LyingCapability,
    /// `shutdown` never returns.
    HungShutdown,
    /// `start` runs on a task of its own: dropping its future cancels nothing.
    DetachedStart,
    /// `start` ignores `StartOptions::timeout`.
    IgnoresStartTimeout,
    /// A second `start` while the first runs (or after it) "succeeds" too.
    RacyStart,
    /// Reports DISK_HOTPLUG, but `hotplug_disk` is `Unsupported`.
    LyingDiskHotplug,
    /// `set_vcpus` says it reached the count without plugging anything.
    LyingVcpus,
    /// Reports GUEST_STREAMS, but no stream opens.
    NoStreams,
    /// Reports NIC_HOTPLUG, but `hotplug_nic` is `Unsupported`.
    LyingNicHotplug,
    /// Leases a kernel-vsock CID at start (reported in `vm_info`) and never releases it.
    LeakCid,
    /// Shutdown keeps a file of the state dir open.
    LeakFd,
}

/// The CIDs mutants lease (lock files in a dir of their own).
static CIDS: LazyLock<(tempfile::TempDir, vmkit_vsock::CidAllocator)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let cids = vmkit_vsock::CidAllocator::new(vmkit_vsock::CidOptions {
        lock_dir: Some(dir.path().into()),
        ..vmkit_vsock::CidOptions::default()
    })
    .unwrap();
    (dir, cids)
});

/// What a mutant leaks, kept past its instance's drop (so that the check sees it) and
/// cleaned at the end of each test.
#[derive(Default)]
struct Leaks {
    sockets: Vec<std::os::unix::net::UnixListener>,
    helpers: Vec<std::process::Child>,
    locks: Vec<StateDirLock>,
    cids: Vec<vmkit_vsock::CidLease>,
    files: Vec<std::fs::File>,
}

static LEAKS: LazyLock<Mutex<Leaks>> = LazyLock::new(Mutex::default);

fn leaks() -> std::sync::MutexGuard<'static, Leaks> {
    LEAKS.lock().unwrap_or_else(|p| p.into_inner())
}

fn clean_leaks() {
    let mut leaks = leaks();
    leaks.sockets.clear();
    leaks.locks.clear();
    leaks.cids.clear();
    leaks.files.clear();
    for mut helper in leaks.helpers.drain(..) {
        let _ = helper.kill();
        let _ = helper.wait();
    }
}

struct MutantBackend(Mutation);

impl Backend for MutantBackend {
    fn name(&self) -> &str {
        "mutant"
    }

    fn capabilities(&self) -> Capabilities {
        FakeBackend.capabilities()
    }

    fn create(&self, mut config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        if self.0 == Mutation::LyingVcpus {
            config.resources.max_vcpus = 2;
        }
        let inner = Arc::new(FakeBackend.create_fake(config.clone())?);
        let (events, _) = broadcast::channel(256);
        Ok(Box::new(Mutant {
            cpus: LyingCpus(Arc::clone(&inner)),
            inner,
            mutation: self.0,
            config,
            events,
        }))
    }
}

struct Mutant {
    inner: Arc<FakeInstance>,
    cpus: LyingCpus,
    mutation: Mutation,
    config: InstanceConfig,
    events: broadcast::Sender<VmEvent>,
}

impl Mutant {
    /// Publishes a state change on the mutant's own events (what its `events()` gives
    /// with [`Mutation::EventsOutOfOrder`]).
    fn said(&self, from: VmState, to: VmState) {
        let _ = self.events.send(VmEvent::StateChanged { from, to });
    }
}

#[async_trait]
impl Instance for Mutant {
    async fn start(&self, opts: StartOptions) -> vmkit_core::Result<()> {
        if self.mutation == Mutation::LeakHelper {
            let helper = std::process::Command::new("/bin/sh")
                .args(["-c", "sleep 600", "helper"])
                .arg(&self.config.state_dir)
                .spawn()
                .unwrap();
            leaks().helpers.push(helper);
        }
        if self.mutation == Mutation::LeakCid {
            leaks().cids.push(CIDS.1.allocate().unwrap());
        }
        if self.mutation == Mutation::DetachedStart {
            let inner = Arc::clone(&self.inner);
            return tokio::spawn(async move { inner.start(opts).await })
                .await
                .unwrap();
        }
        let started = match self.mutation {
            Mutation::IgnoresStartTimeout => self.inner.start(StartOptions::new()).await,
            Mutation::RacyStart => match self.inner.start(opts).await {
                Err(Error::InvalidState { .. }) => Ok(()),
                other => other,
            },
            _ => self.inner.start(opts).await,
        };
        started?;
        self.said(VmState::Starting, VmState::Running);
        self.said(VmState::New, VmState::Starting);
        Ok(())
    }

    async fn shutdown(&self) -> vmkit_core::Result<ExitInfo> {
        if self.mutation == Mutation::HungShutdown {
            return std::future::pending().await;
        }
        let exit = self.inner.shutdown().await?;
        self.said(VmState::Running, VmState::Shutdown);
        let _ = self.events.send(VmEvent::Exited(exit.clone()));
        match self.mutation {
            Mutation::LeakSocket => {
                let path = self.config.state_dir.join("leaked.sock");
                leaks()
                    .sockets
                    .push(std::os::unix::net::UnixListener::bind(path).unwrap());
            }
            Mutation::HoldLock => {
                let lock = self.config.layout().lock("mutant", "a mutant").unwrap();
                leaks().locks.push(lock);
            }
            Mutation::LeakFd => {
                let path = self.config.state_dir.join("console.log");
                leaks().files.push(std::fs::File::create(path).unwrap());
            }
            _ => {}
        }
        Ok(exit)
    }

    async fn pause(&self) -> vmkit_core::Result<()> {
        if self.mutation == Mutation::WrongErrorKind && self.inner.state() == VmState::New {
            return Err(Error::unsupported("pause", "mutant", "not now"));
        }
        self.inner.pause().await?;
        self.said(VmState::Running, VmState::Paused);
        Ok(())
    }

    async fn resume(&self) -> vmkit_core::Result<()> {
        self.inner.resume().await?;
        self.said(VmState::Paused, VmState::Running);
        Ok(())
    }

    async fn wait(&self) -> ExitInfo {
        self.inner.wait().await
    }

    fn state(&self) -> VmState {
        self.inner.state()
    }

    fn vm_info(&self) -> VmInfo {
        let mut info = self.inner.vm_info();
        match self.mutation {
            Mutation::LyingCapability => info.capabilities |= Capabilities::CPU_HOTPLUG,
            Mutation::LyingDiskHotplug => info.capabilities |= Capabilities::DISK_HOTPLUG,
            Mutation::LyingNicHotplug => info.capabilities |= Capabilities::NIC_HOTPLUG,
            Mutation::LeakCid => info.cid = leaks().cids.last().map(vmkit_vsock::CidLease::cid),
            _ => {}
        }
        info
    }

    fn events(&self) -> broadcast::Receiver<VmEvent> {
        if self.mutation == Mutation::EventsOutOfOrder {
            self.events.subscribe()
        } else {
            self.inner.events()
        }
    }
}

#[async_trait]
impl DeviceConfigurator for Mutant {
    fn add_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        self.inner.add_device(spec)
    }

    async fn hotplug_device(&self, spec: DeviceSpec) -> vmkit_core::Result<()> {
        match (&spec, self.mutation) {
            (DeviceSpec::Disk(_), Mutation::LyingDiskHotplug) => {
                Err(Error::unsupported("hotplug_disk", "mutant", "no ports"))
            }
            (DeviceSpec::Nic(_), Mutation::LyingNicHotplug) => {
                Err(Error::unsupported("hotplug_nic", "mutant", "no NICs"))
            }
            _ => self.inner.hotplug_device(spec).await,
        }
    }

    async fn unplug(&self, id: &str) -> vmkit_core::Result<()> {
        self.inner.unplug(id).await
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.inner.devices()
    }
}

#[async_trait]
impl GuestCommunicator for Mutant {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        self.inner.client().await
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        self.inner.dial_client().await
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        self.inner.dial_client_with_retry(timeout).await
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        if self.mutation == Mutation::NoStreams {
            return Err(Error::io(
                "start_stream",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            ));
        }
        self.inner.start_stream(port).await
    }
}

impl ResourceManager for Mutant {
    fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
        if self.mutation == Mutation::LyingVcpus {
            return Some(&self.cpus);
        }
        self.inner.cpu_hotplugger()
    }

    fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
        self.inner.memory_hotplugger()
    }
}

/// vCPU hot-plug that says it did what it did not ([`Mutation::LyingVcpus`]).
struct LyingCpus(Arc<FakeInstance>);

impl LyingCpus {
    fn real(&self) -> vmkit_core::Result<&dyn CpuHotplugger> {
        self.0
            .cpu_hotplugger()
            .ok_or_else(|| Error::unsupported("cpus", "mutant", "none"))
    }
}

#[async_trait]
impl CpuHotplugger for LyingCpus {
    async fn query_cpus(&self) -> vmkit_core::Result<Vec<vmkit_core::CpuInfo>> {
        self.real()?.query_cpus().await
    }

    async fn hotplug_cpu(&self) -> vmkit_core::Result<vmkit_core::CpuInfo> {
        self.real()?.hotplug_cpu().await
    }

    async fn hotplug_cpu_at(
        &self,
        at: vmkit_core::CpuTopology,
    ) -> vmkit_core::Result<vmkit_core::CpuInfo> {
        self.real()?.hotplug_cpu_at(at).await
    }

    async fn unplug_cpu(&self, index: u32) -> vmkit_core::Result<()> {
        self.real()?.unplug_cpu(index).await
    }

    async fn set_vcpus(&self, count: u32) -> vmkit_core::Result<vmkit_core::VcpuResize> {
        let before = u32::try_from(self.query_cpus().await?.len()).unwrap();
        Ok(vmkit_core::VcpuResize {
            requested: count,
            before,
            achieved: count,
            failures: Vec::new(),
        })
    }
}

struct MutantTarget {
    backend: MutantBackend,
    dir: tempfile::TempDir,
}

#[async_trait]
impl Target for MutantTarget {
    fn backend(&self) -> &dyn Backend {
        &self.backend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        let mut config = InstanceConfig::new(id, self.dir.path().join(id), "/no/kernel");
        // No vCPU hot-plug (so that a lie about it shows), short deadlines (so that a
        // hang is called one soon).
        config.resources.max_vcpus = 1;
        config.timeouts.command = Duration::from_millis(100);
        config.timeouts.shutdown_grace = Duration::from_millis(100);
        config
    }

    fn disk(&self) -> Option<PathBuf> {
        let path = self.dir.path().join("disk.img");
        std::fs::write(&path, b"").unwrap();
        Some(path)
    }

    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        Some(vmkit_core::NicConfig::user(id))
    }

    async fn crash(&self, _vm: &dyn Instance) -> bool {
        false
    }

    fn held_outside(&self, info: &VmInfo) -> Result<Vec<String>, String> {
        Ok(conformance::cid_still_leased(info, |cid| {
            CIDS.1.in_use(cid)
        }))
    }

    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        let mut config = self.config(id);
        config
            .backend_options
            .insert("faults".into(), "start=delay:1500".into());
        Some(config)
    }
}

/// Runs `check` against the mutant of `mutation`: it must fail, saying `says`.
async fn caught(mutation: Mutation, check: &str, says: &str) {
    let target = MutantTarget {
        backend: MutantBackend(mutation),
        dir: tempfile::tempdir().unwrap(),
    };
    let outcome = conformance::run_one(&target, check).await.unwrap();
    clean_leaks();
    match outcome.result {
        Err(text) => assert!(
            text.contains(says),
            "{mutation:?}: {check} failed, but not saying {says:?}: {text}"
        ),
        Ok(note) => panic!("{mutation:?} passed {check} ({note:?}): the check cannot fail"),
    }
}

// One test at a time: the mutants' leaks are process-wide.
static ONE: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(tokio::sync::Mutex::default);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_socket_is_caught_by_nothing_left() {
    let _one = ONE.lock().await;
    caught(
        Mutation::LeakSocket,
        "nothing_left",
        "a Unix socket is still bound at",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_helper_process_is_caught_by_nothing_left() {
    let _one = ONE.lock().await;
    caught(Mutation::LeakHelper, "nothing_left", "names the state dir").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_cid_lease_is_caught_by_nothing_left() {
    let _one = ONE.lock().await;
    caught(Mutation::LeakCid, "nothing_left", "is still leased").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_fd_is_caught_by_nothing_left() {
    let _one = ONE.lock().await;
    caught(Mutation::LeakFd, "nothing_left", "console.log open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cid_the_target_cannot_look_for_fails_nothing_left() {
    let _one = ONE.lock().await;
    let target = Blind(MutantTarget {
        backend: MutantBackend(Mutation::LeakCid),
        dir: tempfile::tempdir().unwrap(),
    });
    let outcome = conformance::run_one(&target, "nothing_left").await.unwrap();
    clean_leaks();
    let text = outcome.result.unwrap_err();
    assert!(
        text.contains("does not say how to look for its lease"),
        "{text}"
    );
}

/// A target that does not say how to look for a CID lease.
struct Blind(MutantTarget);

#[async_trait]
impl Target for Blind {
    fn backend(&self) -> &dyn Backend {
        self.0.backend()
    }

    fn config(&self, id: &str) -> InstanceConfig {
        self.0.config(id)
    }

    async fn crash(&self, vm: &dyn Instance) -> bool {
        self.0.crash(vm).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_is_caught_by_nothing_left() {
    let _one = ONE.lock().await;
    caught(
        Mutation::HoldLock,
        "nothing_left",
        "the state dir's lock is still held",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_out_of_order_are_caught_by_life_cycle() {
    let _one = ONE.lock().await;
    caught(
        Mutation::EventsOutOfOrder,
        "life_cycle",
        "StateChanged events [(Starting, Running), (New, Starting)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_error_kind_is_caught_by_wrong_state_calls() {
    let _one = ONE.lock().await;
    caught(
        Mutation::WrongErrorKind,
        "wrong_state_calls",
        "pause in new: expected InvalidState, got pause: not supported by the mutant backend",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_that_lies_is_caught_by_capabilities_are_honest() {
    let _one = ONE.lock().await;
    caught(
        Mutation::LyingCapability,
        "capabilities_are_honest",
        "CPU_HOTPLUG reported true but cpu_hotplugger() is false",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shutdown_is_caught_by_its_deadline() {
    let _one = ONE.lock().await;
    caught(
        Mutation::HungShutdown,
        "shutdown_before_start",
        "shutdown did not return within",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_ignores_its_dropped_future_is_caught_by_cancelled_start() {
    let _one = ONE.lock().await;
    caught(
        Mutation::DetachedStart,
        "cancelled_start",
        "a start dropped after 300ms left the VM",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_ignores_its_deadline_is_caught_by_start_timeout() {
    let _one = ONE.lock().await;
    caught(
        Mutation::IgnoresStartTimeout,
        "start_timeout",
        "a start with a 200ms deadline returned Ok",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racy_start_is_caught_by_concurrent_calls() {
    let _one = ONE.lock().await;
    caught(
        Mutation::RacyStart,
        "concurrent_calls",
        "exactly one must start the VM",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_nic_hotplug_is_caught_by_device_hotplug() {
    let _one = ONE.lock().await;
    caught(
        Mutation::LyingNicHotplug,
        "device_hotplug",
        "hotplug_nic with NIC_HOTPLUG",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_disk_hotplug_is_caught_by_device_hotplug() {
    let _one = ONE.lock().await;
    caught(
        Mutation::LyingDiskHotplug,
        "device_hotplug",
        "hotplug_disk with DISK_HOTPLUG: hotplug_disk: not supported",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpus_that_lie_are_caught_by_resource_hotplug() {
    let _one = ONE.lock().await;
    caught(
        Mutation::LyingVcpus,
        "resource_hotplug",
        "set_vcpus(2) from 1: achieved 2, query_cpus shows 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_do_not_open_are_caught_by_guest_calls_and_streams() {
    let _one = ONE.lock().await;
    caught(
        Mutation::NoStreams,
        "guest_calls_and_streams",
        "a stream with GUEST_STREAMS: start_stream:",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_is_caught_by_two_runs_in_a_row_too() {
    let _one = ONE.lock().await;
    caught(
        Mutation::HoldLock,
        "two_runs_in_a_row",
        "the second run: start conf-again:",
    )
    .await;
}
