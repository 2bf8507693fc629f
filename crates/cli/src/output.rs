//! Where a command's results go: text for people, or JSON for scripts (`--json`).

use serde::Serialize;

use crate::error::{Error, Result};

/// The output mode of one command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// JSON instead of text.
    pub(crate) json: bool,
}

impl Output {
    /// A line of text for people.
    pub(crate) fn line(&self, text: &str) {
        println!("{text}");
    }

    /// A remark on stderr, for people only.
    pub(crate) fn note(&self, text: &str) {
        if !self.json {
            eprintln!("vmkit: {text}");
        }
    }

    /// `value` as one JSON document on stdout.
    pub(crate) fn json(&self, value: &impl Serialize) -> Result<()> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| Error::io("write JSON", std::io::Error::other(e)))?;
        println!("{text}");
        Ok(())
    }
}
