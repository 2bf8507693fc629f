//! A share's QEMU objects: virtio-fs (`vhost-user-fs` on the chardev of the share's
//! virtiofsd, and that daemon's own arguments) or virtio-9p (`-fsdev local` and
//! `virtio-9p`). Paths reach `-fsdev` and `-chardev` escaped for QEMU's option syntax,
//! and devices are JSON, so a comma in a path or tag cannot add an option.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::json;
use vmkit_core::{Error as CoreError, ShareCache, ShareConfig, ShareVia};

use crate::escape::escape_path;
use crate::fs_daemon::DaemonLaunch;
use crate::options::Machine;

/// The share with its transport decided: `Auto` becomes virtio-fs when this VM can run
/// virtiofsd (`virtio_fs`), else virtio-9p.
///
/// # Errors
/// `Unsupported` for virtio-fs asked for where it cannot run, naming why.
pub(crate) fn resolve(
    op: &str,
    mut share: ShareConfig,
    virtio_fs: bool,
) -> vmkit_core::Result<ShareConfig> {
    share.via = match (share.via, virtio_fs) {
        (ShareVia::Auto | ShareVia::VirtioFs, true) => ShareVia::VirtioFs,
        (ShareVia::Auto | ShareVia::NineP, _) => ShareVia::NineP,
        (ShareVia::VirtioFs, false) => {
            return Err(CoreError::unsupported(
                op,
                crate::BACKEND_NAME,
                format!(
                    "share {}: virtio-fs needs virtiofsd (backend option virtiofsd_binary) \
                     and a QEMU with vhost-user on this host; virtio-9p (via: nine_p) needs neither",
                    share.id
                ),
            ));
        }
    };
    Ok(share)
}

/// Where the virtiofsd of the share whose objects are named `name` serves QEMU: in the
/// VM's private state dir.
pub(crate) fn virtiofsd_socket(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.sock"))
}

/// How to run the virtiofsd of `share` whose QEMU objects are named `name` (a cold
/// share's [`cold_name`], a hot one's reserved name): `binary`, serving
/// [`virtiofsd_socket`] in `state_dir`, logging to `<log_dir>/<name>.log`, sandboxed
/// when vmkit runs as root.
pub(crate) fn virtiofsd_launch(
    share: &ShareConfig,
    binary: &Path,
    state_dir: &Path,
    log_dir: &Path,
    name: &str,
) -> DaemonLaunch {
    let socket = virtiofsd_socket(state_dir, name);
    DaemonLaunch {
        binary: binary.to_owned(),
        args: virtiofsd_args(share, &socket, vmkit_core::state_dir::euid() == 0),
        socket,
        log: log_dir.join(format!("{name}.log")),
    }
}

/// virtiofsd's arguments for `share` on `socket`: the shared dir, read-only and cache
/// mode as asked, and a sandbox (its own mount namespace when it runs as root, where
/// it can make one; none otherwise).
fn virtiofsd_args(share: &ShareConfig, socket: &Path, root: bool) -> Vec<OsString> {
    let cache = match share.cache {
        ShareCache::Auto => "auto",
        ShareCache::Always => "always",
        ShareCache::Never => "never",
        ShareCache::Metadata => "metadata",
    };
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        socket.into(),
        "--shared-dir".into(),
        share.path.clone().into(),
        "--cache".into(),
        cache.into(),
        "--sandbox".into(),
        if root { "namespace" } else { "none" }.into(),
        "--log-level".into(),
        "warn".into(),
    ];
    if share.read_only {
        args.push("--readonly".into());
    }
    args
}

/// The `vhost-user-fs` device JSON of `share` on chardev `chardev`.
pub(crate) fn virtio_fs_device(
    share: &ShareConfig,
    chardev: &str,
    machine: Machine,
) -> serde_json::Value {
    json!({
        "driver": match machine {
            Machine::Q35 | Machine::Virt => "vhost-user-fs-pci",
            Machine::Microvm => "vhost-user-fs-device",
        },
        "id": share.id,
        "chardev": chardev,
        "tag": share.tag,
    })
}

/// `-chardev` and `-device` for cold share number `index` over virtio-fs, its daemon
/// serving `socket`.
pub(crate) fn virtio_fs_args(
    index: usize,
    share: &ShareConfig,
    socket: &Path,
    machine: Machine,
) -> Vec<OsString> {
    let chardev = cold_name(index);
    vec![
        "-chardev".into(),
        format!("socket,id={chardev},path={}", escape_path(socket)).into(),
        "-device".into(),
        virtio_fs_device(share, &chardev, machine)
            .to_string()
            .into(),
    ]
}

