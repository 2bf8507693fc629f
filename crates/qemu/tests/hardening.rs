//! Issue 12's real-VM proofs: what a hostile tenant, another local user and a careless
//! embedder could do to a VM, tried against the test guest under real QEMU. One VM at a
//! time, like `real_vm.rs` (the helpers are shared in `common/`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use vmkit_core::{
    DeviceConfigurator, Error as CoreError, GuestCommunicator, Instance, StartOptions, VmEvent,
    VmState,
};
use vmkit_proto::AgentClient;
use vmkit_qemu::QemuBackend;

mod common;
use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Whether the test runs as root, as acting as a second user needs; outside CI a test
/// that cannot is skipped with a note (CI runs as root, so there it must not skip).
fn root_or_skip(what: &str) -> bool {
    if nix::unistd::geteuid().as_raw() == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs as root: the {what} needs it"
    );
    eprintln!("note: not root; skipping the {what}");
    false
}

/// Shuts `vm` down and checks the guest powered itself off through its agent (the
/// first, graceful stage).
async fn shut_down_gracefully(vm: &vmkit_qemu::QemuInstance) {
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(
        exit.stage,
        Some(vmkit_core::ShutdownStage::GuestPowerOff),
        "{exit:?}"
    );
}

/// The uid and gid of an unprivileged local user (Debian's `nobody`).
const OTHER_USER: u32 = 65534;

