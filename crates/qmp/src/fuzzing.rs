//! What the fuzz targets (`fuzz/`) drive, behind the `fuzzing` feature: QMP's reader as
//! a QEMU's bytes reach it, with what it promises asserted.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::event::Event;
use crate::wire::{Message, ReadError, parse, read_line};

/// The line limit the target reads with (the client's default is much larger; a small
/// one lets short inputs reach the limit).
const LIMIT: usize = 4096;

/// Reads `data` (after its first byte, which picks the reader's buffer size, 1 to 256
/// bytes) line by line as the client's reader does, sorts each line as a message and
/// builds each event, asserting:
/// - no line longer than the limit is ever returned, and one that would be is refused
///   as too large;
/// - an event keeps the name its line gave it.
///
/// # Panics
/// When one of those does not hold: that is the finding.
pub fn qmp_lines(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let mut reader = tokio::io::BufReader::with_capacity(usize::from(first) + 1, stream);
    let mut line = Vec::new();
    loop {
        match in_memory(read_line(&mut reader, &mut line, LIMIT)) {
            Ok(()) => assert!(line.len() <= LIMIT, "a line of {} bytes", line.len()),
            Err(ReadError::TooLarge { .. } | ReadError::Eof | ReadError::EofMidMessage { .. }) => {
                return;
            }
            Err(ReadError::Io(e)) => panic!("reading memory failed: {e}"),
        }
        if let Ok(Message::Event {
            name,
            data,
            timestamp,
        }) = parse(&line)
        {
            let event = Event::from_parts(&name, data, timestamp, &line);
            assert_eq!(event.name(), name, "an event's name");
        }
    }
}

/// Runs a future that reads from memory, which never waits.
fn in_memory<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

#[cfg(test)]
mod tests {
    use super::qmp_lines;

    #[test]
    fn the_entry_point_holds_on_real_and_broken_lines() {
        let mut input = vec![5u8];
        input.extend_from_slice(
            br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": ""}, "capabilities": []}}
{"return": {}, "id": 1}
{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}
{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "d1", "path": "/x"}}
{"event": "NOT_A_REAL_ONE", "data": [1, 2]}
{"error": {"class": "GenericError", "desc": "no"}, "id": "x"}
not json
"#,
        );
        qmp_lines(&input);
        let mut long = vec![0u8];
        long.extend(std::iter::repeat_n(b'{', 10_000));
        qmp_lines(&long);
    }
}
