//! What is left when things die under a running container: the shim SIGKILLed
//! (containerd's cleanup, the shim's `delete` subcommand, leaves no QEMU, daemon,
//! socket or mount), and containerd restarted (the container is still listed, and can
//! be killed).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::time::{Duration, Instant};

mod common;
use common::*;

/// Waits until `done()` holds, at most `within`.
fn eventually(what: &str, within: Duration, done: impl Fn() -> bool) {
    let until = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < until, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid `ctr task ls` shows for a task: the VM's (QEMU's).
fn task_pid(line: &str) -> u32 {
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_killed_shim_leaves_no_qemu_daemon_socket_or_mount() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let containerd = start(&parts, false);
    containerd.import_images("default", &parts.images).unwrap();
    let out = containerd
        .output_retrying("k1", || {
            let mut cmd = containerd.ctr();
            cmd.args(["run", "-d", "--runtime", "io.containerd.vmkit.v1"])
                .args(["vmkit.test/busybox:1", "k1", "sleep", "1000"]);
            cmd
        })
        .unwrap();
    assert!(out.status.success(), "{}", show(&out, &containerd));
    let qemu = task_pid(
        &containerd
            .wait_status("k1", "RUNNING", Duration::from_secs(60))
            .unwrap(),
    );
    assert!(alive(qemu));
    let shims = containerd.shims(Some("k1"));
    assert_eq!(shims.len(), 1, "one shim serves k1: {shims:?}");
    let state_root = containerd.dir().join("vms");
    let daemons = vmkit_testkit::leaks::processes_mentioning(&state_root);
    assert!(
        !containerd.mounts().is_empty(),
        "the snapshot is mounted while it runs"
    );

    assert!(signal(shims[0], 9));
    eventually("QEMU ends with its shim", Duration::from_secs(20), || {
        !alive(qemu)
    });
    eventually("the daemons end", Duration::from_secs(20), || {
        daemons.iter().all(|pid| !alive(*pid))
    });
    eventually(
        "containerd sees the task stopped",
        Duration::from_secs(30),
        || {
            let ls = containerd.ctr().args(["task", "ls"]).output().unwrap();
            !text(&ls.stdout).contains("RUNNING")
        },
    );
    let rm = containerd
        .ctr()
        .args(["task", "rm", "k1"])
        .output()
        .unwrap();
    let _ = rm; // containerd may have removed the task already
    let rm = containerd
        .ctr()
        .args(["container", "rm", "k1"])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", show(&rm, &containerd));
    assert_eq!(containerd.mounts(), Vec::<String>::new(), "mounts left");
    let left: Vec<_> = std::fs::read_dir(&state_root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM state left: {left:?}");
    assert!(containerd.shims(None).is_empty(), "shims left");
}

#[test]
fn a_restarted_containerd_still_lists_the_container_and_can_kill_it() {
    let Some(parts) = parts() else {
        return;
    };
    let _one = one_at_a_time();
    let mut containerd = start(&parts, false);
    containerd.import_images("default", &parts.images).unwrap();
    let out = containerd
        .output_retrying("r1", || {
            let mut cmd = containerd.ctr();
            cmd.args(["run", "-d", "--runtime", "io.containerd.vmkit.v1"])
                .args(["vmkit.test/busybox:1", "r1", "sleep", "1000"]);
            cmd
        })
        .unwrap();
    assert!(out.status.success(), "{}", show(&out, &containerd));
    let qemu = task_pid(
        &containerd
            .wait_status("r1", "RUNNING", Duration::from_secs(60))
            .unwrap(),
    );

    containerd.restart().unwrap();
    let line = containerd
        .wait_status("r1", "RUNNING", Duration::from_secs(30))
        .unwrap();
    assert_eq!(task_pid(&line), qemu, "the same VM");
    let kill = containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", "r1"])
        .output()
        .unwrap();
    assert!(kill.status.success(), "{}", show(&kill, &containerd));
    containerd
        .wait_status("r1", "STOPPED", Duration::from_secs(30))
        .unwrap();
    let rm = containerd
        .ctr()
        .args(["task", "rm", "r1"])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", show(&rm, &containerd));
    let rm = containerd
        .ctr()
        .args(["container", "rm", "r1"])
        .output()
        .unwrap();
    assert!(rm.status.success(), "{}", show(&rm, &containerd));
    let until = Instant::now() + Duration::from_secs(30);
    while alive(qemu) {
        assert!(
            Instant::now() < until,
            "QEMU still runs after the task was removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(containerd.mounts(), Vec::<String>::new(), "mounts left");
    assert_empty(&containerd);
}
