//! Just enough of a Cargo manifest's TOML for the xtask (which has no dependencies, to
//! build fast on a fresh machine): a key's value in a table, a table's array of strings.
//! Keys are read as `key = value` lines of the table they stand in; inline tables and
//! dotted keys are not followed.

/// The value of `key` in `[table]`, unquoted; `None` when the table or key is missing.
pub(crate) fn value(text: &str, table: &str, key: &str) -> Option<String> {
    lines_of(text, table).find_map(|line| {
        let value = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

/// The strings of the array `key` in `[table]` (which may span lines), in order.
pub(crate) fn array(text: &str, table: &str, key: &str) -> Vec<String> {
    let mut lines = lines_of(text, table);
    let Some(first) = lines.by_ref().find_map(|line| {
        let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
        rest.trim_start().strip_prefix('[')
    }) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for line in std::iter::once(first).chain(lines) {
        let (body, closed) = match line.split_once(']') {
            Some((body, _)) => (body, true),
            None => (line, false),
        };
        let body = body.split('#').next().unwrap_or_default();
        items.extend(
            body.split(',')
                .map(|item| item.trim().trim_matches('"'))
                .filter(|item| !item.is_empty())
                .map(str::to_owned),
        );
        if closed {
            break;
        }
    }
    items
}

/// The lines of `[table]`, trimmed, comments and blank lines left out.
fn lines_of<'a>(text: &'a str, table: &'a str) -> impl Iterator<Item = &'a str> {
    let header = format!("[{table}]");
    text.lines()
        .map(str::trim)
        .skip_while(move |line| *line != header)
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = r#"
[workspace]
resolver = "3"
members = [
    "crates/core",
    # a comment
    "crates/qmp", "testkit",
]
default-members = ["crates/core"]

[workspace.package]
version = "0.1.0"
rust-version = "1.89"

[profile.dev]
debug = "line-tables-only"
"#;

    const MEMBER: &str = r#"
[package]
name = "xtask"
# Not for crates.io.
publish = false

[dependencies]
name-like = "1"
"#;

    #[test]
    fn values_are_read_from_their_own_table() {
        assert_eq!(
            value(ROOT, "workspace.package", "rust-version").as_deref(),
            Some("1.89")
        );
        assert_eq!(value(ROOT, "workspace", "rust-version"), None);
        assert_eq!(value(MEMBER, "package", "name").as_deref(), Some("xtask"));
        assert_eq!(
            value(MEMBER, "package", "publish").as_deref(),
            Some("false")
        );
        assert_eq!(value(MEMBER, "dependencies", "publish"), None);
    }

    #[test]
    fn arrays_span_lines_and_skip_comments() {
        assert_eq!(
            array(ROOT, "workspace", "members"),
            ["crates/core", "crates/qmp", "testkit"]
        );
        assert_eq!(array(ROOT, "workspace", "default-members"), ["crates/core"]);
        assert!(array(ROOT, "workspace", "exclude").is_empty());
    }
}
