//! Connection settings.

use std::time::Duration;

/// Settings of a [`crate::QmpClient`]. Every wait the client makes is bounded by one of
/// these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpOptions {
    /// How long [`crate::QmpClient::connect`] retries while the socket does not exist or
    /// refuses, plus the greeting and capability negotiation.
    pub connect_timeout: Duration,
    /// The default deadline of each command (override per call with
    /// [`crate::QmpClient::execute_with_timeout`]).
    pub command_timeout: Duration,
    /// The longest message accepted from QEMU; a longer one ends the connection.
    pub max_message_size: usize,
    /// Ask for the `oob` capability when QEMU offers it. Only then does QEMU queue
    /// several commands, which is what makes many concurrent callers faster.
    pub negotiate_oob: bool,
    /// How many events a slow subscriber may fall behind before it sees `Lagged`.
    pub event_capacity: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(5),
            max_message_size: 16 << 20,
            negotiate_oob: true,
            event_capacity: 1024,
        }
    }
}