/// What `OTHER_USER` gets when it connects to each socket (and asks the hybrid-vsock
/// socket for the agent's port) or opens each file: one line per path.
fn probe_as_other_user(paths: &[PathBuf]) -> String {
    const SCRIPT: &str = r#"
use IO::Socket::UNIX;
for my $p (@ARGV) {
  if ($p =~ /\.sock$/) {
    my $s = IO::Socket::UNIX->new(Peer => $p, Type => SOCK_STREAM);
    if ($s) { print $s "CONNECT 1024\n"; my $l = <$s> // ""; chomp $l; print "$p: connected ($l)\n"; }
    else { print "$p: $!\n"; }
  } elsif (open(my $f, "<", $p)) { print "$p: readable\n"; }
  else { print "$p: $!\n"; }
}
"#;
    let out = std::process::Command::new("/usr/bin/perl")
        .uid(OTHER_USER)
        .gid(OTHER_USER)
        .arg("-e")
        .arg(SCRIPT)
        .args(paths)
        .output()
        .expect("run perl as another user");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 12, defect 5: with the embedder's umask at 000, the state dir and sockets were
/// 0777 (any local user connected to the vsock socket and ran commands as root in the
/// guest, or reached QMP) and the logs 0666. Now the dirs are 0700 and sockets and logs
/// 0600 whatever the umask, and another user reaches none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_local_user_reaches_no_socket_and_no_log_even_with_umask_000() {
    let Some(image) = setup() else { return };
    if !root_or_skip("second-user test") {
        return;
    }
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Only vmkit's own modes stand between the other user and the VM's files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vm = QemuBackend
        .create_instance(image.config("umask", &dir.path().join("state")))
        .unwrap();
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let vm = start(vm).await;
    nix::sys::stat::umask(old);

    let layout = vm.config().layout();
    assert_eq!(mode(layout.state_dir()), 0o700);
    assert_eq!(mode(layout.log_dir()), 0o700);
    // vhost-device-vsock unlinks its vhost-user socket once QEMU is connected.
    let mut paths: Vec<PathBuf> = vec![layout.control_socket(), layout.vsock_socket()];
    paths.extend([
        layout.console_log(),
        layout.vmm_log(),
        layout.log_dir().join("vsock.log"),
        layout.lock_file(),
    ]);
    for path in &paths {
        assert_eq!(mode(path) & 0o777, 0o600, "{}", path.display());
    }
    let seen = probe_as_other_user(&paths);
    assert_eq!(seen.lines().count(), paths.len(), "{seen}");
    for line in seen.lines() {
        assert!(line.ends_with(": Permission denied"), "{seen}");
    }
    // The owner still reaches everything.
    vm.agent().await.unwrap();
    vm.shutdown().await.unwrap();
}

/// What the guest's kernel command line says, through `client`.
async fn guest_cmdline(client: vmkit_core::GuestClient) -> String {
    let out = AgentClient::new(client)
        .exec(ctx(), &exec_req(&["cat", "/proc/cmdline"]))
        .await
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Issue 12, defect 4: a second instance on the same state dir deleted the first one's
/// sockets and bound its own at the same paths, so the first instance's new connections
/// reached the *other* guest. Now the second start is refused, naming the dir and its
/// holder, and the first instance's fresh dials still reach its own guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_vm_on_a_live_state_dir_is_refused_and_the_first_keeps_its_guest() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = image.config("first", &state);
    config.kernel.cmdline.push("vmkit.test=first".into());
    let first = start(QemuBackend.create_instance(config).unwrap()).await;

    let mut config = image.config("second", &state);
    config.kernel.cmdline.push("vmkit.test=second".into());
    let second = QemuBackend.create_instance(config).unwrap();
    let err = second.start(StartOptions::new()).await.unwrap_err();
    assert!(matches!(err, CoreError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "start: state dir {} is in use by pid {} (vm \"first\")",
            state.display(),
            std::process::id()
        )
    );
    assert_eq!(second.state(), VmState::Shutdown);
    assert!(second.vm_info().pid.is_none(), "no QEMU was spawned");

    let fresh = first.dial_client().await.unwrap();
    assert!(
        guest_cmdline(fresh).await.contains(" vmkit.test=first"),
        "a fresh dial reached another guest"
    );
    let cached = first.client().await.unwrap();
    assert!(guest_cmdline(cached).await.contains(" vmkit.test=first"));
    first.shutdown().await.unwrap();
    assert!(!first.config().layout().lock_file().exists());
}

/// Issue 12, defect 8: a guest kernel panic during boot read "QEMU exited during start
/// (exit code 0): no output on stderr". Now the error says the guest panicked and
/// quotes the console up to the panic line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_kernel_panic_during_boot_is_named_with_the_console_lines() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("panics", &dir.path().join("state"));
    // No such init in the initramfs, and no root disk to fall back to: the kernel panics.
    config.kernel.cmdline.push("rdinit=/nonexistent".into());
    let vm = QemuBackend.create_instance(config).unwrap();
    let err = vm.start(StartOptions::new()).await.unwrap_err().to_string();
    assert!(
        err.starts_with("start: the guest kernel panicked during start (QEMU exit code 0); the console's last lines:\n"),
        "{err}"
    );
    assert!(
        err.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "{err}"
    );
    let exit = vm.wait().await;
    assert_eq!(exit.reason, vmkit_core::ExitReason::StartFailed);
    assert_eq!(exit.message.as_deref(), Some(err.as_str()));
}

/// Issue 15: a guest kernel panic while running reaches the user. The guest's pvpanic
/// driver reports it (the `vmkit-pvpanic` device), QEMU emits GUEST_PANICKED and exits,
/// and the instance ends with `ExitReason::GuestPanic`, leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_kernel_panic_while_running_ends_the_vm_as_a_guest_panic() {
    let Some(booted) = boot("panic-running").await else {
        return;
    };
    let vm = &booted.vm;
    let pid = vm.vm_info().pid.unwrap();
    let mut events = vm.events();
    let agent = vm.agent().await.unwrap();
    let modules = agent
        .exec(ctx(), &exec_req(&["cat", "/proc/modules"]))
        .await
        .unwrap();
    let modules = String::from_utf8_lossy(&modules.stdout);
    assert!(
        modules.contains("pvpanic_pci"),
        "the guest loaded its pvpanic driver: {modules}"
    );
    // The call never gets its answer: the guest dies under it.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        agent.exec(
            ctx(),
            &exec_req(&["/bin/sh", "-c", "echo c > /proc/sysrq-trigger"]),
        ),
    )
    .await;
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), vm.wait())
        .await
        .expect("the VM ended after its guest panicked");
    assert_eq!(exit.reason, vmkit_core::ExitReason::GuestPanic, "{exit:?}");
    assert_eq!(exit.message.as_deref(), Some("the guest kernel panicked"));
    assert_eq!(vm.state(), VmState::Shutdown);
    let mut seen_panic = false;
    while let Ok(event) = events.try_recv() {
        seen_panic |= event == vmkit_core::VmEvent::GuestPanicked;
    }
    assert!(seen_panic, "a GuestPanicked event was published");
    assert_gone(pid, vm);
}

