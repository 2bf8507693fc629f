//! Log records across the boundary. A plugin library has its own copy of `tracing`,
//! whose dispatcher the host never sees: the plugin installs [`Forward`], which hands
//! each record (INFO and above) to the host's log callback, and the host re-emits it
//! in its own `tracing` ([`emit`]) with the plugin's target as a field.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Where a plugin's records go: a level number, the target, the message.
pub(crate) type Sink = Box<dyn Fn(u32, &str, &str) + Send + Sync>;

/// The host's log sink, once `init` gave one.
static SINK: std::sync::OnceLock<Sink> = std::sync::OnceLock::new();

/// Makes `sink` the plugin's log destination (the first call wins) and [`Forward`] its
/// `tracing` subscriber.
pub(crate) fn install(sink: Sink) {
    if SINK.set(sink).is_ok() {
        let _ = tracing::subscriber::set_global_default(Forward);
    }
}

/// The plugin's subscriber: every record at INFO or above goes to the host.
pub(crate) struct Forward;

/// A record's fields as text: the message, then `key=value` pairs.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

/// The ABI's number for a level (1 error … 5 trace).
pub(crate) fn level_number(level: Level) -> u32 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

impl Subscriber for Forward {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::INFO
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let Some(sink) = SINK.get() else {
            return;
        };
        let mut text = Text::default();
        event.record(&mut text);
        sink(
            level_number(*event.metadata().level()),
            event.metadata().target(),
            &text.0,
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Re-emits a plugin's record in the host's `tracing`.
pub(crate) fn emit(level: u32, target: &str, message: &str) {
    match level {
        1 => tracing::error!(target: "vmkit_plugin", plugin_target = target, "{message}"),
        2 => tracing::warn!(target: "vmkit_plugin", plugin_target = target, "{message}"),
        3 => tracing::info!(target: "vmkit_plugin", plugin_target = target, "{message}"),
        4 => tracing::debug!(target: "vmkit_plugin", plugin_target = target, "{message}"),
        _ => tracing::trace!(target: "vmkit_plugin", plugin_target = target, "{message}"),
    }
}
