//! The container's OCI spec as the guest's crun gets it: containerd writes the bundle's
//! `config.json` for a runtime on the host; this rewrites what only holds there.
//!
//! - `root.path` becomes `rootfs`, the bundle's root filesystem as the guest sees it.
//! - `process.terminal` becomes `false`: the TTY is the agent's (crun runs on it), so
//!   resizes reach it through the process API.
//! - Hooks are dropped: they name host binaries.
//! - A namespace to join by path names a host namespace. The network one is dropped:
//!   the container uses the VM's network, which is the pod's. `/proc/<pid>/ns/<kind>`
//!   (how CRI points a pod's containers at its sandbox container's namespaces, by the
//!   pid containerd was told: the VM's) becomes the sandbox container's namespace in
//!   the guest, when the shim holds a running one; any other path is refused.
//! - A hostname with no UTS namespace (a host-network pod) gets the pod's UTS
//!   namespace: the VM is the pod's host.
//! - A cgroup path in systemd's `slice:prefix:name` form becomes `/vmkit/<id>`: the
//!   guest has no systemd.
//! - AppArmor and SELinux labels are dropped: the guest kernel enforces neither.
//! - A bind mount of a host path (CRI's `/etc/hosts`, `/etc/resolv.conf`, the pod's
//!   `/dev/shm`, a volume) reaches the guest through the container's share: the shim
//!   binds the source at `mounts/<n>` in the shared directory ([`GuestSpec::binds`])
//!   and the guest's spec binds it from there.
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
    /// The host paths to bind into the shared directory, each at `mounts/<index>`.
    pub(crate) binds: Vec<Bind>,
}

/// A host path a container binds, and whether it is bound read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bind {
    pub(crate) source: String,
    pub(crate) read_only: bool,
}

/// Where the guest finds what it needs of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Guest<'a> {
    /// The container's shared directory in the guest.
    pub(crate) dir: &'a str,
    /// The pod's sandbox container's pid in the guest, once it runs.
    pub(crate) sandbox_pid: Option<u32>,
}

/// Rewrites the bundle's spec `spec` of container `id` for the guest.
pub(crate) fn for_guest(id: &str, spec: &Value, guest: Guest<'_>) -> Result<GuestSpec> {
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
        linux_for_guest(&op, id, linux, guest.sandbox_pid)?;
    }
    uts_for_hostname(top, guest.sandbox_pid);
    let mut binds = Vec::new();
    if let Some(mounts) = top.get_mut("mounts").and_then(Value::as_array_mut) {
        for mount in mounts {
            if let Some(bind) = bind_through_share(&op, mount, guest.dir, binds.len())? {
                binds.push(bind);
            }
        }
    }
    Ok(GuestSpec {
        spec,
        terminal,
        binds,
    })
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
        binds: Vec::new(),
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