/// Issue 15: a disk whose host file runs out of space reaches the user as a typed
/// `BlockIoError`: the disk's file sits on a 1 MiB tmpfs, the guest writes 4 MiB to it,
/// QEMU stops the VM (its default for ENOSPC on write), and vmkit reports the node, the
/// operation, the action and the state it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_out_of_host_space_is_a_typed_block_io_error() {
    if !root_or_skip("tmpfs mount for a full disk") {
        return;
    }
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "vmkit-full"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a 1 MiB tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let path = small.join("full.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let vm = QemuBackend
        .create_instance(image.config("full-disk", &dir.path().join("state")))
        .unwrap();
    vm.add_disk(vmkit_core::DiskConfig::new("full", &path))
        .unwrap();
    let vm = start(vm).await;
    let mut events = vm.events();
    let agent = vm.agent().await.unwrap();
    let writer = tokio::spawn(async move {
        agent
            .exec(
                ctx(),
                &exec_req(&[
                    "dd",
                    "if=/dev/zero",
                    "of=/dev/vda",
                    "bs=1M",
                    "count=4",
                    "conv=fsync",
                ]),
            )
            .await
    });
    let error = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(e @ vmkit_core::VmEvent::BlockIoError { .. }) => return e,
                Ok(_) => {}
                Err(e) => panic!("events ended: {e}"),
            }
        }
    })
    .await
    .expect("a BlockIoError within 30 s");
    let vmkit_core::VmEvent::BlockIoError {
        node,
        operation,
        action,
        nospace,
        reason,
        ..
    } = error
    else {
        unreachable!()
    };
    assert_eq!(node.as_deref(), Some("vmkit-disk0"));
    assert_eq!(operation, vmkit_core::BlockOperation::Write);
    assert_eq!(action, vmkit_core::BlockErrorAction::Stop);
    assert!(nospace, "{reason}");
    assert!(reason.contains("No space left on device"), "{reason}");
    reaches(&vm, VmState::Paused).await;
    writer.abort();
    vm.shutdown().await.unwrap();
    assert_eq!(vm.state(), VmState::Shutdown);
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// Waits up to 10 s for `vm` to reach `state`.
async fn reaches(vm: &vmkit_qemu::QemuInstance, state: VmState) {
    let began = std::time::Instant::now();
    while vm.state() != state {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(10),
            "still {} after 10 s, expected {state}",
            vm.state()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Whether QEMU itself says its vCPUs run.
async fn qemu_running(vm: &vmkit_qemu::QemuInstance) -> bool {
    vm.qmp_query("query-status", None).await.unwrap()["running"] == true
}

/// Issue 12, defect 7, on a real QEMU stalled by SIGSTOP: a `pause` that times out is
/// carried out by QEMU once it runs again, and vmkit's state follows (it used to roll
/// back to Running, leaving QEMU paused and `resume` refused); the mirror case, a late
/// `resume`, leaves the VM Running and its shutdown graceful (it used to skip the ACPI
/// stage). Subscribers see exactly the changes QEMU made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_qemus_late_pause_and_resume_are_followed() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("stalled", &dir.path().join("state"));
    config.timeouts.command = std::time::Duration::from_secs(1);
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let pid = vm.vm_info().pid.unwrap();
    let mut events = vm.events();
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};

    signal(pid, SIGSTOP);
    let err = vm.pause().await.unwrap_err().to_string();
    assert!(
        err.starts_with("pause: stop: stop: no reply within 1s"),
        "{err}"
    );
    assert_eq!(vm.state(), VmState::Running, "QEMU has not stopped yet");
    signal(pid, SIGCONT);
    reaches(&vm, VmState::Paused).await;
    assert!(!qemu_running(&vm).await, "QEMU really is paused");
    vm.resume().await.unwrap();
    assert!(qemu_running(&vm).await);

    vm.pause().await.unwrap();
    signal(pid, SIGSTOP);
    let err = vm.resume().await.unwrap_err().to_string();
    assert!(
        err.starts_with("resume: cont: cont: no reply within 1s"),
        "{err}"
    );
    assert_eq!(vm.state(), VmState::Paused, "QEMU has not resumed yet");
    signal(pid, SIGCONT);
    reaches(&vm, VmState::Running).await;
    assert!(qemu_running(&vm).await);
    vm.agent()
        .await
        .unwrap()
        .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
        .await
        .unwrap();

    let mut changes = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let vmkit_core::VmEvent::StateChanged { from, to } = event {
            changes.push((from, to));
        }
    }
    let (r, p) = (VmState::Running, VmState::Paused);
    assert_eq!(
        changes,
        [(r, p), (p, r), (r, p), (p, r)],
        "only what QEMU did"
    );
    shut_down_gracefully(&vm).await;
}

