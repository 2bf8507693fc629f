//! Whether QEMU may use Hypervisor.framework (`-accel hvf`) on this Mac, as a decision
//! table over the facts a probe gathers, so that each "no" says which check failed.

use std::fmt;

/// A CPU architecture, as far as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Apple Silicon (and any other arm64).
    Aarch64,
    /// Intel.
    X86_64,
}

impl Arch {
    /// The architecture named `name` in Rust's names (`"aarch64"`, `"x86_64"`).
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "aarch64" => Some(Arch::Aarch64),
            "x86_64" => Some(Arch::X86_64),
            _ => None,
        }
    }

    /// The architecture this code was built for.
    pub const fn native() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HvfFacts {
    /// `sysctl kern.hv_support`: 1 when the hardware and OS support the framework;
    /// `None` when the sysctl is missing (an old or odd system: counts as no).
    pub hv_support: Option<i64>,
    /// `sysctl sysctl.proc_translated`: 1 when this process runs under Rosetta;
    /// `None` when the sysctl is missing (no Rosetta on this system).
    pub translated: Option<i64>,
    /// The host's architecture.
    pub host: Arch,
    /// The guest's architecture (HVF runs only the host's own).
    pub guest: Arch,
    /// The QEMU binary lists `hvf` in `-accel help` (built with it, and signed with the
    /// `com.apple.security.hypervisor` entitlement to use it).
    pub qemu_lists_hvf: bool,
}

/// The accelerator to use, and why not HVF when not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `-accel hvf`.
    Hvf,
    /// `-accel tcg`, because of the check named.
    Tcg(Because),
}

/// Which check ruled HVF out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Because {
    /// `kern.hv_support` is missing.
    NoSysctl,
    /// `kern.hv_support` is not 1.
    NotSupported,
    /// The process runs under Rosetta (an x86_64 build on Apple Silicon).
    Rosetta,
    /// The guest is not the host's architecture.
    ForeignGuest,
    /// The QEMU binary does not list `hvf`.
    QemuWithoutHvf,
}

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Because::NoSysctl => "the kern.hv_support sysctl is missing",
            Because::NotSupported => "kern.hv_support is 0: this Mac cannot run Hypervisor.framework",
            Because::Rosetta => {
                "this process runs under Rosetta (sysctl.proc_translated is 1): use a native build"
            }
            Because::ForeignGuest => "HVF runs only guests of the host's own architecture",
            Because::QemuWithoutHvf => {
                "the QEMU binary does not list hvf in `-accel help` (not built with it, or not signed with com.apple.security.hypervisor)"
            }
        })
    }
}

/// The decision for `facts`: each check in order, the first that fails named.
pub fn decide(facts: &HvfFacts) -> Decision {
    let because = match facts {
        HvfFacts {
            hv_support: None, ..
        } => Because::NoSysctl,
        HvfFacts {
            hv_support: Some(s),
            ..
        } if *s != 1 => Because::NotSupported,
        HvfFacts {
            translated: Some(1),
            ..
        } => Because::Rosetta,
        HvfFacts { host, guest, .. } if host != guest => Because::ForeignGuest,
        HvfFacts {
            qemu_lists_hvf: false,
            ..
        } => Because::QemuWithoutHvf,
        _ => return Decision::Hvf,
    };
    Decision::Tcg(because)
}

/// Whether QEMU's `-accel help` output lists `hvf` (one accelerator per line after the
/// heading).
pub fn lists_hvf(accel_help: &str) -> bool {
    accel_help.lines().any(|line| line.trim() == "hvf")
}

/// The QEMU accelerator name for hardware acceleration of a `guest_arch` guest (Rust's
/// names, `"aarch64"`) run by the QEMU binary `qemu`, when it is usable: `Some("hvf")`,
/// else `None` (TCG). The seam vmkit-qemu calls. It runs `qemu -accel help` (once per
/// binary): call it from a blocking thread.
#[cfg(target_os = "macos")]
pub fn hardware_accel(guest_arch: &str, qemu: &std::path::Path) -> Option<&'static str> {
    match decide(&os::hvf_facts(guest_arch, qemu)) {
        Decision::Hvf => Some("hvf"),
        Decision::Tcg(_) => None,
    }
}

