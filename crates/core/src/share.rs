//! Directories shared with the guest ([`ShareConfig`]): plain data, validated when
//! added, like disks and NICs; a [`crate::DeviceSpec::Share`] is one.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::validate::{Exists, check_id, check_path};

/// The longest share tag: virtio-fs's limit (the guest mounts the share by it).
pub const MAX_SHARE_TAG: usize = 36;

/// How the guest caches a share's files and metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareCache {
    /// The backend's default for the transport.
    #[default]
    Auto,
    /// Cache everything (the host does not change the files behind the guest's back).
    Always,
    /// Cache nothing: every access goes to the host.
    Never,
    /// Cache metadata only.
    Metadata,
}

/// Which transport carries a share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareVia {
    /// virtio-fs where the host can run virtiofsd, virtio-9p otherwise (macOS).
    #[default]
    Auto,
    /// virtio-fs, through a virtiofsd per share.
    VirtioFs,
    /// virtio-9p, served by the VMM itself.
    NineP,
}

/// A host directory shared with the guest, which mounts it by `tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// Device id, unique among the VM's devices.
    pub id: String,
    /// What the guest mounts it by: 1–36 of `A-Z a-z 0-9 . _ -`.
    pub tag: String,
    /// The host directory, absolute and existing.
    pub path: PathBuf,
    /// The guest may not write (it gets `EROFS`).
    #[serde(default)]
    pub read_only: bool,
    /// How the guest caches it.
    #[serde(default)]
    pub cache: ShareCache,
    /// Which transport.
    #[serde(default)]
    pub via: ShareVia,
    /// Allow sharing `/`, or a directory this process's user does not own: off, so a
    /// config cannot hand the guest more of the host than its author owns by mistake.
    #[serde(default)]
    pub allow_foreign: bool,
}

impl ShareConfig {
    /// A writable share of `path` under `tag`, with the defaults.
    pub fn new(id: impl Into<String>, tag: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        ShareConfig {
            id: id.into(),
            tag: tag.into(),
            path: path.into(),
            read_only: false,
            cache: ShareCache::Auto,
            via: ShareVia::Auto,
            allow_foreign: false,
        }
    }

    /// Checks the share; `field` is its place in the config (`shares[0]`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a malformed id or tag, a path that is relative,
    /// missing or not a directory, or `/` or a directory of another user without
    /// `allow_foreign`.
    pub fn validate(&self, field: &str) -> Result<()> {
        check_id(&format!("{field}.id"), &self.id)?;
        let tag_ok = !self.tag.is_empty()
            && self.tag.len() <= MAX_SHARE_TAG
            && self
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(Error::config(
                format!("{field}.tag"),
                format!(
                    "{:?} must be 1-{MAX_SHARE_TAG} of A-Z a-z 0-9 . _ -",
                    self.tag
                ),
            ));
        }
        let path_field = format!("{field}.path");
        check_path(&path_field, &self.path, Exists::Dir)?;
        if self.allow_foreign {
            return Ok(());
        }
        if self.path.parent().is_none() {
            return Err(Error::config(
                path_field,
                "sharing / needs allow_foreign".to_owned(),
            ));
        }
        let owner = std::fs::metadata(&self.path)
            .map_err(|e| Error::config(&path_field, format!("{}: {e}", self.path.display())))?
            .uid();
        let me = nix::unistd::geteuid().as_raw();
        if owner != me {
            return Err(Error::config(
                path_field,
                format!(
                    "{} belongs to uid {owner}, not this process's {me}: sharing it needs allow_foreign",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceSpec, DiskConfig};

    fn reason(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn a_share_is_checked_before_it_reaches_an_argv() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ShareConfig::new("rootfs", "rootfs-1.a_b", dir.path());
        ok.validate("shares[0]").unwrap();
        for tag in ["", "a,b", "a=b", "a b", &"t".repeat(37), "tag\n"] {
            let mut bad = ok.clone();
            bad.tag = tag.into();
            let e = reason(bad.validate("shares[0]").unwrap_err());
            assert!(e.contains("shares[0].tag"), "{tag:?}: {e}");
        }
        let mut file = ok.clone();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        file.path = f;
        assert!(reason(file.validate("s").unwrap_err()).contains("not a directory"));
        let mut relative = ok.clone();
        relative.path = "shared".into();
        assert!(reason(relative.validate("s").unwrap_err()).contains("relative"));
        let mut root = ok.clone();
        root.path = "/".into();
        assert!(reason(root.validate("s").unwrap_err()).contains("allow_foreign"));
        root.allow_foreign = true;
        root.validate("s").unwrap();
        // A directory of another user (made so when this test runs as root, as in CI).
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let mut foreign = ok.clone();
            foreign.path = theirs;
            let e = reason(foreign.validate("s").unwrap_err());
            assert!(e.contains("belongs to uid 65534"), "{e}");
            foreign.allow_foreign = true;
            foreign.validate("s").unwrap();
        }
    }

    #[test]
    fn a_device_spec_round_trips_through_json_tagged_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DeviceSpec::Share(ShareConfig {
            read_only: true,
            cache: ShareCache::Never,
            via: ShareVia::NineP,
            ..ShareConfig::new("s1", "data", dir.path())
        });
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["kind"], "share");
        assert_eq!(json["via"], "nine_p");
        assert_eq!(json["cache"], "never");
        let back: DeviceSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
        assert_eq!((back.id(), back.kind()), ("s1", "share"));
        let disk = DeviceSpec::Disk(DiskConfig::new("d1", "/x.img"));
        let json = serde_json::to_string(&disk).unwrap();
        assert!(json.starts_with("{\"kind\":\"disk\""), "{json}");
        assert_eq!(serde_json::from_str::<DeviceSpec>(&json).unwrap(), disk);
        let unknown = serde_json::from_str::<DeviceSpec>("{\"kind\":\"gpu\",\"id\":\"g\"}");
        assert!(unknown.is_err());
    }
}