/// Issue 12, defect 2: an agent call made while the VM was paused (hybrid vsock) killed
/// the guest link for good: vhost-device-vsock 0.3 ends its vring worker when a host
/// connection opens, sends or closes while QEMU has stopped the vrings. Now vmkit holds
/// its traffic while paused (and until the device has restarted): a call on the cached
/// client, a fresh dial and vmkit's own `query_cpus`, all made while paused, wait and
/// are answered after `resume`, round after round, and the link keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_calls_made_while_paused_are_answered_after_resume() {
    use vmkit_core::ResourceManager as _;
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = image.config("paused", &dir.path().join("state"));
    let vm = std::sync::Arc::new(start(QemuBackend.create_instance(config).unwrap()).await);
    let agent = vm.agent().await.unwrap();
    for round in 0..3 {
        vm.pause().await.unwrap();
        let cached = {
            let agent = agent.clone();
            tokio::spawn(async move {
                agent
                    .guest_info(ctx(), &vmkit_proto::agent::GuestInfoRequest::new())
                    .await
                    .map(|info| info.online_cpus)
                    .map_err(|e| e.to_string())
            })
        };
        let fresh = {
            let vm = std::sync::Arc::clone(&vm);
            tokio::spawn(async move {
                let client = vm.dial_client().await.map_err(|e| e.to_string())?;
                AgentClient::new(client)
                    .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        };
        // A query answers at once with the VMM's view: the paused guest is not asked.
        let cpus = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            vm.cpu_hotplugger().expect("q35 with an agent").query_cpus(),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: query_cpus waited for the paused guest"))
        .unwrap();
        assert_eq!(cpus.len(), 1, "round {round}");
        assert_eq!(
            cpus[0].online, None,
            "round {round}: the paused guest was asked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !cached.is_finished() && !fresh.is_finished(),
            "round {round}: a call was answered while the guest was paused"
        );
        vm.resume().await.unwrap();
        let within = std::time::Duration::from_secs(10);
        let online = tokio::time::timeout(within, cached)
            .await
            .unwrap_or_else(|_| panic!("round {round}: cached not answered after resume"));
        assert_eq!(online.unwrap(), Ok(vec![0]), "round {round}");
        let pinged = tokio::time::timeout(within, fresh)
            .await
            .unwrap_or_else(|_| panic!("round {round}: fresh dial not answered after resume"));
        assert_eq!(pinged.unwrap(), Ok(()), "round {round}");
        let cpus = vm.cpu_hotplugger().unwrap().query_cpus().await.unwrap();
        assert_eq!(
            cpus[0].online,
            Some(true),
            "round {round}: running, the guest is asked"
        );
    }
    // Afterwards the cached client, a fresh one with retry and a stream all work.
    agent
        .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
        .await
        .unwrap();
    let again = vm
        .dial_client_with_retry(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert!(guest_cmdline(again).await.contains("console=ttyS0"));
    vm.shutdown().await.unwrap();
}

/// The vsock daemon of `vm` (hybrid vsock), by its command line.
fn vsock_daemon(vm: &vmkit_qemu::QemuInstance) -> u32 {
    processes_mentioning(&vm.config().state_dir)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("vhost-device"))
        })
        .expect("a vhost-device-vsock for the VM")
}