/// The probe's OS calls (macOS only).
#[cfg(target_os = "macos")]
mod os {
    use std::collections::HashMap;
    use std::ffi::CStr;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::{Arch, HvfFacts, lists_hvf};

    /// An integer sysctl, `None` when it does not exist.
    fn sysctl_i64(name: &CStr) -> Option<i64> {
        let mut value: i64 = 0;
        let mut len = std::mem::size_of::<i64>();
        // SAFETY: `name` is NUL-terminated; `value` and `len` are valid for writes of the
        // size `len` says, and no new value is set (null, 0).
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                (&raw mut value).cast(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        // The kernel writes an int (4 bytes) for these; the rest of `value` stays 0.
        (rc == 0).then_some(value)
    }

    /// Whether `qemu -accel help` lists hvf, asked once per binary.
    fn qemu_lists_hvf(qemu: &Path) -> bool {
        static ASKED: Mutex<Option<HashMap<PathBuf, bool>>> = Mutex::new(None);
        let mut asked = ASKED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *asked
            .get_or_insert_with(HashMap::new)
            .entry(qemu.to_owned())
            .or_insert_with(|| {
                std::process::Command::new(qemu)
                    .args(["-accel", "help"])
                    .output()
                    .map(|out| lists_hvf(&String::from_utf8_lossy(&out.stdout)))
                    .unwrap_or(false)
            })
    }

    /// The facts for a `guest_arch` guest run by `qemu` on this Mac.
    pub(super) fn hvf_facts(guest_arch: &str, qemu: &Path) -> HvfFacts {
        let host = Arch::native();
        // An architecture the decision does not know is foreign: the other one stands in.
        let guest = Arch::from_name(guest_arch).unwrap_or(match host {
            Arch::Aarch64 => Arch::X86_64,
            Arch::X86_64 => Arch::Aarch64,
        });
        HvfFacts {
            hv_support: sysctl_i64(c"kern.hv_support"),
            translated: sysctl_i64(c"sysctl.proc_translated"),
            host,
            guest,
            qemu_lists_hvf: host == guest && qemu_lists_hvf(qemu),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> HvfFacts {
        HvfFacts {
            hv_support: Some(1),
            translated: Some(0),
            host: Arch::Aarch64,
            guest: Arch::Aarch64,
            qemu_lists_hvf: true,
        }
    }

    #[test]
    fn architectures_are_read_by_rusts_names() {
        assert_eq!(Arch::from_name("aarch64"), Some(Arch::Aarch64));
        assert_eq!(Arch::from_name("x86_64"), Some(Arch::X86_64));
        assert_eq!(Arch::from_name("riscv64"), None);
    }

    #[test]
    fn each_check_rules_hvf_out_by_name() {
        assert_eq!(decide(&ok()), Decision::Hvf);
        let cases = [
            (
                HvfFacts {
                    hv_support: None,
                    ..ok()
                },
                Because::NoSysctl,
            ),
            (
                HvfFacts {
                    hv_support: Some(0),
                    ..ok()
                },
                Because::NotSupported,
            ),
            (
                HvfFacts {
                    translated: Some(1),
                    host: Arch::X86_64,
                    guest: Arch::X86_64,
                    ..ok()
                },
                Because::Rosetta,
            ),
            (
                HvfFacts {
                    guest: Arch::X86_64,
                    ..ok()
                },
                Because::ForeignGuest,
            ),
            (
                HvfFacts {
                    qemu_lists_hvf: false,
                    ..ok()
                },
                Because::QemuWithoutHvf,
            ),
        ];
        for (facts, because) in cases {
            assert_eq!(decide(&facts), Decision::Tcg(because), "{facts:?}");
        }
        // No Rosetta sysctl at all (an Intel Mac): not translated.
        let intel = HvfFacts {
            translated: None,
            host: Arch::X86_64,
            guest: Arch::X86_64,
            ..ok()
        };
        assert_eq!(decide(&intel), Decision::Hvf);
        assert!(Because::Rosetta.to_string().contains("Rosetta"));
    }

    #[test]
    fn accel_help_is_read_line_by_line() {
        let help = "Accelerators supported in QEMU binary:\ntcg\nhvf\n";
        assert!(lists_hvf(help));
        assert!(!lists_hvf(
            "Accelerators supported in QEMU binary:\ntcg\nkvm\n"
        ));
        assert!(!lists_hvf("hvfx\n"));
    }
}
