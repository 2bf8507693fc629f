//! Escaping for QEMU's `key=value,…` option syntax.

use std::path::Path;

/// Escapes a value for QEMU's `key=value,…` option syntax: a comma is doubled, so it
/// cannot end the value and start another option.
pub(crate) fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// [`escape_opt`] for a path.
pub(crate) fn escape_path(path: &Path) -> String {
    escape_opt(&path.to_string_lossy())
}