/// `-fsdev` and `-device` for cold share number `index` over virtio-9p. The guest's
/// files are stored `mapped-xattr`: what the guest makes (a symlink, a device node, a
/// file of another owner) is a plain file with attributes on the host, so a link the
/// guest plants is never followed by the host.
pub(crate) fn nine_p_args(index: usize, share: &ShareConfig, machine: Machine) -> Vec<OsString> {
    let fsdev = cold_name(index);
    let mut fsdev_arg = format!(
        "local,id={fsdev},path={},security_model=mapped-xattr",
        escape_path(&share.path)
    );
    if share.read_only {
        fsdev_arg.push_str(",readonly=on");
    }
    let device = json!({
        "driver": match machine {
            Machine::Q35 | Machine::Virt => "virtio-9p-pci",
            Machine::Microvm => "virtio-9p-device",
        },
        "id": share.id,
        "fsdev": fsdev,
        "mount_tag": share.tag,
    });
    vec![
        "-fsdev".into(),
        fsdev_arg.into(),
        "-device".into(),
        device.to_string().into(),
    ]
}

/// The name of cold share number `index`'s QEMU objects (chardev or fsdev) and daemon
/// socket.
pub(crate) fn cold_name(index: usize) -> String {
    format!("vmkit-fs{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn share(dir: &Path) -> ShareConfig {
        ShareConfig::new("data", "da.ta-1", dir)
    }

    #[test]
    fn auto_is_virtio_fs_where_it_runs_else_9p_and_asking_for_it_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let auto = share(dir.path());
        assert_eq!(
            resolve("op", auto.clone(), true).unwrap().via,
            ShareVia::VirtioFs
        );
        assert_eq!(resolve("op", auto, false).unwrap().via, ShareVia::NineP);
        let asked = ShareConfig {
            via: ShareVia::VirtioFs,
            ..share(dir.path())
        };
        let err = resolve("add_device", asked, false).unwrap_err();
        assert!(matches!(err, CoreError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("virtiofsd"), "{err}");
        let nine = ShareConfig {
            via: ShareVia::NineP,
            ..share(dir.path())
        };
        assert_eq!(resolve("op", nine, true).unwrap().via, ShareVia::NineP);
    }

    #[test]
    fn a_comma_in_a_path_stays_in_the_path() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a,readonly=off,b");
        let mut s = share(&dir);
        s.read_only = true;
        let args = nine_p_args(0, &s, Machine::Q35);
        assert_eq!(args[0], "-fsdev");
        let fsdev = args[1].to_str().unwrap();
        let expected = format!(
            "local,id=vmkit-fs0,path={}/a,,readonly=off,,b,security_model=mapped-xattr,readonly=on",
            root.path().display()
        );
        assert_eq!(fsdev, expected);
        let device: Value = serde_json::from_str(args[3].to_str().unwrap()).unwrap();
        assert_eq!(device["mount_tag"], "da.ta-1");
        assert_eq!(device["fsdev"], "vmkit-fs0");
        assert_eq!(device["driver"], "virtio-9p-pci");
        let socket = Path::new("/run/vm,x/vmkit-fs1.sock");
        let args = virtio_fs_args(1, &s, socket, Machine::Microvm);
        assert_eq!(
            args[1],
            "socket,id=vmkit-fs1,path=/run/vm,,x/vmkit-fs1.sock"
        );
        let device: Value = serde_json::from_str(args[3].to_str().unwrap()).unwrap();
        assert_eq!(device["driver"], "vhost-user-fs-device");
        assert_eq!(device["tag"], "da.ta-1");
        assert_eq!(device["chardev"], "vmkit-fs1");
    }

    #[test]
    fn virtiofsd_gets_its_options_as_separate_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = share(dir.path());
        s.cache = ShareCache::Never;
        s.read_only = true;
        let args: Vec<String> = virtiofsd_args(&s, Path::new("/run/vm/fs.sock"), true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("--shared-dir"), dir.path().to_str().unwrap());
        assert_eq!(after("--cache"), "never");
        assert_eq!(after("--sandbox"), "namespace");
        assert!(args.contains(&"--readonly".to_owned()));
        let unprivileged = virtiofsd_args(&share(dir.path()), Path::new("/s"), false);
        assert!(unprivileged.contains(&OsString::from("none")));
        assert!(!unprivileged.contains(&OsString::from("--readonly")));
    }
}