fn linux_for_guest(
    op: &str,
    id: &str,
    linux: &mut Map<String, Value>,
    sandbox_pid: Option<u32>,
) -> Result<()> {
    linux.remove("mountLabel");
    if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        let mut kept = Vec::new();
        for ns in namespaces.drain(..) {
            let kind = ns.get("type").and_then(Value::as_str).unwrap_or_default();
            match ns.get("path").and_then(Value::as_str) {
                None | Some("") => kept.push(ns),
                Some(_) if kind == "network" => {}
                Some(path) => match (proc_ns_kind(path), sandbox_pid) {
                    (Some(of), Some(pid)) => {
                        let mut ns = Map::new();
                        ns.insert("type".into(), kind.into());
                        ns.insert("path".into(), format!("/proc/{pid}/ns/{of}").into());
                        kept.push(Value::Object(ns));
                    }
                    _ => {
                        return Err(Error::unsupported(
                            op,
                            format!("joining the host's {kind} namespace at {path}"),
                        ));
                    }
                },
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

/// A hostname with no UTS namespace to set it in (CRI's host-network pods: the host's
/// UTS namespace, here the VM's) gets the pod's: a new one for the sandbox container
/// (no sandbox runs yet), the sandbox container's for the pod's others (which then
/// leave the hostname as the sandbox set it).
fn uts_for_hostname(top: &mut Map<String, Value>, sandbox_pid: Option<u32>) {
    let named = top
        .get("hostname")
        .and_then(Value::as_str)
        .is_some_and(|h| !h.is_empty());
    let Some(namespaces) = top
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    if !named || namespaces.iter().any(|ns| ns["type"] == "uts") {
        return;
    }
    let mut uts = Map::new();
    uts.insert("type".into(), "uts".into());
    if let Some(pid) = sandbox_pid {
        uts.insert("path".into(), format!("/proc/{pid}/ns/uts").into());
    }
    namespaces.push(Value::Object(uts));
    if sandbox_pid.is_some() {
        top.remove("hostname");
    }
}

/// `<kind>` of a `/proc/<pid>/ns/<kind>` path.
fn proc_ns_kind(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/proc/")?;
    let (pid, rest) = rest.split_once('/')?;
    let kind = rest.strip_prefix("ns/")?;
    let known = ["ipc", "uts", "pid", "net", "mnt", "cgroup", "user", "time"];
    (pid.bytes().all(|b| b.is_ascii_digit()) && !pid.is_empty() && known.contains(&kind))
        .then_some(kind)
}

/// A bind mount of a host path: points it at `mounts/<index>` of the shared directory
/// `dir` in the guest, and returns what the shim binds there.
fn bind_through_share(
    op: &str,
    mount: &mut Value,
    dir: &str,
    index: usize,
) -> Result<Option<Bind>> {
    let kind = mount
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let options: Vec<&str> = mount
        .get("options")
        .and_then(Value::as_array)
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let bind = kind == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
    if !bind {
        return Ok(None);
    }
    let source = mount
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !source.starts_with('/') || source.split('/').any(|p| p == "..") {
        return Err(Error::bad(
            op,
            format!("bind mount source {source:?} is not a plain absolute path"),
        ));
    }
    let read_only = options.contains(&"ro");
    let bind = Bind {
        source: source.to_owned(),
        read_only,
    };
    mount["source"] = format!("{dir}/mounts/{index}").into();
    Ok(Some(bind))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    const GUEST: Guest<'static> = Guest {
        dir: "/containers/c1",
        sandbox_pid: None,
    };

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
        let guest = for_guest("c1", &ctr_spec(), GUEST).unwrap();
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
        let guest = for_guest("c1", &spec, GUEST).unwrap();
        assert_eq!(guest.spec["linux"]["cgroupsPath"], json!("/default/c1"));
    }

    #[test]
    fn what_cannot_hold_in_the_guest_is_refused_by_name() {
        let mut join = ctr_spec();
        join["linux"]["namespaces"] = json!([{"type": "ipc", "path": "/proc/42/ns/ipc"}]);
        let mut host_ns = ctr_spec();
        host_ns["linux"]["namespaces"] = json!([{"type": "ipc", "path": "/run/ipcns/x"}]);
        let mut bad_bind = ctr_spec();
        bad_bind["mounts"] = json!([{"destination": "/x", "type": "bind", "source": "/a/../etc", "options": ["rbind"]}]);
        let mut no_process = ctr_spec();
        no_process.as_object_mut().unwrap().remove("process");
        for (spec, needle) in [
            (join, "joining the host's ipc namespace at /proc/42/ns/ipc"),
            (host_ns, "joining the host's ipc namespace at /run/ipcns/x"),
            (bad_bind, "is not a plain absolute path"),
            (no_process, "has no process"),
            (json!([1]), "not a JSON object"),
        ] {
            let err = for_guest("c1", &spec, GUEST).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("spec of container c1"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_pods_namespaces_are_its_sandbox_containers_in_the_guest() {
        let mut spec = ctr_spec();
        spec["linux"]["namespaces"] = json!([
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"}
        ]);
        let guest = Guest {
            sandbox_pid: Some(7),
            ..GUEST
        };
        let spec = for_guest("c1", &spec, guest).unwrap().spec;
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
                {"type": "mount"}
            ])
        );
        assert_eq!(proc_ns_kind("/proc/1/ns/net"), Some("net"));
        assert_eq!(proc_ns_kind("/proc/x/ns/net"), None);
        assert_eq!(proc_ns_kind("/proc/1/ns/../../etc"), None);
    }

    #[test]
    fn a_host_network_pods_hostname_gets_the_pods_uts_namespace() {
        let mut spec = ctr_spec();
        spec["hostname"] = json!("pod1");
        spec["linux"]["namespaces"] = json!([{"type": "pid"}]);
        let sandbox = for_guest("p", &spec, GUEST).unwrap().spec;
        assert_eq!(
            sandbox["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        assert_eq!(sandbox["hostname"], json!("pod1"));
        let guest = Guest {
            sandbox_pid: Some(9),
            ..GUEST
        };
        let member = for_guest("c", &spec, guest).unwrap().spec;
        assert_eq!(
            member["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts", "path": "/proc/9/ns/uts"}])
        );
        assert!(member.get("hostname").is_none());
        spec.as_object_mut().unwrap().remove("hostname");
        let unnamed = for_guest("c", &spec, GUEST).unwrap().spec;
        assert_eq!(unnamed["linux"]["namespaces"], json!([{"type": "pid"}]));
    }

    #[test]
    fn host_binds_go_through_the_share() {
        let mut spec = ctr_spec();
        spec["mounts"] = json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/hosts", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "ro"]}
        ]);
        let guest = for_guest("c1", &spec, GUEST).unwrap();
        assert_eq!(
            guest.binds,
            [
                Bind {
                    source: "/var/lib/cri/hosts".into(),
                    read_only: false
                },
                Bind {
                    source: "/srv/data".into(),
                    read_only: true
                },
            ]
        );
        let mounts = &guest.spec["mounts"];
        assert_eq!(mounts[0]["source"], json!("proc"));
        assert_eq!(mounts[1]["source"], json!("/containers/c1/mounts/0"));
        assert_eq!(mounts[1]["options"], json!(["rbind", "rprivate", "rw"]));
        assert_eq!(mounts[2]["source"], json!("/containers/c1/mounts/1"));
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
