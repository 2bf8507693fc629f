//! `vmkit check`: what this host can do for vmkit's QEMU backend — the accelerator,
//! QEMU and its version, each guest-channel kind, vhost-user, virtio-fs — and, for
//! what it cannot, why and what would fix it.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::output::Output;

/// How long a `--version` may take.
const VERSION: Duration = Duration::from_secs(10);

/// One finding.
#[derive(Debug, Serialize)]
struct Finding {
    /// What was looked at.
    check: &'static str,
    /// Whether vmkit can use it.
    ok: bool,
    /// What was found, or why not.
    detail: String,
}

/// Probes the host and prints what it found.
pub(crate) async fn run(out: &Output) -> Result<()> {
    let findings = probe().await?;
    if out.json {
        return out.json(&findings);
    }
    for f in &findings {
        out.line(&format!(
            "{:<14} {:<4} {}",
            f.check,
            if f.ok { "yes" } else { "no" },
            f.detail
        ));
    }
    Ok(())
}

/// Everything `check` looks at.
async fn probe() -> Result<Vec<Finding>> {
    let options = vmkit_qemu::QemuOptions::from_map(&Default::default())
        .map_err(|e| Error::BadArgument(format!("the QEMU backend's defaults: {e}")))?;
    let mut findings = Vec::new();
    let qemu = version(&options.binary).await;
    findings.push(Finding {
        check: "qemu",
        ok: qemu.is_ok(),
        detail: qemu.unwrap_or_else(|why| {
            format!("{why}; install QEMU (Debian: apt-get install qemu-system-x86)")
        }),
    });
    let binary = options.binary.clone();
    let arch = std::env::consts::ARCH;
    let hardware =
        tokio::task::spawn_blocking(move || vmkit_platform::accel::hardware_accel(arch, &binary))
            .await
            .ok()
            .flatten();
    findings.push(Finding {
        check: "accelerator",
        ok: true,
        detail: match hardware {
            Some(accel) => format!("{accel} (hardware), for {arch} guests"),
            None => format!(
                "tcg only: no usable hardware accelerator for {arch} guests (KVM missing, \
                 not permitted, or software-only); {} overrides the choice",
                vmkit_qemu::accel::ACCEL_ENV
            ),
        },
    });
    let kernel_vsock = vmkit_platform::vhost_vsock::usable();
    findings.push(Finding {
        check: "vsock",
        ok: kernel_vsock,
        detail: if kernel_vsock {
            "kernel vsock (/dev/vhost-vsock) usable".into()
        } else {
            "no kernel vsock: /dev/vhost-vsock is missing or not permitted (modprobe vhost_vsock)"
                .into()
        },
    });
    let vhost_user = vmkit_platform::vhost_user::supported();
    let daemon = version(&options.vhost_vsock_binary).await;
    findings.push(Finding {
        check: "hybrid-vsock",
        ok: vhost_user && daemon.is_ok(),
        detail: match (vhost_user, daemon) {
            (false, _) => "this host's QEMU has no vhost-user devices".into(),
            (true, Ok(v)) => format!("vhost-user with {v}"),
            (true, Err(why)) => {
                format!("{why}; install it with `cargo install --locked vhost-device-vsock`")
            }
        },
    });
    findings.push(Finding {
        check: "virtio-serial",
        ok: true,
        detail: "always available: no daemon, no vsock".into(),
    });
    let virtiofsd = version(&options.virtiofsd_binary).await;
    findings.push(Finding {
        check: "virtio-fs",
        ok: virtiofsd.is_ok(),
        detail: virtiofsd.unwrap_or_else(|why| {
            format!("{why}; shares go over virtio-9p (Debian: apt-get install virtiofsd)")
        }),
    });
    Ok(findings)
}

/// The first line `binary --version` prints, or why it could not be run.
async fn version(binary: &Path) -> std::result::Result<String, String> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION, run).await {
        Err(_) => Err(format!(
            "{} --version: no answer in {VERSION:?}",
            binary.display()
        )),
        Ok(Err(e)) => Err(format!("{}: {e}", binary.display())),
        Ok(Ok(output)) => {
            let text = String::from_utf8_lossy(&output.stdout);
            let line = text.lines().next().unwrap_or_default().trim().to_owned();
            if output.status.success() && !line.is_empty() {
                Ok(format!("{line} ({})", binary.display()))
            } else {
                Err(format!(
                    "{} --version failed ({})",
                    binary.display(),
                    output.status
                ))
            }
        }
    }
}
