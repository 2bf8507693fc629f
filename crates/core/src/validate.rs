//! The validation rules every config value passes, each with an error naming the field.
//!
//! Backends use the same rules for values that arrive after creation (hot-plugged
//! devices), so a value is judged the same way wherever it enters.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Longest Unix socket path, in bytes: `sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest id (of a VM or a device) accepted.
pub const MAX_ID_LEN: usize = 64;
/// Longest path accepted (Linux `PATH_MAX` less the NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// What a path must point at when it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exists {
    /// Nothing is required (it will be created).
    Any,
    /// An existing regular file (or block device, for disks).
    File,
    /// An existing directory (a share's).
    Dir,
}

/// An id that becomes a QEMU object or device id, a file name and a log tag: non-empty,
/// at most [`MAX_ID_LEN`] bytes, a letter first, then letters, digits, `-`, `.`, `_`
/// (QEMU's own rule for ids; anything else QEMU would refuse later, less clearly).
pub fn check_id(field: &str, id: &str) -> Result<()> {
    let ok_rest = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if id.len() > MAX_ID_LEN {
        return Err(Error::config(
            field,
            format!("{id:?} is {} bytes; at most {MAX_ID_LEN}", id.len()),
        ));
    }
    if !first_ok || !chars.all(ok_rest) {
        return Err(Error::config(
            field,
            format!(
                "{id:?} must start with a letter and hold only letters, digits, '-', '.' and '_'"
            ),
        ));
    }
    Ok(())
}

/// A path that will be handed to the VMM: absolute, at most [`MAX_PATH_LEN`] bytes, and
/// free of NUL, newline and carriage return (which would break an option or a log line).
/// Commas are allowed: the backend escapes them. With [`Exists::File`] the path must
/// name an existing non-directory, with [`Exists::Dir`] an existing directory.
pub fn check_path(field: &str, path: &Path, exists: Exists) -> Result<()> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(Error::config(field, "must not be empty"));
    }
    if let Some(bad) = bytes.iter().find(|b| matches!(b, b'\0' | b'\n' | b'\r')) {
        return Err(Error::config(
            field,
            format!(
                "{} contains the control byte {bad:#04x}",
                path.display().to_string().escape_debug()
            ),
        ));
    }
    if !path.is_absolute() {
        return Err(Error::config(
            field,
            format!(
                "{} is relative; an absolute path is required",
                path.display()
            ),
        ));
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(Error::config(
            field,
            format!("path is {} bytes; at most {MAX_PATH_LEN}", bytes.len()),
        ));
    }
    if exists == Exists::Dir {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::config(
                    field,
                    format!("{} is not a directory", path.display()),
                ));
            }
            Err(e) => {
                return Err(Error::config(field, format!("{}: {e}", path.display())));
            }
        }
    }
    if exists == Exists::File {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::config(
                    field,
                    format!("{} is a directory, not a file", path.display()),
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Error::config(field, format!("{}: {e}", path.display())));
            }
        }
    }
    Ok(())
}

