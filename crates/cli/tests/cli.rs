//! The `vmkit` binary as a user runs it: bad input gets one line naming the problem and
//! a non-zero exit; a detached VM of the real test guest is exec'd into, hot-plugged and
//! stopped with `--json` output parsed; a foreground command's exit code becomes
//! vmkit's; a supervisor killed with SIGKILL takes its QEMU and daemons with it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmkit_testkit::guest::require_guest_image;
use vmkit_testkit::leaks::{alive, processes_mentioning};
use vmkit_testkit::qemu::require_qemu;

/// `vmkit` with a private runtime dir and the test guest, under TCG.
fn vmkit(runtime: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmkit"));
    cmd.env("VMKIT_RUNTIME_DIR", runtime)
        .env("VMKIT_IMAGE_DIR", vmkit_testkit::guest::image_dir())
        .env("VMKIT_ACCEL", "tcg")
        .env_remove("RUST_LOG");
    cmd
}

fn run(runtime: &Path, args: &[&str]) -> Output {
    vmkit(runtime).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The command failed with one line on stderr that starts `vmkit: ` and holds `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
    assert!(lines[0].starts_with("vmkit: "), "{stderr:?}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

#[test]
fn bad_input_gets_one_line_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    let out = run(&rt, &["run", "--cpus", "many"]);
    assert_one_line_error(&out, "invalid value 'many' for '--cpus <CPUS>'");
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(
        &run(&rt, &["frobnicate"]),
        "unrecognized subcommand 'frobnicate'",
    );
    assert_one_line_error(
        &run(&rt, &["run", "--kernel", "/no/such/vmlinuz", "--detach"]),
        "--kernel /no/such/vmlinuz: no such file",
    );
    assert_one_line_error(
        &run(&rt, &["run", "--disk", "/x,format=vmdk"]),
        "--disk \"/x,format=vmdk\": format \"vmdk\": raw or qcow2",
    );
    assert_one_line_error(
        &run(&rt, &["run", "--name", "../etc", "-d"]),
        "VM name \"../etc\"",
    );
    for args in [
        &["inspect", "nosuch"][..],
        &["stop", "nosuch"],
        &["exec", "nosuch", "--", "true"],
        &["hotplug", "nosuch", "cpu", "2"],
        &["rm", "nosuch"],
    ] {
        assert_one_line_error(&run(&rt, args), "no VM named \"nosuch\"");
    }
    let config = tmp.path().join("vm.toml");
    std::fs::write(&config, "version = 2\n[vm]\n").unwrap();
    assert_one_line_error(
        &run(&rt, &["run", "--config", config.to_str().unwrap()]),
        "version 2 is not one this vmkit reads",
    );
    // Nothing was registered by any of it.
    let listed = json(&run(&rt, &["ps", "--json"]));
    assert_eq!(listed, Value::Array(Vec::new()));
}

#[test]
fn a_detached_vm_is_exec_d_into_hot_plugged_and_stopped() {
    if require_qemu().is_none() || require_guest_image().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    let started = json(&run(
        &rt,
        &[
            "--json",
            "run",
            "-d",
            "--name",
            "web",
            "--transport",
            "virtio-serial",
        ],
    ));
    assert_eq!(started["name"], "web");
    assert_eq!(started["info"]["state"], "running", "{started}");
    let qemu_pid = started["info"]["pid"].as_u64().unwrap();

    let out = run(
        &rt,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let grown = json(&run(&rt, &["--json", "hotplug", "web", "cpu", "2"]));
    assert_eq!(
        (grown["before"].as_u64(), grown["achieved"].as_u64()),
        (Some(1), Some(2))
    );
    let out = run(&rt, &["exec", "web", "--", "nproc"]);
    assert_eq!(text(&out.stdout).trim(), "2", "{}", text(&out.stderr));
    let listed = json(&run(&rt, &["ps", "--format", "json"]));
    assert_eq!(listed[0]["name"], "web");
    assert_eq!(listed[0]["vcpus"], 2);

    let stopped = json(&run(&rt, &["--json", "stop", "web"]));
    assert_eq!(stopped["exit"]["reason"], "guest_shutdown", "{stopped}");
    assert!(
        !alive(u32::try_from(qemu_pid).unwrap()),
        "QEMU outlived stop"
    );
    assert_one_line_error(
        &run(&rt, &["stop", "web"]),
        "stop: VM \"web\" is stopped (guest_shutdown)",
    );
    assert_one_line_error(
        &run(&rt, &["exec", "web", "--", "true"]),
        "exec: VM \"web\" is stopped",
    );
    let listed = json(&run(&rt, &["--json", "ps"]));
    assert_eq!(listed[0]["state"], "stopped (guest_shutdown)");
    assert!(run(&rt, &["rm", "web"]).status.success());
    assert!(!rt.join("web").exists());
    assert_eq!(processes_mentioning(&rt), Vec::<u32>::new());
}

#[test]
fn a_foreground_command_s_exit_code_is_vmkit_s() {
    if require_qemu().is_none() || require_guest_image().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    let out = run(
        &rt,
        &[
            "run",
            "--transport",
            "virtio-serial",
            "--",
            "sh",
            "-c",
            "echo hello; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    // The foreground VM's scratch dir went with it.
    assert_eq!(std::fs::read_dir(&rt).unwrap().count(), 0);
}

#[test]
fn a_supervisor_killed_with_sigkill_takes_its_vm_with_it() {
    if require_qemu().is_none() || require_guest_image().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rt = tmp.path().join("rt");
    // Hybrid vsock: a vsock daemon beside QEMU, which must go too.
    let mut out = run(&rt, &["--json", "run", "-d", "--name", "doomed"]);
    if !out.status.success() && vmkit_testkit::guest::vsock_daemon_fault(&text(&out.stderr)) {
        run(&rt, &["rm", "doomed"]);
        out = run(&rt, &["--json", "run", "-d", "--name", "doomed"]);
    }
    let started = json(&out);
    let qemu = u32::try_from(started["info"]["pid"].as_u64().unwrap()).unwrap();
    let supervisor = u32::try_from(started["supervisor_pid"].as_u64().unwrap()).unwrap();
    let helpers = processes_mentioning(rt.join("doomed"));
    assert!(helpers.contains(&qemu), "{helpers:?}");
    assert!(helpers.len() >= 2, "no vsock daemon among {helpers:?}");

    assert!(
        Command::new("kill")
            .args(["-9", &supervisor.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && (alive(supervisor) || helpers.iter().any(|pid| alive(*pid)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in helpers {
        assert!(!alive(pid), "process {pid} outlived its supervisor");
    }
    // The entry is stale now: not trusted, cleaned.
    assert_one_line_error(
        &run(&rt, &["exec", "doomed", "--", "true"]),
        "its supervisor died",
    );
    assert!(!rt.join("doomed").exists());
    assert_eq!(json(&run(&rt, &["--json", "ps"])), Value::Array(Vec::new()));
}
