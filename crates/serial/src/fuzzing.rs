//! What the fuzz targets (`fuzz/`) drive, behind the `fuzzing` feature: the frame
//! reader as a peer's bytes reach it, with what it promises asserted — not only that it
//! does not panic.

use crate::frame::{Decoder, HEADER, MAX_PAYLOAD, TRAILER};

/// Feeds `data` (after its first byte, which picks the size of the pieces it arrives
/// in, 1 to 256 bytes) to a frame reader, as the mux does, and asserts:
/// - what the reader holds stays under one whole frame, whatever arrives;
/// - every byte fed is either skipped, part of a frame delivered, or still held;
/// - a delivered frame, encoded again, reads back as the same frame.
///
/// # Panics
/// When one of those does not hold: that is the finding.
pub fn frame_reader(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(first) + 1;
    let mut decoder = Decoder::default();
    let mut delivered = 0u64;
    for chunk in stream.chunks(piece) {
        decoder.feed(chunk);
        while let Some(frame) = decoder.next_frame() {
            let bytes = frame.encode();
            delivered += decoder.last_frame_len() as u64;
            let mut again = Decoder::default();
            again.feed(&bytes);
            let back = again.next_frame();
            // A refusal's reason is text: bytes that are not UTF-8 come back replaced.
            if !matches!(frame, crate::frame::Frame::Refuse { .. }) {
                assert_eq!(back.as_ref(), Some(&frame), "a frame's round trip");
            } else {
                assert!(back.is_some(), "a refusal's round trip");
            }
        }
        assert!(
            decoder.held() < HEADER + MAX_PAYLOAD + TRAILER,
            "the reader holds {} bytes",
            decoder.held()
        );
    }
    assert_eq!(
        decoder.skipped() + delivered + decoder.held() as u64,
        stream.len() as u64,
        "every byte fed is accounted for"
    );
}

#[cfg(test)]
mod tests {
    use super::frame_reader;
    use crate::frame::Frame;

    #[test]
    fn the_entry_point_holds_on_frames_in_garbage() {
        let mut stream = vec![7u8]; // pieces of 8 bytes
        stream.extend_from_slice(b"VMX1 junk VMX");
        for frame in [
            Frame::Hello { epoch: 3 },
            Frame::Refuse {
                channel: 5,
                reason: "no".into(),
            },
            Frame::Data {
                channel: 1,
                bytes: vec![9; 300],
            },
        ] {
            stream.extend_from_slice(&frame.encode());
            stream.extend_from_slice(b"\xff\x00VMX1");
        }
        frame_reader(&stream);
        frame_reader(&[]);
        frame_reader(&[0]);
    }
}