/// Breaks `vm`'s hybrid-vsock link the way a careless process on the host would: it
/// connects straight to the socket while the VM is paused, which ends
/// vhost-device-vsock's worker. Returns with the VM resumed.
async fn break_link_while_paused(vm: &vmkit_qemu::QemuInstance) -> std::os::unix::net::UnixStream {
    vm.pause().await.unwrap();
    let mut careless =
        std::os::unix::net::UnixStream::connect(vm.config().layout().vsock_socket()).unwrap();
    std::io::Write::write_all(&mut careless, b"CONNECT 1025\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    vm.resume().await.unwrap();
    careless
}

/// A link that did break is detected by the check after `resume` and repaired: the
/// vsock device is replaced (new daemon, same sockets, the device unplugged and plugged
/// again on its own root port), and the agent answers again, its listeners intact; the
/// old daemon is gone and the VM shuts down gracefully with nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_broken_while_paused_is_repaired_on_resume() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let vm = start(
        QemuBackend
            .create_instance(image.config("broken", &state))
            .unwrap(),
    )
    .await;
    let before = vsock_daemon(&vm);
    let careless = break_link_while_paused(&vm).await;
    let after = vsock_daemon(&vm);
    assert_ne!(before, after, "a new daemon serves the VM");
    assert!(
        !std::path::Path::new(&format!("/proc/{before}")).exists(),
        "the old daemon is gone"
    );
    let began = std::time::Instant::now();
    let info = vm
        .agent()
        .await
        .unwrap()
        .guest_info(ctx(), &vmkit_proto::agent::GuestInfoRequest::new())
        .await
        .unwrap();
    assert_eq!(info.online_cpus, [0]);
    assert!(
        began.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    // A one-shot dial may meet vhost-device-vsock's accept-then-reset right after the
    // device changed (docs/guest-communication.md): the retrying dial is what callers use.
    let fresh = vm
        .dial_client_with_retry(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert!(guest_cmdline(fresh).await.contains("console=ttyS0"));
    drop(careless);
    shut_down_gracefully(&vm).await;
    assert_eq!(
        processes_mentioning(&state),
        Vec::<u32>::new(),
        "a daemon or QEMU outlived the VM"
    );
}

/// The real vhost-device-vsock, found as vmkit-qemu finds it.
fn real_vsock_daemon() -> PathBuf {
    if let Some(path) = std::env::var_os("VMKIT_VHOST_VSOCK") {
        return path.into();
    }
    let home_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_bin)
        .map(|dir| dir.join("vhost-device-vsock"))
        .find(|p| p.is_file())
        .expect("vhost-device-vsock installed")
}

