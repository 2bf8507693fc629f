//! The shim under a real containerd 2.x (Debian sid's, unpacked by `cargo xtask
//! containerd`) on the real test guest, through `ctr`: stdout and stderr apart, exit
//! codes, a TTY, 64 MiB of output byte-exact, exec, update (a vCPU and memory by
//! hot-plug), SIGTERM, events in order, an image's overlay snapshot as the root
//! filesystem, four containers at once.
//! Each test starts its own containerd with a private config, root, state and socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn ctr_run_keeps_stdout_and_stderr_apart_and_passes_the_exit_code_on() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let rootfs = containerd.rootfs("rootfs1", &parts.busybox).unwrap();
    // --rootfs gives no image config, so no PATH: commands are named by path.
    let script = "echo out; echo err >&2; exit 7";
    let out = containerd
        .run_output(&["--rm"], &rootfs, "c1", &["/bin/sh", "-c", script])
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", show(&out, &containerd));
    assert_eq!(text(&out.stdout), "out\n", "{}", show(&out, &containerd));
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out, &containerd));
    assert_empty(&containerd);
}

#[test]
fn sixty_four_mib_of_stdout_arrive_byte_exact() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let rootfs = containerd.rootfs("rootfs", &parts.busybox).unwrap();
    let script = "head -c 67108864 /dev/urandom > /blob && sha256sum /blob >&2 && cat /blob";
    let started = Instant::now();
    let out = containerd
        .run_output(&["--rm"], &rootfs, "big", &["/bin/sh", "-c", script])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out, &containerd));
    assert_eq!(out.stdout.len(), 64 << 20);
    let hashed = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = hashed.stdin.as_ref().unwrap();
        stdin.write_all(&out.stdout).unwrap();
    }
    let ours = hashed.wait_with_output().unwrap();
    let ours = text(&ours.stdout);
    let theirs = text(&out.stderr);
    assert_eq!(
        ours.split_whitespace().next(),
        theirs.split_whitespace().next(),
        "the container's sha256 and ours"
    );
    eprintln!(
        "64 MiB through ctr in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_empty(&containerd);
}

#[test]
fn ctr_run_t_gives_the_container_a_tty() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let rootfs = containerd.rootfs("rootfs", &parts.busybox).unwrap();
    let run = containerd.run(
        &["--rm", "-t"],
        &rootfs,
        "tty1",
        &[
            "/bin/sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; exit 5",
        ],
    );
    // ctr -t wants a terminal of its own: script(1) gives it one, running `line`.
    let quote = |a: &std::ffi::OsStr| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''"));
    let line = std::iter::once(quote(run.get_program()))
        .chain(run.get_args().map(quote))
        .collect::<Vec<_>>()
        .join(" ");
    let out = containerd
        .output_retrying("tty1", || {
            let mut cmd = Command::new("script");
            cmd.args(["-qec", &line, "/dev/null"]).stdin(Stdio::null());
            cmd
        })
        .unwrap();
    assert!(
        text(&out.stdout).contains("is-a-tty"),
        "{}",
        show(&out, &containerd)
    );
    assert_eq!(out.status.code(), Some(5), "{}", show(&out, &containerd));
    assert_empty(&containerd);
}

#[test]
fn exec_update_and_sigterm_reach_the_running_container() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let rootfs = containerd.rootfs("rootfs", &parts.busybox).unwrap();
    // PID 1 of a PID namespace ignores signals it has no handler for: the shell's
    // handler passes SIGTERM on to sleep, which dies of it (143).
    let script = "echo ready > /ready; /bin/sleep 1000 & p=$!; trap 'kill -TERM $p' TERM; \
                  wait $p; wait $p; exit $?";
    let run = || {
        let mut cmd = containerd.run(&["--rm"], &rootfs, "c2", &["/bin/sh", "-c", script]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let mut fg = containerd
        .spawn_running("c2", run, Duration::from_secs(150))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !rootfs.join("ready").exists() {
        assert!(Instant::now() < until, "the container never wrote /ready");
        std::thread::sleep(Duration::from_millis(50));
    }

    let exec = containerd
        .ctr()
        .args(["task", "exec", "--exec-id", "e1", "c2", "/bin/sh", "-c"])
        .arg("echo from-exec; cat /ready; echo exec-err >&2; exit 3")
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(3), "{}", show(&exec, &containerd));
    assert_eq!(text(&exec.stdout), "from-exec\nready\n");
    assert_eq!(text(&exec.stderr), "exec-err\n");

    // Stats: the container's cgroup in the guest.
    let metrics = containerd
        .ctr()
        .args(["task", "metrics", "c2"])
        .output()
        .unwrap();
    assert!(metrics.status.success(), "{}", show(&metrics, &containerd));
    let metrics = text(&metrics.stdout);
    assert!(
        metrics.contains("pids.current") && metrics.contains("cpu.usage_usec"),
        "{metrics}"
    );

    // `ctr task update`: containerd 2.x's ctr has no such command any more, so the
    // test makes the call it made, Tasks.Update on containerd's gRPC API.
    let looks = std::cell::Cell::new(0);
    let in_c2 = |script: &str| {
        looks.set(looks.get() + 1);
        let out = containerd
            .ctr()
            .args(["task", "exec", "--exec-id", &format!("look{}", looks.get())])
            .args(["c2", "/bin/sh", "-c", script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out, &containerd));
        text(&out.stdout).trim().to_owned()
    };
    let mem_total = "grep MemTotal /proc/meminfo | tr -dc 0-9";
    let kib_before: u64 = in_c2(mem_total).parse().unwrap();
    assert_eq!(in_c2("cat /sys/devices/system/cpu/online"), "0");
    let resources = serde_json::json!({
        "cpu": {"quota": 100_000, "period": 100_000},
        "memory": {"limit": 128 << 20},
    });
    update_task(&containerd, "c2", &resources);
    assert_eq!(
        in_c2("cat /sys/devices/system/cpu/online"),
        "0-1",
        "the container sees the hot-plugged vCPU"
    );
    let kib_after: u64 = in_c2(mem_total).parse().unwrap();
    assert!(
        kib_after >= kib_before + (120 << 10),
        "128 MiB more memory: {kib_before} KiB then {kib_after} KiB"
    );
    // The limits themselves, in the container's cgroup in the guest (ctr mounts no
    // cgroupfs in the container: they are read through Stats): the memory limit, and
    // CPU periods counted, which the kernel does only under a quota.
    let metrics = containerd
        .ctr()
        .args(["task", "metrics", "c2"])
        .output()
        .unwrap();
    let metrics = text(&metrics.stdout);
    let metric = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name));
        let value = line.and_then(|l| l.split_whitespace().nth(1));
        value
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("memory.usage_limit"), 128 << 20, "{metrics}");
    assert!(metric("cpu.nr_periods") > 0, "{metrics}");

    let kill = containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGTERM", "c2"])
        .output()
        .unwrap();
    assert!(kill.status.success(), "{}", show(&kill, &containerd));
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = fg.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "ctr run did not end after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(128 + 15), "{}", containerd.log());
    assert_empty(&containerd);
}

