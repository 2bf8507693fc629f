//! Connection settings.

use std::time::Duration;

/// Whether commands carry an `"id"`.
///
/// QEMU answers in-band commands one at a time, in the order it received them (only
/// out-of-band commands may overtake, and only they need ids), so replies can be
/// routed oldest-first without ids. Ids cost bytes, and QEMU reads QMP one byte per
/// system call: on our machines `,"id":1234` adds about 30 µs to every command and caps
/// pipelined throughput near 1.2x a sequential client, against about 1.7x without.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CommandIds {
    /// Send no ids; route replies in order. The fastest; still many commands in flight.
    #[default]
    WhenNeeded,
    /// Send a short numeric id with every command and route each reply by its id, in
    /// whatever order replies come (a reply whose id matches no command in flight ends
    /// the connection).
    Always,
}

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
    /// Whether commands carry ids.
    pub command_ids: CommandIds,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(5),
            max_message_size: 16 << 20,
            negotiate_oob: true,
            event_capacity: 1024,
            command_ids: CommandIds::default(),
        }
    }
}