/// vhost-device-vsock's start fault, on demand: the first daemon the VM gets serves
/// QEMU's vhost-user socket through one backend, while the host socket vmkit dials
/// belongs to a second backend of the same process that QEMU never connects to — it
/// has no guest memory table and drops every dial unread, as the lost daemon does. The
/// start sees QEMU report the device started while dials are still dropped, replaces
/// the device and its daemon (a plain one, the second time), and the agent answers
/// well before the start's deadline; the VM then ends with nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_replaces_a_vsock_daemon_that_drops_every_dial() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let wrapper = dir.path().join("vhost-device-vsock");
    let script = format!(
        "#!/bin/sh\n\
         # vmkit passes: --guest-cid CID --socket VHOST --uds-path UDS\n\
         [ -e '{mark}' ] && exec '{real}' \"$@\"\n\
         : > '{mark}'\n\
         exec '{real}' --vm \"guest-cid=$2,socket=$4,uds-path=$6.served\" \\\n\
           --vm \"guest-cid=$(($2 + 1)),socket=$4.unused,uds-path=$6\"\n",
        mark = dir.path().join("faulted").display(),
        real = real_vsock_daemon().display(),
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = image.config("lost-daemon", &state);
    config
        .backend_options
        .insert("vhost_vsock_binary".into(), wrapper.display().to_string());
    let timeout = config.timeouts.start;
    let vm = QemuBackend.create_instance(config).unwrap();
    let mut events = vm.events();
    let began = std::time::Instant::now();
    vm.start(StartOptions::new())
        .await
        .unwrap_or_else(|e| panic!("start: {e}\n{}", logs(&vm)));
    let took = began.elapsed();
    assert!(dir.path().join("faulted").exists(), "the faulty daemon ran");
    assert!(took < timeout / 2, "started in {took:?} of {timeout:?}");
    let mut steps = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let VmEvent::StartProgress { step, .. } = event {
            steps.push(step);
        }
    }
    assert!(
        steps
            .iter()
            .any(|s| s == "replaced the vsock daemon that lost the guest's device"),
        "{steps:?}"
    );
    let daemon = vsock_daemon(&vm);
    let cmdline = std::fs::read(format!("/proc/{daemon}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("--vm"),
        "a plain daemon serves the VM now"
    );
    let agent = vm.agent().await.unwrap();
    assert!(!agent_pid(&agent).await.is_empty());
    shut_down_gracefully(&vm).await;
    assert_eq!(
        processes_mentioning(&state),
        Vec::<u32>::new(),
        "a daemon or QEMU outlived the VM"
    );
}

/// Where the device cannot be replaced (microvm has no hot-plug port), a broken link is
/// reported: guest calls fail at once, naming the cause, instead of each hanging until
/// its deadline; the VM itself is unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_cannot_be_repaired_is_reported_at_once() {
    let Some(image) = setup() else { return };
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = image.microvm_config("unrepairable", &dir.path().join("state"));
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let careless = break_link_while_paused(&vm).await;
    let began = std::time::Instant::now();
    let err = vm
        .client()
        .await
        .err()
        .expect("a broken link is refused")
        .to_string();
    assert!(
        began.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert!(
        err.starts_with("client: the guest link is broken: no answer from "),
        "{err}"
    );
    assert!(
        err.contains("; replacing the vsock device failed: replace the vsock device: check: microvm's vsock device sits on no hot-plug port"),
        "{err}"
    );
    assert!(err.ends_with("; restart the VM"), "{err}");
    let err = vm.dial_client().await.err().expect("refused").to_string();
    assert!(
        err.starts_with("dial_client: the guest link is broken"),
        "{err}"
    );
    drop(careless);
    // The agent cannot be reached over the broken link: the ACPI stage powers it off.
    let exit = vm.shutdown().await.unwrap();
    assert_eq!(
        exit.stage,
        Some(vmkit_core::ShutdownStage::AcpiPowerdown),
        "{exit:?}"
    );
}

/// Issue 12, item 9: QEMU can run unprivileged. With the backend option `run_as`, QEMU
/// opens what it needs as vmkit's user and then drops to the one named
/// (`-run-with user=`); the guest, its agent and the graceful shutdown work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_as_the_unprivileged_user_named_by_run_as() {
    let Some(image) = setup() else { return };
    if !root_or_skip("run_as test") {
        return;
    }
    let _slot = VMS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image.config("run-as", &dir.path().join("state"));
    config
        .backend_options
        .insert("run_as".into(), "nobody".into());
    let vm = start(QemuBackend.create_instance(config).unwrap()).await;
    let pid = vm.vm_info().pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{uid}"
    );
    vm.agent()
        .await
        .unwrap()
        .ping(ctx(), &vmkit_proto::agent::PingRequest::new())
        .await
        .unwrap();
    shut_down_gracefully(&vm).await;
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
