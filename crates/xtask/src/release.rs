//! Release readiness: every publishable crate packages (`cargo publish --dry-run`: the manifest
//! has what crates.io needs and the files are there; verified, it also builds each
//! package as crates.io would see it, its vmkit dependencies from the packages beside
//! it), the workspace builds with the Rust version its `rust-version` promises, and —
//! once a release is tagged — the public API keeps semver against it
//! (`cargo-semver-checks`).
//!
//! `cargo xtask test` runs them unverified (verifying builds
//! every crate and its dependencies again: five minutes of CI's budget here);
//! `cargo xtask release-check` runs them verified, before a release.

use std::process::Command;

use crate::manifest;
use crate::run::{cargo, output, read_text, step, workspace_root};

/// All three checks; `verify`: each package built from its tarball too.
pub(crate) fn check(verify: bool) -> Result<(), String> {
    let unpublished = unpublished()?;
    package(verify)?;
    msrv(&unpublished)?;
    semver(&unpublished)
}

/// `cargo publish --dry-run` of every publishable crate (cargo leaves out those whose
/// manifest says `publish = false`, and packages each against the others' packages).
fn package(verify: bool) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args([
        "publish",
        "--workspace",
        "--dry-run",
        "--locked",
        "--allow-dirty",
    ]);
    if !verify {
        cmd.arg("--no-verify");
    }
    step(
        if verify {
            "publish --dry-run (verified)"
        } else {
            "publish --dry-run"
        },
        &mut cmd,
    )
}

/// The root manifest's text.
fn root_manifest() -> Result<String, String> {
    read_text(&workspace_root().join("Cargo.toml"))
}

/// The workspace's `rust-version`, from its manifest.
fn rust_version() -> Result<String, String> {
    manifest::value(&root_manifest()?, "workspace.package", "rust-version")
        .ok_or_else(|| "Cargo.toml: no rust-version in [workspace.package]".to_owned())
}

/// The members whose manifests say `publish = false`, by package name: the manifests
/// are the one list of what is not for crates.io.
fn unpublished() -> Result<Vec<String>, String> {
    let root = workspace_root();
    let members = manifest::array(&root_manifest()?, "workspace", "members");
    let mut names = Vec::new();
    for member in members {
        let path = root.join(&member).join("Cargo.toml");
        let text = read_text(&path)?;
        if manifest::value(&text, "package", "publish").as_deref() == Some("false") {
            names.push(
                manifest::value(&text, "package", "name")
                    .ok_or_else(|| format!("{}: no package name", path.display()))?,
            );
        }
    }
    Ok(names)
}

/// The library crates and binaries checked with the oldest Rust the manifest promises
/// (rustup fetches that toolchain once).
fn msrv(unpublished: &[String]) -> Result<(), String> {
    let version = rust_version()?;
    let toolchain = format!("+{version}");
    let have = output(Command::new("rustup").args(["run", &version, "rustc", "--version"]));
    if have.is_none() {
        step(
            &format!("install Rust {version} (the MSRV)"),
            Command::new("rustup").args(["toolchain", "install", &version, "--profile", "minimal"]),
        )?;
    }
    step(
        &format!("build with Rust {version} (the MSRV)"),
        Command::new("cargo")
            .current_dir(workspace_root())
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env("CARGO_TARGET_DIR", crate::run::target_dir().join("msrv"))
            .args([
                &toolchain,
                "check",
                "--workspace",
                "--lib",
                "--bins",
                "--locked",
            ])
            .args(unpublished.iter().flat_map(|c| ["--exclude", c.as_str()])),
    )
}

/// `cargo semver-checks` against the newest `v*` tag, when there is one.
fn semver(unpublished: &[String]) -> Result<(), String> {
    let tags = output(Command::new("git").current_dir(workspace_root()).args([
        "tag",
        "--list",
        "v*",
        "--sort=-v:refname",
    ]))
    .unwrap_or_default();
    let Some(last) = tags.lines().next().map(str::trim).filter(|t| !t.is_empty()) else {
        println!("==> semver: no release tagged yet (v*): nothing to compare against");
        return Ok(());
    };
    crate::install::ensure_cargo_tool("cargo-semver-checks", "semver-checks")?;
    step(
        &format!("semver against {last}"),
        cargo()
            .args(["semver-checks", "--workspace", "--baseline-rev", last])
            .args(unpublished.iter().flat_map(|c| ["--exclude", c.as_str()])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspaces_manifests_name_what_is_not_published() {
        let names = unpublished().unwrap_or_else(|e| panic!("{e}"));
        for binary in ["xtask", "vmkit-benches", "containerd-shim-vmkit-v1"] {
            assert!(names.iter().any(|n| n == binary), "{binary} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.starts_with("vmkit-core")),
            "{names:?}"
        );
        let msrv = rust_version().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            msrv.split('.').all(|p| p.parse::<u32>().is_ok()),
            "rust-version {msrv:?}"
        );
    }
}