/// Tasks.Update of task `id` in the `default` namespace with OCI `resources`, as
/// containerd's own client sends them (JSON in an Any of the runtime-spec type).
fn update_task(containerd: &Containerd, id: &str, resources: &serde_json::Value) {
    use containerd_client::services::v1::UpdateTaskRequest;
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::tonic::Request;
    use containerd_client::with_namespace;

    let request = UpdateTaskRequest {
        container_id: id.to_owned(),
        resources: Some(prost_types::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: serde_json::to_vec(resources).unwrap(),
        }),
        annotations: Default::default(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = containerd_client::connect(containerd.socket())
            .await
            .unwrap();
        let mut tasks = TasksClient::new(channel);
        let call = tasks.update(with_namespace!(request, "default"));
        let answer = tokio::time::timeout(Duration::from_secs(120), call).await;
        answer
            .expect("Tasks.Update answers within 2 minutes")
            .unwrap_or_else(|e| panic!("Tasks.Update: {e}\n{}", containerd.log()));
    });
}

#[test]
fn events_arrive_in_containerds_order() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let rootfs = containerd.rootfs("rootfs", &parts.busybox).unwrap();
    let mut events = containerd
        .ctr()
        .arg("events")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // subscribed
    let out = containerd
        .run_output(&["--rm"], &rootfs, "ev1", &["/bin/true"])
        .unwrap();
    assert!(out.status.success(), "{}", show(&out, &containerd));
    std::thread::sleep(Duration::from_millis(500)); // the last event delivered
    events.kill().unwrap();
    let seen = text(&events.wait_with_output().unwrap().stdout);
    let topics: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ],
        "{seen}"
    );
    assert_empty(&containerd);
}

#[test]
fn an_images_snapshot_is_the_root_filesystem_and_is_unmounted_after() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    containerd.import_images("default", &parts.images).unwrap();
    // The image's config gives PATH: `sh` is found.
    let script = "echo \"$PATH\"; touch /written && ls /written; grep ' / ' /proc/self/mountinfo";
    let out = containerd
        .ctr()
        .args(["run", "--rm", "--runtime", "io.containerd.vmkit.v1"])
        .args(["vmkit.test/busybox:1", "img1", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out, &containerd));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("/usr/local/sbin:"), "{stdout}");
    assert!(stdout.contains("/written\n"), "{stdout}");
    assert!(
        stdout.contains("virtiofs"),
        "the root is the shared snapshot: {stdout}"
    );
    assert_eq!(containerd.mounts(), Vec::<String>::new(), "mounts left");
    assert_empty(&containerd);
}

#[test]
fn four_containers_at_once_each_in_a_vm_of_its_own() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    let argv = ["/bin/cat", "/proc/sys/kernel/random/boot_id"];
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let rootfs = containerd
                .rootfs(&format!("rootfs{i}"), &parts.busybox)
                .unwrap();
            let id = format!("four{i}");
            let child = containerd
                .run(&["--rm"], &rootfs, &id, &argv)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (id, rootfs, child)
        })
        .collect();
    let mut boot_ids: Vec<String> = runs
        .into_iter()
        .map(|(id, rootfs, child)| {
            let mut out = child.wait_with_output().unwrap();
            if !out.status.success() && containerd.met_daemon_fault(&id, &out.stderr) {
                // One VM in a hundred meets the vsock daemon's start fault: that one
                // runs once more, on its own.
                out = containerd
                    .run(&["--rm"], &rootfs, &id, &argv)
                    .output()
                    .unwrap();
            }
            assert!(out.status.success(), "{}", show(&out, &containerd));
            text(&out.stdout).trim().to_owned()
        })
        .collect();
    boot_ids.sort();
    boot_ids.dedup();
    assert_eq!(boot_ids.len(), 4, "four kernels: {boot_ids:?}");
    assert_empty(&containerd);
}
