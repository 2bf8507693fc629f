//! Choosing the accelerator: `Auto` means KVM where it really works, else HVF on
//! macOS, else TCG — hardware acceleration only for a guest of the host's own
//! architecture; `VMKIT_ACCEL=tcg|kvm|hvf` overrides `Auto` for hosts where the
//! probe cannot tell (an explicit accelerator in the config always wins).

use vmkit_core::Accel;

use crate::error::Error;
use crate::host;
use crate::options::QemuOptions;

/// The environment variable that overrides `Accel::Auto`.
pub const ACCEL_ENV: &str = "VMKIT_ACCEL";

/// Resolves `requested` to a concrete accelerator for a VM with `options` (its machine
/// says the guest's architecture, its binary is the QEMU asked on macOS), reading
/// [`ACCEL_ENV`] and probing the host for `Auto`. The probe may run the QEMU binary:
/// call this from a blocking thread in async code.
///
/// # Errors
/// [`Error::Accel`] when the environment override is not an accelerator name.
pub fn resolve(requested: Accel, options: &QemuOptions) -> Result<Accel, Error> {
    let env = std::env::var(ACCEL_ENV).ok();
    resolve_with(requested, env.as_deref(), || {
        host::default_accel(options.machine, &options.binary)
    })
}

/// [`resolve`] with the override and the host probe given (for tests).
///
/// # Errors
/// As [`resolve`].
pub fn resolve_with(
    requested: Accel,
    env: Option<&str>,
    probe: impl FnOnce() -> Accel,
) -> Result<Accel, Error> {
    if requested != Accel::Auto {
        return Ok(requested);
    }
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => match value.parse::<Accel>() {
            Ok(Accel::Auto) => Ok(probe()),
            Ok(accel) => Ok(accel),
            Err(e) => Err(Error::Accel {
                accel: format!("{ACCEL_ENV}={value}"),
                reason: e.to_string(),
            }),
        },
        None => Ok(probe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_choice_wins_over_env_and_probe() {
        let accel = resolve_with(Accel::Tcg, Some("kvm"), || panic!("no probe")).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }

    #[test]
    fn auto_follows_the_env_then_the_probe() {
        assert_eq!(
            resolve_with(Accel::Auto, Some("TCG"), || Accel::Kvm).unwrap(),
            Accel::Tcg
        );
        assert_eq!(
            resolve_with(Accel::Auto, None, || Accel::Kvm).unwrap(),
            Accel::Kvm
        );
        assert_eq!(
            resolve_with(Accel::Auto, Some(""), || Accel::Tcg).unwrap(),
            Accel::Tcg
        );
        assert_eq!(
            resolve_with(Accel::Auto, Some("auto"), || Accel::Kvm).unwrap(),
            Accel::Kvm
        );
    }

    #[test]
    fn a_bad_override_names_the_variable() {
        let err = resolve_with(Accel::Auto, Some("xen"), || Accel::Tcg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "accelerator VMKIT_ACCEL=xen: unknown accelerator \"xen\"; expected one of auto, kvm, hvf, tcg"
        );
    }
}
