//! [`StateCell`]: a VM's [`VmState`], atomic, whose only mutator is a compare-and-swap
//! checked against the transition table.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};
use crate::state::VmState;

/// An atomically updated [`VmState`].
///
/// The only ways to change it are [`StateCell::transition`] (compare-and-swap from one
/// expected state) and [`StateCell::transition_from_any`] (compare-and-swap from
/// whatever the state is now); both check [`VmState::can_transition_to`] first, so a
/// move the table forbids can never be stored.
#[derive(Debug)]
pub struct StateCell(AtomicU8);

impl StateCell {
    /// A cell holding [`VmState::New`].
    pub const fn new() -> Self {
        StateCell(AtomicU8::new(VmState::New as u8))
    }

    /// The current state.
    pub fn get(&self) -> VmState {
        // Only `VmState as u8` values are ever stored (see `transition*`), so the fallback
        // is unreachable; it maps to the terminal state rather than panicking.
        VmState::from_repr(self.0.load(Ordering::Acquire)).unwrap_or(VmState::Shutdown)
    }

    /// Moves `from` → `to` for operation `op`, if and only if the state is `from` now and
    /// the table allows the move.
    ///
    /// # Errors
    /// [`Error::InvalidState`] naming `op` and the state actually found, when the state
    /// is not `from` (another caller moved it first) or the table forbids `from` → `to`.
    pub fn transition(&self, op: &'static str, from: VmState, to: VmState) -> Result<()> {
        if !from.can_transition_to(to) {
            return Err(Error::InvalidState {
                op,
                state: self.get(),
            });
        }
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|found| Error::InvalidState {
                op,
                state: VmState::from_repr(found).unwrap_or(VmState::Shutdown),
            })
    }

    /// Moves from whatever the state is now to `to`, if the table allows it from that
    /// state; retries the compare-and-swap when another caller changed the state in
    /// between. Returns the state it moved from.
    ///
    /// # Errors
    /// [`Error::InvalidState`] when the current state may not move to `to` (for example
    /// anything → `Shutdown` once the VM is already shut down).
    pub fn transition_from_any(&self, op: &'static str, to: VmState) -> Result<VmState> {
        let mut current = self.get();
        loop {
            if !current.can_transition_to(to) {
                return Err(Error::InvalidState { op, state: current });
            }
            match self.0.compare_exchange(
                current as u8,
                to as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(current),
                Err(found) => current = VmState::from_repr(found).unwrap_or(VmState::Shutdown),
            }
        }
    }

    /// Fails with [`Error::InvalidState`] for `op` unless the state is one of `allowed`.
    /// A check, not a lock: use it for read-only operations that need a live VM.
    pub fn require(&self, op: &'static str, allowed: &[VmState]) -> Result<VmState> {
        let state = self.get();
        if allowed.contains(&state) {
            Ok(state)
        } else {
            Err(Error::InvalidState { op, state })
        }
    }
}

