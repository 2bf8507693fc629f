//! QMP events as subscribers receive them: typed where the schema knows the event, raw
//! JSON where it does not — an unknown event never ends the stream.

use serde::{Deserialize, Serialize};

/// When QEMU emitted an event (host wall clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One message on the event stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// An event the `qapi-qmp` schema knows, typed.
    Qmp {
        /// The event's name (`"SHUTDOWN"`).
        name: String,
        /// The typed event.
        event: Box<qapi_qmp::Event>,
        /// When QEMU emitted it.
        timestamp: Timestamp,
    },
    /// An event the schema does not know (a newer QEMU, or a value the schema lacks),
    /// delivered as raw JSON.
    Unknown {
        /// The event's name.
        name: String,
        /// Its `data` member (`null` when absent).
        data: serde_json::Value,
        /// When QEMU emitted it.
        timestamp: Timestamp,
    },
    /// The connection ended; nothing follows. `reason` says why.
    Disconnected {
        /// Why the connection ended.
        reason: String,
    },
}

impl Event {
    /// The event's QMP name, or `"DISCONNECTED"` for [`Event::Disconnected`].
    pub fn name(&self) -> &str {
        match self {
            Event::Qmp { name, .. } | Event::Unknown { name, .. } => name,
            Event::Disconnected { .. } => "DISCONNECTED",
        }
    }

    /// When QEMU emitted it (`None` for [`Event::Disconnected`]).
    pub fn timestamp(&self) -> Option<Timestamp> {
        match self {
            Event::Qmp { timestamp, .. } | Event::Unknown { timestamp, .. } => Some(*timestamp),
            Event::Disconnected { .. } => None,
        }
    }

    /// Builds the event from its parts: typed when the schema accepts it, else raw.
    pub(crate) fn from_parts(
        name: &str,
        data: Option<&serde_json::value::RawValue>,
        timestamp: Timestamp,
        line: &[u8],
    ) -> Event {
        match serde_json::from_slice::<qapi_qmp::Event>(line) {
            Ok(event) => Event::Qmp {
                name: name.to_owned(),
                event: Box::new(event),
                timestamp,
            },
            Err(_) => Event::Unknown {
                name: name.to_owned(),
                data: data
                    .and_then(|d| serde_json::from_str(d.get()).ok())
                    .unwrap_or(serde_json::Value::Null),
                timestamp,
            },
        }
    }
}
