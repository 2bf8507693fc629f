//! The VM life-cycle state machine: [`VmState`] and its one transition table (kept by
//! [`crate::StateCell`]).
//!
//! ```text
//! New ──► Starting ──► Running ◄──► Paused
//!  │          │           │           │
//!  └──────────┴───────────┴───────────┴──► Shutdown   (terminal; any failure ends here)
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a VM is in its life. Every [`crate::Instance`] is in exactly one state at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum VmState {
    /// Created and configured; no process exists yet. Cold-plug devices may be added.
    New = 0,
    /// `start` is under way: the VMM process is being spawned and the guest awaited.
    Starting = 1,
    /// The guest is running and answered its ready signal.
    Running = 2,
    /// The vCPUs are stopped; the VMM process is alive.
    Paused = 3,
    /// Terminal: the VMM process is gone (or never started) and its resources released.
    Shutdown = 4,
}

impl VmState {
    /// Every state, in declaration order (handy for exhaustive tests).
    pub const ALL: [VmState; 5] = [
        VmState::New,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];

    /// The one transition table. `true` when a VM in `self` may move to `to`.
    ///
    /// No state may "transition" to itself: repeating an operation is either an
    /// [`crate::Error::InvalidState`] or, for `shutdown`, handled above this table by waiting
    /// for the first caller.
    pub const fn can_transition_to(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (New, Starting)
                | (Starting, Running)
                | (Running, Paused)
                | (Paused, Running)
                | (New | Starting | Running | Paused, Shutdown)
        )
    }

    /// `true` for [`VmState::Shutdown`], the state nothing leaves.
    pub const fn is_terminal(self) -> bool {
        matches!(self, VmState::Shutdown)
    }

    /// The state's lower-case name, as used in error messages and serialised config.
    pub const fn as_str(self) -> &'static str {
        match self {
            VmState::New => "new",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
        }
    }

    pub(crate) const fn from_repr(value: u8) -> Option<VmState> {
        match value {
            0 => Some(VmState::New),
            1 => Some(VmState::Starting),
            2 => Some(VmState::Running),
            3 => Some(VmState::Paused),
            4 => Some(VmState::Shutdown),
            _ => None,
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
