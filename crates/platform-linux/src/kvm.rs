//! Whether KVM is really usable on this host.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// The outcome of [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmStatus {
    /// `/dev/kvm` opens and the host looks like real hardware virtualisation.
    Usable,
    /// KVM cannot be used; the reason says why (missing device, permission, a
    /// software-only KVM such as `kvm_pvm`, no `vmx`/`svm` CPU flag).
    Unusable(String),
}

impl KvmStatus {
    /// `true` for [`KvmStatus::Usable`].
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmStatus::Usable)
    }
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmStatus::Usable => f.write_str("usable"),
            KvmStatus::Unusable(reason) => write!(f, "unusable: {reason}"),
        }
    }
}

/// Probes this host: `/dev/kvm`, `/sys/module/kvm_pvm`, `/proc/cpuinfo`.
pub fn probe() -> KvmStatus {
    probe_at(
        Path::new("/dev/kvm"),
        Path::new("/sys/module"),
        Path::new("/proc/cpuinfo"),
    )
}

/// [`probe`] with the three places given (for tests).
pub fn probe_at(dev_kvm: &Path, sys_module: &Path, cpuinfo: &Path) -> KvmStatus {
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev_kvm) {
        return KvmStatus::Unusable(format!("{}: {e}", dev_kvm.display()));
    }
    if sys_module.join("kvm_pvm").exists() {
        return KvmStatus::Unusable(
            "the host's KVM is kvm_pvm (a software hypervisor for PVM guest kernels); \
             stock guests crawl and fail on it"
                .to_owned(),
        );
    }
    let text = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    let mut flag_lines = text.lines().filter(|l| l.starts_with("flags")).peekable();
    // x86 lists its CPU flags on `flags` lines; arm64 has `Features` lines and no
    // virtualisation flag at all (there, a /dev/kvm that opens is KVM).
    let x86 = flag_lines.peek().is_some();
    let has_vt = flag_lines
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if x86 && !has_vt {
        return KvmStatus::Unusable(format!(
            "{} shows neither the vmx nor the svm flag (no hardware virtualisation)",
            cpuinfo.display()
        ));
    }
    KvmStatus::Usable
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new(kvm_dev: bool, pvm: bool, flags: &str) -> Host {
            let dir = tempfile::tempdir().unwrap();
            if kvm_dev {
                std::fs::write(dir.path().join("kvm"), "").unwrap();
            }
            std::fs::create_dir(dir.path().join("module")).unwrap();
            if pvm {
                std::fs::create_dir(dir.path().join("module/kvm_pvm")).unwrap();
            }
            std::fs::write(
                dir.path().join("cpuinfo"),
                format!("processor\t: 0\nflags\t\t: {flags}\n"),
            )
            .unwrap();
            Host { dir }
        }

        fn probe(&self) -> KvmStatus {
            let p = self.dir.path();
            probe_at(&p.join("kvm"), &p.join("module"), &p.join("cpuinfo"))
        }
    }

    #[test]
    fn real_hardware_virtualisation_is_usable() {
        assert_eq!(
            Host::new(true, false, "fpu vme vmx sse").probe(),
            KvmStatus::Usable
        );
        assert_eq!(Host::new(true, false, "fpu svm").probe(), KvmStatus::Usable);
    }

    #[test]
    fn missing_device_is_unusable_with_the_os_error() {
        let status = Host::new(false, false, "vmx").probe();
        assert!(
            matches!(&status, KvmStatus::Unusable(r) if r.ends_with("kvm: No such file or directory (os error 2)")),
            "{status}"
        );
    }

    #[test]
    fn an_arm64_host_has_no_vt_flag_to_look_for() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let cpuinfo = dir.path().join("cpuinfo");
        std::fs::write(
            &cpuinfo,
            "processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes crc32\n",
        )
        .unwrap();
        assert_eq!(
            probe_at(&dev, &dir.path().join("module"), &cpuinfo),
            KvmStatus::Usable
        );
    }

    #[test]
    fn kvm_pvm_is_a_trap_even_when_the_device_opens() {
        let status = Host::new(true, true, "vmx").probe();
        assert!(
            matches!(&status, KvmStatus::Unusable(r) if r.contains("kvm_pvm")),
            "{status}"
        );
    }

    #[test]
    fn no_vt_flag_is_unusable() {
        let status = Host::new(true, false, "fpu vme sse vmxnope").probe();
        assert!(
            matches!(&status, KvmStatus::Unusable(r) if r.contains("neither the vmx nor the svm")),
            "{status}"
        );
    }
}
