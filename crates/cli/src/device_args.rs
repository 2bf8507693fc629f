//! The `--disk`, `--nic` and `--share` specs (`PATH,key=value,flag…`), parsed into
//! vmkit-core's device configs. The configs are validated by vmkit when the device is
//! added; here only the spec's own syntax is checked.

use std::path::PathBuf;

use vmkit_core::{DiskConfig, DiskFormat, MacAddr, NicConfig, ShareConfig, ShareVia};

use crate::error::{Error, Result};

/// A spec split at its commas: the first field, then `key=value` and bare flags.
struct Spec<'a> {
    what: &'static str,
    text: &'a str,
    head: &'a str,
    fields: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Spec<'a> {
    fn parse(what: &'static str, text: &'a str) -> Result<Spec<'a>> {
        let mut parts = text.split(',');
        let head = parts.next().unwrap_or_default();
        if head.is_empty() {
            return Err(Error::BadArgument(format!(
                "{what} {text:?}: nothing before the first ','"
            )));
        }
        let fields = parts
            .map(|part| match part.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (part, None),
            })
            .collect();
        Ok(Spec {
            what,
            text,
            head,
            fields,
        })
    }

    fn bad(&self, why: impl std::fmt::Display) -> Error {
        Error::BadArgument(format!("{} {:?}: {why}", self.what, self.text))
    }

    fn value(&self, key: &str, value: Option<&'a str>) -> Result<&'a str> {
        value.ok_or_else(|| self.bad(format_args!("{key} needs a value ({key}=…)")))
    }

    fn flag(&self, key: &str, value: Option<&str>) -> Result<bool> {
        match value {
            None | Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(other) => Err(self.bad(format_args!("{key}={other}: expected on or off"))),
        }
    }
}

/// `PATH[,id=ID][,ro][,serial=S][,format=raw|qcow2]`; `default_id` when no `id=`.
pub(crate) fn disk(text: &str, default_id: &str) -> Result<DiskConfig> {
    let spec = Spec::parse("--disk", text)?;
    let mut disk = DiskConfig::new(default_id, absolute(&spec, spec.head)?);
    for &(key, value) in &spec.fields {
        match key {
            "id" => disk.id = spec.value(key, value)?.to_owned(),
            "ro" | "readonly" => disk.read_only = spec.flag(key, value)?,
            "serial" => disk.serial = Some(spec.value(key, value)?.to_owned()),
            "format" => {
                disk.format = match spec.value(key, value)? {
                    "raw" => DiskFormat::Raw,
                    "qcow2" => DiskFormat::Qcow2,
                    other => return Err(spec.bad(format_args!("format {other:?}: raw or qcow2"))),
                }
            }
            other => return Err(spec.bad(format_args!("unknown key {other:?}"))),
        }
    }
    Ok(disk)
}

/// `user` or `tap=NAME`, then `[,id=ID][,mac=MAC]`.
pub(crate) fn nic(text: &str, default_id: &str) -> Result<NicConfig> {
    let spec = Spec::parse("--nic", text)?;
    let mut nic = match spec.head.split_once('=') {
        None if spec.head == "user" => NicConfig::user(default_id),
        Some(("tap", name)) if !name.is_empty() => NicConfig::tap(default_id, name, None),
        _ => return Err(spec.bad("expected user or tap=NAME first")),
    };
    for &(key, value) in &spec.fields {
        match key {
            "id" => nic.id = spec.value(key, value)?.to_owned(),
            "mac" => {
                let text = spec.value(key, value)?;
                let mac: MacAddr = text
                    .parse()
                    .map_err(|e| spec.bad(format_args!("mac {text:?}: {e}")))?;
                nic.mac = Some(mac);
            }
            other => return Err(spec.bad(format_args!("unknown key {other:?}"))),
        }
    }
    Ok(nic)
}

