//! apt with a state of its own under `target/`: its own package lists, download cache
//! and (optionally) sources and architecture, so fetching a foreign architecture's
//! packages or a newer Debian's never touches the system's apt configuration. Adding
//! trixie or sid to the system's sources is what upgrades a host's libc halfway.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run::{step, succeeds, target_dir};

/// sid's sources line: signed by keys bookworm's keyring holds.
const SID: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                   http://deb.debian.org/debian sid main";

/// An apt state dir under `target/`.
pub(crate) struct AptRoot {
    dir: PathBuf,
    /// `APT::Architecture`, when not the host's.
    arch: Option<&'static str>,
    /// A `sources.list` line of its own, when not the system's sources.
    source: Option<&'static str>,
}

impl AptRoot {
    /// The system's sources for another architecture, in `target/vmkit-apt-<arch>/`.
    pub(crate) fn foreign(arch: &'static str) -> AptRoot {
        AptRoot {
            dir: target_dir().join(format!("vmkit-apt-{arch}")),
            arch: Some(arch),
            source: None,
        }
    }

    /// Debian sid (unstable) alone, for the host's architecture (`foreign: None`) or
    /// another, in `target/vmkit-apt-sid[-<arch>]/`: newer packages than bookworm has
    /// (containerd 2.x, a crun that reads the OCI spec containerd 2.x writes).
    pub(crate) fn sid(foreign: Option<&'static str>) -> AptRoot {
        let name = foreign.map_or_else(|| "sid".to_owned(), |a| format!("sid-{a}"));
        AptRoot {
            dir: target_dir().join(format!("vmkit-apt-{name}")),
            arch: foreign,
            source: Some(SID),
        }
    }

    /// `apt-get` or `apt-cache` (`tool`) on this state.
    pub(crate) fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        let mut set = |key: &str, value: String| {
            cmd.arg("-o").arg(format!("{key}={value}"));
        };
        if let Some(arch) = self.arch {
            set("APT::Architecture", arch.to_owned());
            set("APT::Architectures::", arch.to_owned());
        }
        if self.source.is_some() {
            set("Dir::Etc::SourceList", self.path("sources.list"));
            set("Dir::Etc::SourceParts", self.path("sources.list.d"));
        }
        set("Dir::State::Lists", self.path("lists"));
        set("Dir::Cache", self.path("cache"));
        set("Dir::State::status", self.path("status"));
        cmd
    }

    /// Creates the state dir and runs `apt-get update` into it.
    pub(crate) fn update(&self, what: &str) -> Result<(), String> {
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            let dir = self.dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        let status = self.dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "").map_err(|e| format!("write {}: {e}", status.display()))?;
        }
        if let Some(source) = self.source {
            let list = self.dir.join("sources.list");
            std::fs::write(&list, format!("{source}\n"))
                .map_err(|e| format!("write {}: {e}", list.display()))?;
        }
        step(
            &format!("apt-get update ({what} lists)"),
            self.command("apt-get").args(["update", "-q"]),
        )
    }

    /// `apt-get download`s `packages` into `debs`: after an `apt-get update` when the
    /// lists are missing, or when the download failed with lists gone stale.
    pub(crate) fn download(
        &self,
        what: &str,
        debs: &Path,
        packages: &[&str],
    ) -> Result<(), String> {
        let download = || {
            let mut cmd = self.command("apt-get");
            cmd.current_dir(debs)
                .args(["download", "-q"])
                .args(packages);
            cmd
        };
        if self.has_lists() && succeeds(&mut download()) {
            return Ok(());
        }
        self.update(what)?;
        step(&format!("download {}", packages.join(" ")), &mut download())
    }

    /// Whether the lists were fetched once already.
    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists"))
            .is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().is_file())))
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// Unpacks the `.deb` of `package` in `debs` into `into` (`dpkg-deb -x`).
pub(crate) fn unpack(debs: &Path, package: &str, into: &Path) -> Result<(), String> {
    let prefix = format!("{package}_");
    let deb = std::fs::read_dir(debs)
        .map_err(|e| format!("read {}: {e}", debs.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| format!("{package}: no .deb in {}", debs.display()))?;
    std::fs::create_dir_all(into).map_err(|e| format!("create {}: {e}", into.display()))?;
    step(
        &format!("unpack {package}"),
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into),
    )
}