/// A Unix socket path: [`check_path`] plus the kernel's limit of [`MAX_SOCKET_PATH`] bytes.
/// The error names the path and its length.
pub fn check_socket_path(field: &str, path: &Path) -> Result<()> {
    check_path(field, path, Exists::Any)?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::config(
            field,
            format!(
                "socket path {} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Text that lands inside a QEMU option value (a disk serial, a backend option): no
/// control characters. Commas are allowed: the backend doubles them.
pub fn check_option_text(field: &str, text: &str) -> Result<()> {
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(Error::config(
            field,
            format!("{:?} contains the control character {c:?}", text),
        ));
    }
    Ok(())
}

/// The bytes the Linux kernel's `isspace()` accepts (its `lib/ctype.c` table, which is
/// Latin-1): tab, newline, vertical tab, form feed, carriage return, space and the
/// no-break space 0xA0. The command-line parser (`next_arg`) splits on each of them,
/// *byte by byte*: 0xA0 occurs inside the UTF-8 encoding of many characters (`à` is
/// C3 A0), so a check on Unicode characters alone misses it.
pub const KERNEL_SPACE_BYTES: [u8; 7] = [b'\t', b'\n', 0x0b, 0x0c, b'\r', b' ', 0xa0];

/// Whether the guest kernel's parser treats `byte` as a separator.
pub fn is_kernel_space(byte: u8) -> bool {
    KERNEL_SPACE_BYTES.contains(&byte)
}

/// One kernel command-line parameter: non-empty, no control characters, no byte the
/// kernel takes for a space ([`KERNEL_SPACE_BYTES`]) outside a double-quoted value (the
/// kernel would split it into several parameters), balanced quotes, and not the bare
/// `--` (which would hand every later parameter to init). The check runs on the bytes,
/// as the kernel parses them.
pub fn check_cmdline_part(field: &str, part: &str) -> Result<()> {
    if part.is_empty() {
        return Err(Error::config(field, "empty kernel parameter"));
    }
    if let Some(c) = part.chars().find(|c| c.is_control()) {
        return Err(Error::config(
            field,
            format!("{part:?} contains the control character {c:?}"),
        ));
    }
    if part == "--" {
        return Err(Error::config(
            field,
            "\"--\" would pass every later parameter to init, not the kernel",
        ));
    }
    let mut quoted = false;
    // A UTF-8 continuation byte is never '"', so toggling on the byte is the kernel's
    // own reading of the quotes.
    for (at, c) in part.char_indices() {
        if c == '"' {
            quoted = !quoted;
            continue;
        }
        if quoted {
            continue;
        }
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        if bytes.len() == 1 && (is_kernel_space(bytes[0]) || c.is_whitespace()) {
            return Err(Error::config(
                field,
                format!(
                    "{part:?} contains unquoted whitespace and would split into several kernel parameters"
                ),
            ));
        }
        if let Some(&byte) = bytes.iter().find(|b| is_kernel_space(**b)) {
            return Err(Error::config(
                field,
                format!(
                    "{part:?} contains {c:?} (byte offset {at}), whose UTF-8 encoding holds the \
                     byte {byte:#04X} that the guest kernel takes for a space: it would split \
                     into several kernel parameters"
                ),
            ));
        }
        if c.is_whitespace() {
            return Err(Error::config(
                field,
                format!(
                    "{part:?} contains the Unicode space {c:?} (byte offset {at}) outside quotes"
                ),
            ));
        }
    }
    if quoted {
        return Err(Error::config(
            field,
            format!("{part:?} has an unbalanced '\"'"),
        ));
    }
    Ok(())
}

/// A Linux network interface name (a TAP device): 1–15 bytes, not `.` or `..`, no `/`,
/// `:`, whitespace or control characters (the kernel's `dev_valid_name`).
pub fn check_ifname(field: &str, name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(Error::config(
            field,
            format!(
                "{name:?} is not a valid interface name (1-15 bytes, no '/', ':' or whitespace)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn reason(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidConfig { field, reason }) => format!("{field}: {reason}"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn ids_follow_qemus_rule() {
        for ok in ["a", "vm-1", "disk_0.data", "A9"] {
            check_id("id", ok).unwrap();
        }
        assert_eq!(
            reason(check_id("disks[0].id", "0disk")),
            "disks[0].id: \"0disk\" must start with a letter and hold only letters, digits, '-', '.' and '_'"
        );
        for bad in ["", "a,b", "a b", "a\nb", "a/b", "é"] {
            assert!(check_id("id", bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            reason(check_id("id", &"a".repeat(65))),
            format!("id: {:?} is 65 bytes; at most 64", "a".repeat(65))
        );
    }

    #[test]
    fn paths_must_be_absolute_and_free_of_control_bytes() {
        assert_eq!(
            reason(check_path("kernel.path", Path::new("vmlinuz"), Exists::Any)),
            "kernel.path: vmlinuz is relative; an absolute path is required"
        );
        assert_eq!(
            reason(check_path("log_dir", Path::new("/tmp/a\nb"), Exists::Any)),
            "log_dir: /tmp/a\\nb contains the control byte 0x0a"
        );
        assert!(check_path("p", Path::new("/tmp/with\0nul"), Exists::Any).is_err());
        assert!(check_path("p", Path::new(""), Exists::Any).is_err());
        check_path("p", Path::new("/tmp/a,b=c"), Exists::Any).unwrap();
    }

    #[test]
    fn file_paths_must_exist_and_not_be_directories() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let msg = reason(check_path("disks[0].path", &missing, Exists::File));
        assert!(
            msg.starts_with(&format!(
                "disks[0].path: {}: No such file",
                missing.display()
            )),
            "{msg}"
        );
        assert_eq!(
            reason(check_path("kernel.path", dir.path(), Exists::File)),
            format!(
                "kernel.path: {} is a directory, not a file",
                dir.path().display()
            )
        );
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        check_path("kernel.path", &file, Exists::File).unwrap();
    }

    #[test]
    fn socket_paths_over_107_bytes_are_refused_with_their_length() {
        let ok = PathBuf::from(format!("/{}", "s".repeat(106)));
        check_socket_path("sock", &ok).unwrap();
        let long = PathBuf::from(format!("/{}", "s".repeat(107)));
        assert_eq!(
            reason(check_socket_path("sock", &long)),
            format!(
                "sock: socket path {} is 108 bytes; a Unix socket path holds at most 107",
                long.display()
            )
        );
    }

    #[test]
    fn cmdline_parts_cannot_split() {
        for ok in [
            "quiet",
            "console=ttyS0",
            "init=/init",
            "foo=\"a b\"",
            "\"x y\"",
        ] {
            check_cmdline_part("p", ok).unwrap();
        }
        assert_eq!(
            reason(check_cmdline_part("kernel.cmdline[1]", "a b")),
            "kernel.cmdline[1]: \"a b\" contains unquoted whitespace and would split into several kernel parameters"
        );
        assert_eq!(
            reason(check_cmdline_part("c", "x=\"open")),
            "c: \"x=\\\"open\" has an unbalanced '\"'"
        );
        assert_eq!(
            reason(check_cmdline_part("c", "--")),
            "c: \"--\" would pass every later parameter to init, not the kernel"
        );
        assert!(check_cmdline_part("c", "").is_err());
        assert!(check_cmdline_part("c", "a\nb").is_err());
        assert!(check_cmdline_part("c", "a\tb").is_err());
    }

    #[test]
    fn a_character_holding_the_kernels_space_byte_is_refused() {
        // 'à' is C3 A0: the kernel splits on the 0xA0 and would see `rdinit=/bin/false`.
        assert_eq!(
            reason(check_cmdline_part(
                "kernel.cmdline[0]",
                "app.arg=\u{e0}rdinit=/bin/false"
            )),
            "kernel.cmdline[0]: \"app.arg=\u{e0}rdinit=/bin/false\" contains '\u{e0}' (byte offset 8), \
             whose UTF-8 encoding holds the byte 0xA0 that the guest kernel takes for a space: \
             it would split into several kernel parameters"
        );
        // Quoted, the kernel keeps it in one parameter.
        check_cmdline_part("c", "app.arg=\"\u{e0}x\"").unwrap();
        // Other non-ASCII text holds no separator byte.
        check_cmdline_part("c", "app.name=caf\u{e9}-\u{65e5}\u{672c}").unwrap();
    }

    /// Every character, exhaustively: one whose UTF-8 encoding holds a byte the
    /// kernel's `isspace()` accepts is refused when unquoted, whichever byte it is and
    /// wherever it sits in the encoding.
    #[test]
    fn no_character_smuggles_a_kernel_space_byte() {
        let mut refused = 0u32;
        for c in (0..=0x10_FFFFu32).filter_map(char::from_u32) {
            let mut utf8 = [0u8; 4];
            let holds_space = c.encode_utf8(&mut utf8).bytes().any(is_kernel_space);
            if !holds_space {
                continue;
            }
            let part = format!("a={c}b");
            assert!(
                check_cmdline_part("c", &part).is_err(),
                "{c:?} ({:02X?}) accepted",
                c.to_string().as_bytes()
            );
            refused += 1;
        }
        // The six ASCII separators and every character with an 0xA0 byte in its UTF-8
        // encoding (U+00A0 among them), counted independently of this code.
        assert_eq!(refused, 50_329);
    }

    #[test]
    fn option_text_refuses_control_characters_only() {
        check_option_text("serial", "ser,ial=1").unwrap();
        assert_eq!(
            reason(check_option_text("serial", "a\nb")),
            "serial: \"a\\nb\" contains the control character '\\n'"
        );
    }

    #[test]
    fn interface_names_follow_the_kernels_rule() {
        check_ifname("tap", "tap0").unwrap();
        check_ifname("tap", &"t".repeat(15)).unwrap();
        for bad in ["", ".", "..", "a/b", "a:b", "a b", &"t".repeat(16)] {
            assert!(check_ifname("tap", bad).is_err(), "{bad:?} accepted");
        }
    }
}