/// `HOST_DIR,tag=TAG[,id=ID][,ro][,via=virtio-fs|9p]`.
pub(crate) fn share(text: &str, default_id: &str) -> Result<ShareConfig> {
    let spec = Spec::parse("--share", text)?;
    let path = absolute(&spec, spec.head)?;
    let mut tag = None;
    let mut share = ShareConfig::new(default_id, "", path);
    for &(key, value) in &spec.fields {
        match key {
            "tag" => tag = Some(spec.value(key, value)?.to_owned()),
            "id" => share.id = spec.value(key, value)?.to_owned(),
            "ro" | "readonly" => share.read_only = spec.flag(key, value)?,
            "via" => {
                share.via = match spec.value(key, value)? {
                    "virtio-fs" | "virtiofs" => ShareVia::VirtioFs,
                    "9p" => ShareVia::NineP,
                    "auto" => ShareVia::Auto,
                    other => {
                        return Err(spec.bad(format_args!("via {other:?}: virtio-fs, 9p or auto")));
                    }
                }
            }
            other => return Err(spec.bad(format_args!("unknown key {other:?}"))),
        }
    }
    share.tag =
        tag.ok_or_else(|| spec.bad("tag=TAG is needed: the guest mounts the share by it"))?;
    Ok(share)
}

/// The spec's path, made absolute against the current directory.
fn absolute(spec: &Spec<'_>, path: &str) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| spec.bad(format_args!("path {path:?}: {e}")))
}

/// `KEY=VALUE`.
pub(crate) fn key_value<'a>(flag: &str, text: &'a str) -> Result<(&'a str, &'a str)> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| Error::BadArgument(format!("{flag} {text:?}: expected KEY=VALUE")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use vmkit_core::NicBackend;

    #[test]
    fn a_disk_spec_sets_every_field() {
        let disk = disk("/img/a.qcow2,id=data,ro,serial=abc,format=qcow2", "disk0").unwrap();
        assert_eq!(disk.id, "data");
        assert_eq!(disk.path, PathBuf::from("/img/a.qcow2"));
        assert!(disk.read_only);
        assert_eq!(disk.serial.as_deref(), Some("abc"));
        assert_eq!(disk.format, DiskFormat::Qcow2);
        let plain = super::disk("/img/b.raw", "disk1").unwrap();
        assert_eq!((plain.id.as_str(), plain.read_only), ("disk1", false));
    }

    #[test]
    fn a_relative_path_is_made_absolute() {
        let disk = disk("b.raw", "d").unwrap();
        assert!(disk.path.is_absolute());
        assert!(disk.path.ends_with("b.raw"));
    }

    #[test]
    fn bad_specs_name_the_flag_and_the_problem() {
        let err = disk("/a,format=vmdk", "d").unwrap_err().to_string();
        assert_eq!(
            err,
            "--disk \"/a,format=vmdk\": format \"vmdk\": raw or qcow2"
        );
        let err = disk("/a,colour=red", "d").unwrap_err().to_string();
        assert_eq!(err, "--disk \"/a,colour=red\": unknown key \"colour\"");
        let err = nic("bridge", "n").unwrap_err().to_string();
        assert_eq!(err, "--nic \"bridge\": expected user or tap=NAME first");
        let err = share("/srv", "s").unwrap_err().to_string();
        assert!(
            err.ends_with("tag=TAG is needed: the guest mounts the share by it"),
            "{err}"
        );
        let err = disk(",ro", "d").unwrap_err().to_string();
        assert_eq!(err, "--disk \",ro\": nothing before the first ','");
        assert!(key_value("-o", "=x").is_err());
    }

    #[test]
    fn nics_and_shares() {
        let n = nic("tap=tap7,mac=52:54:00:12:34:56,id=eth", "net0").unwrap();
        assert_eq!(n.id, "eth");
        assert!(matches!(n.backend, NicBackend::Tap { .. }), "{n:?}");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert!(matches!(
            nic("user", "net0").unwrap().backend,
            NicBackend::User
        ));
        let s = share("/srv/data,tag=data,ro,via=9p", "share0").unwrap();
        assert_eq!(
            (s.tag.as_str(), s.read_only, s.via),
            ("data", true, ShareVia::NineP)
        );
    }

    proptest! {
        /// Any text gives a config or a `BadArgument` naming the flag, never a panic.
        #[test]
        fn any_spec_parses_or_is_refused_by_name(text in ".{0,64}") {
            for (flag, result) in [
                ("--disk", disk(&text, "d").map(drop)),
                ("--nic", nic(&text, "n").map(drop)),
                ("--share", share(&text, "s").map(drop)),
            ] {
                if let Err(e) = result {
                    prop_assert!(matches!(e, Error::BadArgument(_)));
                    prop_assert!(e.to_string().starts_with(flag), "{}", e);
                }
            }
        }
    }
}
