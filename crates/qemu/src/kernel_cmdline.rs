//! The guest kernel's command line: vmkit's own parameters (serial console, fail fast,
//! the options that boot fastest under emulation), then the caller's, each checked to
//! stay one parameter.

use vmkit_core::validate::check_cmdline_part;

use crate::options::Machine;

/// x86's `COMMAND_LINE_SIZE`: the kernel silently truncates anything longer.
pub(crate) const MAX_CMDLINE: usize = 2048;

/// Parameters vmkit always passes on x86 machines (q35, microvm): the console on the
/// first serial port, reboot (and so, with `-no-reboot`, exit) at once on panic, and
/// options that skip slow probes of hardware a VM does not have.
pub const BASE_PARAMS: &[&str] = &[
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.nokbd",
    "8250.nr_uarts=1",
    "cryptomgr.notests",
    "tsc=reliable",
];

/// The same on Arm's `virt`: the console on its PL011 (`ttyAMA0`), and none of the PC
/// hardware options (no i8042, no 8250, no TSC).
const VIRT_PARAMS: &[&str] = &["console=ttyAMA0", "panic=-1", "quiet", "cryptomgr.notests"];

/// The parameters vmkit always passes on `machine`.
fn base_params(machine: Machine) -> &'static [&'static str] {
    match machine {
        Machine::Q35 | Machine::Microvm => BASE_PARAMS,
        Machine::Virt => VIRT_PARAMS,
    }
}

/// Builds the command line for `machine` from the caller's `extra` parameters.
/// `tsc_khz` (the host TSC frequency) is passed on microvm, which otherwise may hang in
/// timer calibration under emulation.
///
/// # Errors
/// `vmkit_core::Error::InvalidConfig` naming `kernel.cmdline[i]` when a parameter would
/// split or holds control characters, or `kernel.cmdline` when the whole line exceeds
/// [`MAX_CMDLINE`] bytes.
pub(crate) fn build(
    machine: Machine,
    tsc_khz: Option<u64>,
    extra: &[String],
) -> vmkit_core::Result<String> {
    let mut parts: Vec<String> = base_params(machine)
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    if machine == Machine::Microvm
        && let Some(khz) = tsc_khz
    {
        parts.push(format!("tsc_early_khz={khz}"));
    }
    for (i, part) in extra.iter().enumerate() {
        check_cmdline_part(&format!("kernel.cmdline[{i}]"), part)?;
        parts.push(part.clone());
    }
    let line = parts.join(" ");
    if line.len() > MAX_CMDLINE {
        return Err(vmkit_core::Error::config(
            "kernel.cmdline",
            format!(
                "the kernel command line would be {} bytes; the kernel keeps only {MAX_CMDLINE}",
                line.len()
            ),
        ));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base_then_extras_in_order() {
        let line = build(
            Machine::Q35,
            Some(2_445_000),
            &["rdinit=/init".into(), "x=1".into()],
        )
        .unwrap();
        assert!(line.starts_with("console=ttyS0 panic=-1 quiet "), "{line}");
        assert!(line.ends_with(" tsc=reliable rdinit=/init x=1"), "{line}");
        assert!(
            !line.contains("tsc_early_khz"),
            "q35 needs no tsc_early_khz: {line}"
        );
    }

    #[test]
    fn virt_gets_its_own_console_and_no_pc_options() {
        let line = build(Machine::Virt, Some(2_445_000), &["rdinit=/init".into()]).unwrap();
        assert_eq!(
            line,
            "console=ttyAMA0 panic=-1 quiet cryptomgr.notests rdinit=/init"
        );
    }

    #[test]
    fn microvm_gets_the_tsc_frequency() {
        let line = build(Machine::Microvm, Some(2_445_000), &[]).unwrap();
        assert!(
            line.ends_with("tsc=reliable tsc_early_khz=2445000"),
            "{line}"
        );
    }

    #[test]
    fn a_parameter_that_would_split_is_refused_with_its_index() {
        let err = build(
            Machine::Q35,
            None,
            &["ok".into(), "init=/bin/sh -c x".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid config: kernel.cmdline[1]:"),
            "{err}"
        );
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = format!("x={}", "a".repeat(MAX_CMDLINE));
        let err = build(Machine::Q35, None, &[long]).unwrap_err().to_string();
        assert!(err.contains("the kernel keeps only 2048"), "{err}");
    }

    proptest! {
        /// Whatever the caller passes (ASCII, any printable Unicode, and the characters
        /// whose UTF-8 holds the kernel's 0xA0 space byte), an accepted line splits, byte
        /// by byte as the kernel splits it, into exactly the base parameters plus one
        /// word per extra.
        #[test]
        fn accepted_extras_stay_one_parameter_each(
            extras in proptest::collection::vec("([ -~]|\\PC|[\"\u{e0}\u{a0}\u{8a0}\u{3000}])*", 0..6)
        ) {
            if let Ok(line) = build(Machine::Q35, None, &extras) {
                let words = split_like_the_kernel(&line);
                prop_assert_eq!(words.len(), BASE_PARAMS.len() + extras.len(), "{}", line);
                prop_assert_eq!(&words[BASE_PARAMS.len()..], &extras[..]);
            }
        }
    }

    /// The kernel's `next_arg`, on bytes: its `isspace()` bytes separate, double quotes
    /// group.
    fn split_like_the_kernel(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut current = Vec::new();
        let mut quoted = false;
        let mut in_word = false;
        for &b in line.as_bytes() {
            if b == b'"' {
                quoted = !quoted;
                current.push(b);
                in_word = true;
            } else if vmkit_core::validate::is_kernel_space(b) && !quoted {
                if in_word {
                    words.push(String::from_utf8_lossy(&std::mem::take(&mut current)).into_owned());
                    in_word = false;
                }
            } else {
                current.push(b);
                in_word = true;
            }
        }
        if in_word {
            words.push(String::from_utf8_lossy(&current).into_owned());
        }
        words
    }
}
