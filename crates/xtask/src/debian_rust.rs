//! Debian's own Rust compiler and its standard library source, for building `std`
//! for targets rustup cannot fetch here (these machines reach crates.io and Debian
//! only): the macOS type check (`x86_64-`/`aarch64-apple-darwin`) and the arm64 guest
//! agent (`aarch64-unknown-linux-gnu`).
//!
//! `rustc-web` and `rust-web-src` (bookworm-security) and the libraries they need are
//! fetched with `apt-get download` and unpacked under `target/debian-rust/`, nothing
//! installed system-wide. Builds pass `-Zbuild-std`, which `RUSTC_BOOTSTRAP=1` allows
//! on the stable cargo that runs them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run::{cargo, output, step, workspace_root};

/// Debian's compiler package; its version picks the others'.
const RUSTC: &str = "rustc-web";
/// Packages downloaded at the compiler's version (clippy's driver too: it must be the
/// compiler's own); their `libstd-rust-web-*` and `libllvm*` dependencies are fetched
/// too.
const PACKAGES: [&str; 4] = [
    RUSTC,
    "libstd-rust-web-dev",
    "rust-web-src",
    "rust-web-clippy",
];

/// The unpacked compiler.
pub(crate) struct Toolchain {
    root: PathBuf,
}

impl Toolchain {
    /// Debian's compiler at its candidate version, fetched and unpacked once.
    pub(crate) fn ensure() -> Result<Toolchain, String> {
        unpacked().map(|root| Toolchain { root })
    }

    /// `cargo <subcommand> --locked -Zbuild-std=std,panic_abort --target <target>`
    /// with this compiler, into `target/debian-rust/target`.
    pub(crate) fn cargo(&self, subcommand: &str, target: &str) -> Command {
        let mut cmd = cargo();
        cmd.env("RUSTC", self.root.join("usr/bin/rustc"))
            .env(
                "LD_LIBRARY_PATH",
                self.root.join("usr/lib/x86_64-linux-gnu"),
            )
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", target_dir())
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS")
            .args([subcommand, "--locked", "-Zbuild-std=std,panic_abort"])
            .args(["--target", target]);
        cmd
    }
}

impl Toolchain {
    /// `cargo check` for `target` through this compiler's clippy, its warnings (and the
    /// workspace's lint levels) denied as `cargo clippy -- -D warnings` does.
    pub(crate) fn clippy(&self, target: &str) -> Command {
        let mut cmd = self.cargo("check", target);
        cmd.env(
            "RUSTC_WORKSPACE_WRAPPER",
            self.root.join("usr/bin/clippy-driver"),
        )
        // cargo-clippy's own way of handing clippy-driver its arguments.
        .env(
            "CLIPPY_ARGS",
            "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
        );
        cmd
    }
}

/// Where [`Toolchain::cargo`] builds.
pub(crate) fn target_dir() -> PathBuf {
    dir().join("target")
}

/// `target/debian-rust`.
fn dir() -> PathBuf {
    workspace_root().join("target/debian-rust")
}

/// Debian's compiler and std source at the candidate version, unpacked once per
/// version; returns the unpacked root (its `usr/` is the compiler's sysroot).
fn unpacked() -> Result<PathBuf, String> {
    let version = candidate(RUSTC)?;
    let name = format!("rust-{}", version.replace([':', '~', '+'], "_"));
    let root = dir().join(&name);
    let rustc = root.join("usr/bin/rustc");
    let works = output(
        Command::new(&rustc)
            .env("LD_LIBRARY_PATH", root.join("usr/lib/x86_64-linux-gnu"))
            .arg("--version"),
    )
    .is_some();
    if works
        && root.join("usr/lib/rustlib/src/rust/library/std").is_dir()
        && root.join("usr/bin/clippy-driver").is_file()
    {
        return Ok(root);
    }
    let debs = dir().join(format!("{name}-debs"));
    for d in [&root, &debs] {
        if d.exists() {
            fs::remove_dir_all(d).map_err(|e| format!("remove {}: {e}", d.display()))?;
        }
        fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let packages = with_dependencies(&version)?;
    step(
        &format!("download Debian's Rust {version} (once per version)"),
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", "-q"])
            .args(&packages),
    )?;
    let mut names: Vec<PathBuf> = fs::read_dir(&debs)
        .map_err(|e| format!("read {}: {e}", debs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    names.sort();
    for deb in &names {
        unpack(deb, &root)?;
    }
    fs::remove_dir_all(&debs).map_err(|e| format!("remove {}: {e}", debs.display()))?;
    Ok(root)
}

fn unpack(deb: &Path, into: &Path) -> Result<(), String> {
    let name = deb
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    step(
        &format!("unpack {name}"),
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(into),
    )
}

/// `apt-get download` arguments: [`PACKAGES`] at `version`, and the shared libraries
/// they need (`libstd-rust-web-<x.y>`, `libllvm<n>`) at their candidate versions.
fn with_dependencies(version: &str) -> Result<Vec<String>, String> {
    let mut wanted: Vec<String> = PACKAGES.iter().map(|p| format!("{p}={version}")).collect();
    let mut i = 0;
    while i < wanted.len() {
        let show =
            output(Command::new("apt-cache").args(["show", "--no-all-versions", &wanted[i]]))
                .ok_or_else(|| format!("`apt-cache show {}` failed", wanted[i]))?;
        for dep in runtime_libraries(&show) {
            if !wanted
                .iter()
                .any(|w| w.split('=').next() == Some(dep.as_str()))
            {
                wanted.push(dep);
            }
        }
        i += 1;
    }
    Ok(wanted)
}

/// The `libstd-rust-web-*` and `libllvm*` names in a package's `Depends:` field.
fn runtime_libraries(show: &str) -> Vec<String> {
    show.lines()
        .filter_map(|l| l.strip_prefix("Depends:"))
        .flat_map(|deps| deps.split(','))
        .filter_map(|dep| dep.split_whitespace().next())
        .filter(|name| name.starts_with("libstd-rust-web-") || name.starts_with("libllvm"))
        .map(str::to_owned)
        .collect()
}

/// `package`'s candidate version in the apt sources (after one `apt-get update` if
/// the lists do not know it).
fn candidate(package: &str) -> Result<String, String> {
    let ask = || {
        output(Command::new("apt-cache").args(["policy", package]))
            .as_deref()
            .and_then(parse_candidate)
    };
    if let Some(v) = ask() {
        return Ok(v);
    }
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    ask().ok_or_else(|| {
        format!(
            "Debian's {package} is not in this machine's apt sources (bookworm-security has \
             it): vmkit builds std for the macOS check and the arm64 guest agent from it"
        )
    })
}

fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::{parse_candidate, runtime_libraries};

    #[test]
    fn the_candidate_is_read_and_none_is_none() {
        let policy = "rustc-web:\n  Installed: (none)\n  Candidate: 1.96.0+dfsg1-1~deb12u2\n  \
                      Version table:\n";
        assert_eq!(
            parse_candidate(policy).as_deref(),
            Some("1.96.0+dfsg1-1~deb12u2")
        );
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn only_the_compilers_own_libraries_are_followed() {
        let show = "Package: libstd-rust-web-dev\nDepends: libstd-rust-web-1.96 (= 1.96.0), \
                    libc6 (>= 2.34)\nPre-Depends: libllvm99\n";
        assert_eq!(runtime_libraries(show), ["libstd-rust-web-1.96"]);
        let show = "Depends: libc6 (>= 2.34), libgcc-s1 (>= 4.2), libllvm22, libstdc++6 (>= 11)";
        assert_eq!(runtime_libraries(show), ["libllvm22"]);
    }
}