impl Default for StateCell {
    fn default() -> Self {
        StateCell::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;
    use std::sync::{Arc, Barrier};

    /// The allowed edges, written out by hand: the table must match this list exactly.
    const ALLOWED: &[(VmState, VmState)] = &[
        (New, Starting),
        (New, Shutdown),
        (Starting, Running),
        (Starting, Shutdown),
        (Running, Paused),
        (Running, Shutdown),
        (Paused, Running),
        (Paused, Shutdown),
    ];

    fn cell_in(state: VmState) -> StateCell {
        let cell = StateCell::new();
        cell.0.store(state as u8, Ordering::Release);
        cell
    }

    #[test]
    fn every_pair_of_the_table_is_as_designed() {
        let mut allowed = 0;
        for from in VmState::ALL {
            for to in VmState::ALL {
                let expected = ALLOWED.contains(&(from, to));
                assert_eq!(
                    from.can_transition_to(to),
                    expected,
                    "table says {from} -> {to} is {}",
                    !expected
                );
                allowed += usize::from(expected);
            }
        }
        assert_eq!(allowed, ALLOWED.len());
    }

    #[test]
    fn every_pair_through_the_cell_stores_only_allowed_moves() {
        for from in VmState::ALL {
            for to in VmState::ALL {
                let cell = cell_in(from);
                let result = cell.transition("op", from, to);
                if ALLOWED.contains(&(from, to)) {
                    assert!(result.is_ok(), "{from} -> {to} refused: {result:?}");
                    assert_eq!(cell.get(), to);
                } else {
                    match result {
                        Err(Error::InvalidState { op: "op", state }) => assert_eq!(state, from),
                        other => panic!("{from} -> {to}: expected InvalidState, got {other:?}"),
                    }
                    assert_eq!(cell.get(), from, "a refused move changed the state");
                }
            }
        }
    }

    #[test]
    fn transition_from_a_stale_expected_state_fails_and_names_the_real_state() {
        let cell = cell_in(Running);
        let err = cell.transition("start", New, Starting).unwrap_err();
        assert_eq!(
            err.to_string(),
            "start: not allowed while the VM is running"
        );
        assert_eq!(cell.get(), Running);
    }

    #[test]
    fn shutdown_from_any_live_state_and_never_twice() {
        for from in [New, Starting, Running, Paused] {
            let cell = cell_in(from);
            assert_eq!(
                cell.transition_from_any("shutdown", Shutdown).unwrap(),
                from
            );
            assert_eq!(cell.get(), Shutdown);
            let err = cell.transition_from_any("shutdown", Shutdown).unwrap_err();
            assert!(matches!(
                err,
                Error::InvalidState {
                    op: "shutdown",
                    state: Shutdown
                }
            ));
        }
    }

    #[test]
    fn require_accepts_only_listed_states() {
        let cell = cell_in(Paused);
        assert_eq!(cell.require("query", &[Running, Paused]).unwrap(), Paused);
        let err = cell.require("hotplug", &[Running]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hotplug: not allowed while the VM is paused"
        );
    }

    /// Many threads race the same transition; exactly one may win, every time.
    #[test]
    fn racing_threads_exactly_one_wins() {
        const THREADS: usize = 8;
        for round in 0..300 {
            let cell = Arc::new(StateCell::new());
            let barrier = Arc::new(Barrier::new(THREADS));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let cell = Arc::clone(&cell);
                    let barrier = Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        barrier.wait();
                        cell.transition("start", New, Starting).is_ok()
                    })
                })
                .collect();
            let wins = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|won| *won)
                .count();
            assert_eq!(wins, 1, "round {round}: {wins} threads won New -> Starting");
            assert_eq!(cell.get(), Starting);
        }
    }

    /// Shutdown racing start-up steps: whatever interleaving, shutdown wins exactly once
    /// and the cell ends in `Shutdown`.
    #[test]
    fn racing_shutdowns_against_progress_end_in_shutdown_once() {
        for _ in 0..300 {
            let cell = Arc::new(StateCell::new());
            let barrier = Arc::new(Barrier::new(4));
            let mut handles = Vec::new();
            for _ in 0..2 {
                let (cell, barrier) = (Arc::clone(&cell), Arc::clone(&barrier));
                handles.push(std::thread::spawn(move || {
                    barrier.wait();
                    usize::from(cell.transition_from_any("shutdown", Shutdown).is_ok())
                }));
            }
            let (c, b) = (Arc::clone(&cell), Arc::clone(&barrier));
            let progress = std::thread::spawn(move || {
                b.wait();
                let _ = c.transition("start", New, Starting);
                let _ = c.transition("start", Starting, Running);
            });
            barrier.wait();
            let shutdowns: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
            progress.join().unwrap();
            assert_eq!(shutdowns, 1);
            assert_eq!(cell.get(), Shutdown);
        }
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// `transition(expected, to)`.
            Cas(VmState, VmState),
            /// `transition_from_any(to)`.
            Any(VmState),
        }

        fn state() -> impl Strategy<Value = VmState> {
            prop::sample::select(VmState::ALL.to_vec())
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (state(), state()).prop_map(|(f, t)| Op::Cas(f, t)),
                state().prop_map(Op::Any),
            ]
        }

        proptest! {
            /// Random operation sequences against a model that knows only the edge list.
            #[test]
            fn cell_follows_the_model(ops in prop::collection::vec(op(), 0..64)) {
                let cell = StateCell::new();
                let mut model = New;
                for op in ops {
                    match op {
                        Op::Cas(from, to) => {
                            let ok = model == from && ALLOWED.contains(&(from, to));
                            prop_assert_eq!(cell.transition("op", from, to).is_ok(), ok);
                            if ok { model = to; }
                        }
                        Op::Any(to) => {
                            let ok = ALLOWED.contains(&(model, to));
                            let got = cell.transition_from_any("op", to);
                            prop_assert_eq!(got.is_ok(), ok);
                            if ok {
                                prop_assert_eq!(got.unwrap(), model);
                                model = to;
                            }
                        }
                    }
                    prop_assert_eq!(cell.get(), model);
                }
            }
        }
    }
}
