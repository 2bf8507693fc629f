//! The container's OCI spec as the guest's crun gets it: containerd writes the bundle's
//! `config.json` for a runtime on the host; this rewrites what only holds there.
//!
//! - `root.path` becomes `rootfs`, the bundle's root filesystem as the guest sees it.
//! - `process.terminal` becomes `false`: the TTY is the agent's (crun runs on it), so
//!   resizes reach it through the process API.
//! - Hooks are dropped: they name host binaries.
//! - A namespace to join by path names a host namespace: the network one is dropped
//!   (the container uses the VM's network, which is the pod's), any other is refused.
//! - A cgroup path in systemd's `slice:prefix:name` form becomes `/vmkit/<id>`: the
//!   guest has no systemd.
//! - AppArmor and SELinux labels are dropped: the guest kernel enforces neither.
//! - A bind mount of a host path is refused: the guest does not see the host's files.
//!
//! The rest — namespaces, cgroups, user, env, cwd, mounts of kernel file systems,
//! rlimits, capabilities, seccomp — reaches crun as containerd wrote it.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The spec rewritten for the guest, and whether the container wants a TTY.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GuestSpec {
    /// The spec to write beside the guest's rootfs.
    pub(crate) spec: Value,
    /// `process.terminal` as containerd asked.
    pub(crate) terminal: bool,
}

/// Rewrites the bundle's spec `spec` of container `id` for the guest.
pub(crate) fn for_guest(id: &str, spec: &Value) -> Result<GuestSpec> {
    let op = format!("spec of container {id}");
    let mut spec = spec.clone();
    let top = spec
        .as_object_mut()
        .ok_or_else(|| Error::bad(&op, "config.json is not a JSON object"))?;
    let readonly = top
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut root = Map::new();
    root.insert("path".into(), "rootfs".into());
    root.insert("readonly".into(), readonly.into());
    top.insert("root".into(), Value::Object(root));
    top.remove("hooks");
    let terminal = match top.get_mut("process").and_then(Value::as_object_mut) {
        Some(process) => for_guest_process(process),
        None => return Err(Error::bad(&op, "config.json has no process")),
    };
    if let Some(linux) = top.get_mut("linux").and_then(Value::as_object_mut) {
        linux_for_guest(&op, id, linux)?;
    }
    if let Some(mounts) = top.get("mounts").and_then(Value::as_array) {
        for mount in mounts {
            check_mount(&op, mount)?;
        }
    }
    Ok(GuestSpec { spec, terminal })
}

/// An exec's process spec for the guest, and whether it wants a TTY.
pub(crate) fn process_for_guest(process: &Value) -> Result<GuestSpec> {
    let mut process = process.clone();
    let object = process
        .as_object_mut()
        .ok_or_else(|| Error::bad("exec process spec", "not a JSON object"))?;
    let terminal = for_guest_process(object);
    Ok(GuestSpec {
        spec: process,
        terminal,
    })
}

/// Clears `terminal` and the LSM labels; returns what `terminal` was.
fn for_guest_process(process: &mut Map<String, Value>) -> bool {
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    process.insert("terminal".into(), false.into());
    process.remove("apparmorProfile");
    process.remove("selinuxLabel");
    terminal
}

fn linux_for_guest(op: &str, id: &str, linux: &mut Map<String, Value>) -> Result<()> {
    linux.remove("mountLabel");
    if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        let mut kept = Vec::new();
        for ns in namespaces.drain(..) {
            let kind = ns.get("type").and_then(Value::as_str).unwrap_or_default();
            match ns.get("path").and_then(Value::as_str) {
                None | Some("") => kept.push(ns),
                Some(_) if kind == "network" => {}
                Some(path) => {
                    return Err(Error::unsupported(
                        op,
                        format!("joining the host's {kind} namespace at {path}"),
                    ));
                }
            }
        }
        *namespaces = kept;
    }
    let cgroups = linux.get("cgroupsPath").and_then(Value::as_str);
    if cgroups.is_some_and(|p| !p.starts_with('/')) {
        linux.insert("cgroupsPath".into(), format!("/vmkit/{id}").into());
    }
    Ok(())
}

/// Refuses a bind mount (of a host path, which the guest cannot see).
fn check_mount(op: &str, mount: &Value) -> Result<()> {
    let kind = mount
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let options = mount.get("options").and_then(Value::as_array);
    let bind =
        kind == "bind" || options.is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
    if bind {
        let source = mount
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let target = mount
            .get("destination")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Err(Error::unsupported(
            op,
            format!(
                "bind mount of host path {source} at {target}: the VM does not see the host's files"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn ctr_spec() -> Value {
        json!({
            "ociVersion": "1.2.0",
            "process": {"terminal": true, "args": ["sh"], "cwd": "/", "env": ["A=1"],
                        "apparmorProfile": "docker-default", "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
            "root": {"path": "/var/lib/containerd/rootfs-of-c1", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"}],
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:c1",
                "mountLabel": "system_u:object_r:container_file_t:s0"
            },
            "x-unknown": {"kept": true}
        })
    }

    #[test]
    fn host_only_parts_are_rewritten_and_the_rest_is_kept() {
        let guest = for_guest("c1", &ctr_spec()).unwrap();
        assert!(guest.terminal);
        let spec = guest.spec;
        assert_eq!(spec["root"], json!({"path": "rootfs", "readonly": true}));
        assert_eq!(spec["process"]["terminal"], json!(false));
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert_eq!(spec["process"]["env"], json!(["A=1"]));
        assert_eq!(spec["process"]["rlimits"][0]["hard"], json!(1024));
        assert!(spec.get("hooks").is_none());
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
        assert_eq!(spec["linux"]["cgroupsPath"], json!("/vmkit/c1"));
        assert!(spec["linux"].get("mountLabel").is_none());
        assert_eq!(spec["x-unknown"], json!({"kept": true}));
        assert_eq!(spec["mounts"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_cgroupfs_path_is_kept() {
        let mut spec = ctr_spec();
        spec["linux"]["cgroupsPath"] = json!("/default/c1");
        let guest = for_guest("c1", &spec).unwrap();
        assert_eq!(guest.spec["linux"]["cgroupsPath"], json!("/default/c1"));
    }

    #[test]
    fn what_cannot_hold_in_the_guest_is_refused_by_name() {
        let mut join = ctr_spec();
        join["linux"]["namespaces"] = json!([{"type": "ipc", "path": "/proc/42/ns/ipc"}]);
        let mut bind = ctr_spec();
        bind["mounts"] = json!([{"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]}]);
        let mut no_process = ctr_spec();
        no_process.as_object_mut().unwrap().remove("process");
        for (spec, needle) in [
            (join, "joining the host's ipc namespace at /proc/42/ns/ipc"),
            (
                bind,
                "bind mount of host path /var/lib/x/hosts at /etc/hosts",
            ),
            (no_process, "has no process"),
            (json!([1]), "not a JSON object"),
        ] {
            let err = for_guest("c1", &spec).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("spec of container c1"),
                "{err}"
            );
        }
    }

    #[test]
    fn an_exec_process_loses_its_terminal_flag() {
        let guest = process_for_guest(&json!({"args": ["ls"], "terminal": true})).unwrap();
        assert!(guest.terminal);
        assert_eq!(guest.spec, json!({"args": ["ls"], "terminal": false}));
        assert!(
            !process_for_guest(&json!({"args": ["ls"]}))
                .unwrap()
                .terminal
        );
        assert!(process_for_guest(&json!("ls")).is_err());
    }
}
