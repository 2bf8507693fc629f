//! The wire: frames with a magic, a checksummed header and a checksummed payload, so
//! that a reader can find the next whole frame after garbage — the rest of a frame half
//! written before the other side went away, or bytes left in the port from an earlier
//! agent.
//!
//! ```text
//! magic "VMX1" | kind u8 | 0 u8 | channel u32 | len u32 | header sum u32 | payload | payload sum u32
//! ```
//! Integers are little-endian; a sum is FNV-1a over the bytes before it (the header's
//! from the magic on, the payload's over the payload alone). A payload is at most
//! [`MAX_PAYLOAD`] bytes.
//!
//! A side that (re)starts its end writes [`sync_pad`] before its `Hello`: zeros, one
//! whole frame long. A frame the other side's reader holds half (its writer died
//! mid-frame) is then completed by zeros, fails its sum and is skipped, so the `Hello`
//! is read at once instead of after the next 16 KiB of traffic.

/// The bytes every frame starts with.
pub(crate) const MAGIC: [u8; 4] = *b"VMX1";
/// The fixed part before the payload.
pub(crate) const HEADER: usize = 4 + 1 + 1 + 4 + 4 + 4;
/// The payload's checksum after it.
pub(crate) const TRAILER: usize = 4;
/// The largest payload of one frame.
pub const MAX_PAYLOAD: usize = 16 << 10;

/// What a side writes before its `Hello`: longer than any frame's payload and trailer,
/// and with no magic in it.
pub(crate) fn sync_pad() -> Vec<u8> {
    vec![0; MAX_PAYLOAD + TRAILER]
}

/// What a frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A side (re)started its end of the link: `epoch` names this life of it. The other
    /// side answers with [`Frame::HelloAck`].
    Hello { epoch: u64 },
    /// The answer to a [`Frame::Hello`], with the answering side's epoch.
    HelloAck { epoch: u64 },
    /// Opens `channel` to the service on `port`.
    Open { channel: u32, port: u32 },
    /// The other side accepted `channel`.
    Accept { channel: u32 },
    /// The other side refused `channel`, saying why.
    Refuse { channel: u32, reason: String },
    /// Bytes on `channel`.
    Data { channel: u32, bytes: Vec<u8> },
    /// The receiver of `channel` consumed `bytes` more: the sender may send that much.
    Credit { channel: u32, bytes: u32 },
    /// The sender of `channel` will send nothing more (end of stream).
    Close { channel: u32 },
    /// `channel` is gone (dropped, or unknown to the receiver).
    Reset { channel: u32 },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::HelloAck { .. } => 2,
            Frame::Open { .. } => 3,
            Frame::Accept { .. } => 4,
            Frame::Refuse { .. } => 5,
            Frame::Data { .. } => 6,
            Frame::Credit { .. } => 7,
            Frame::Close { .. } => 8,
            Frame::Reset { .. } => 9,
        }
    }

    fn channel(&self) -> u32 {
        match self {
            Frame::Hello { .. } | Frame::HelloAck { .. } => 0,
            Frame::Open { channel, .. }
            | Frame::Accept { channel }
            | Frame::Refuse { channel, .. }
            | Frame::Data { channel, .. }
            | Frame::Credit { channel, .. }
            | Frame::Close { channel }
            | Frame::Reset { channel } => *channel,
        }
    }

    fn payload(&self) -> Vec<u8> {
        match self {
            Frame::Hello { epoch } | Frame::HelloAck { epoch } => epoch.to_le_bytes().to_vec(),
            Frame::Open { port, .. } => port.to_le_bytes().to_vec(),
            Frame::Credit { bytes, .. } => bytes.to_le_bytes().to_vec(),
            Frame::Refuse { reason, .. } => {
                let mut text = reason.as_bytes().to_vec();
                text.truncate(MAX_PAYLOAD);
                text
            }
            Frame::Data { bytes, .. } => bytes.clone(),
            Frame::Accept { .. } | Frame::Close { .. } | Frame::Reset { .. } => Vec::new(),
        }
    }

    /// The frame's bytes on the wire. A `Data` payload must be at most [`MAX_PAYLOAD`]
    /// (the mux cuts writes to that size).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let payload = self.payload();
        let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
        out.extend_from_slice(&MAGIC);
        out.push(self.kind());
        out.push(0);
        out.extend_from_slice(&self.channel().to_le_bytes());
        // At most MAX_PAYLOAD (64 KiB), so it fits.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        let header_sum = fnv1a(&out);
        out.extend_from_slice(&header_sum.to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&fnv1a(&payload).to_le_bytes());
        out
    }

    /// The frame of a checked `kind`, `channel` and `payload`; `None` for a kind or
    /// payload no sender writes.
    fn parse(kind: u8, channel: u32, payload: &[u8]) -> Option<Frame> {
        let u32_of = |p: &[u8]| Some(u32::from_le_bytes(p.try_into().ok()?));
        let u64_of = |p: &[u8]| Some(u64::from_le_bytes(p.try_into().ok()?));
        Some(match kind {
            1 => Frame::Hello {
                epoch: u64_of(payload)?,
            },
            2 => Frame::HelloAck {
                epoch: u64_of(payload)?,
            },
            3 => Frame::Open {
                channel,
                port: u32_of(payload)?,
            },
            4 => Frame::Accept { channel },
            5 => Frame::Refuse {
                channel,
                reason: String::from_utf8_lossy(payload).into_owned(),
            },
            6 => Frame::Data {
                channel,
                bytes: payload.to_vec(),
            },
            7 => Frame::Credit {
                channel,
                bytes: u32_of(payload)?,
            },
            8 => Frame::Close { channel },
            9 => Frame::Reset { channel },
            _ => return None,
        })
    }
}

/// FNV-1a, 32 bits: enough to tell a frame from stray bytes (not a defence against an
/// adversary, who can write valid frames anyway).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Reads frames out of a byte stream fed in arbitrary pieces, skipping what is not a
/// whole, intact frame.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    buf: Vec<u8>,
    /// Bytes skipped so far (garbage, cut or damaged frames).
    skipped: u64,
    /// The wire size of the last frame delivered.
    last_frame: usize,
}

impl Decoder {
    /// Adds bytes read from the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes skipped so far as not part of an intact frame.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes held: fed, neither skipped nor delivered yet.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
    pub(crate) fn held(&self) -> usize {
        self.buf.len()
    }

    /// The wire size of the last frame [`Decoder::next_frame`] delivered.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
    pub(crate) fn last_frame_len(&self) -> usize {
        self.last_frame
    }

    /// The next intact frame, or `None` until more bytes arrive. What it skips is
    /// dropped from the buffer once, at the end: a stream of fake frame starts costs
    /// time in proportion to its length, not to its length times the buffer's.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        let mut at = 0;
        let found = loop {
            // Up to the next magic (or a tail that may be its start).
            at += find_magic(&self.buf[at..]);
            let rest = &self.buf[at..];
            if rest.len() < HEADER {
                break None;
            }
            let header = &rest[..HEADER];
            let sum = u32::from_le_bytes([header[14], header[15], header[16], header[17]]);
            let len = u32::from_le_bytes([header[10], header[11], header[12], header[13]]) as usize;
            if fnv1a(&header[..14]) != sum || len > MAX_PAYLOAD || header[5] != 0 {
                // Not a real header: the magic was part of something else.
                at += 1;
                continue;
            }
            if rest.len() < HEADER + len + TRAILER {
                break None;
            }
            let kind = header[4];
            let channel = u32::from_le_bytes([header[6], header[7], header[8], header[9]]);
            let payload = &rest[HEADER..HEADER + len];
            let trailer = &rest[HEADER + len..HEADER + len + TRAILER];
            let payload_sum = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
            let frame = (fnv1a(payload) == payload_sum)
                .then(|| Frame::parse(kind, channel, payload))
                .flatten();
            match frame {
                Some(frame) => break Some((frame, HEADER + len + TRAILER)),
                None => at += 1,
            }
        };
        self.skipped += at as u64;
        match found {
            Some((frame, size)) => {
                self.buf.drain(..at + size);
                self.last_frame = size;
                Some(frame)
            }
            None => {
                self.buf.drain(..at);
                None
            }
        }
    }
}

/// Where the first magic starts in `buf`; at the end, a partial magic is kept (it may
/// complete with the next bytes).
fn find_magic(buf: &[u8]) -> usize {
    if let Some(at) = buf.windows(MAGIC.len()).position(|w| w == MAGIC) {
        return at;
    }
    let keep = (1..MAGIC.len())
        .rev()
        .find(|&k| buf.len() >= k && buf[buf.len() - k..] == MAGIC[..k])
        .unwrap_or(0);
    buf.len() - keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Hello { epoch: 7 },
            Frame::HelloAck { epoch: u64::MAX },
            Frame::Open {
                channel: 1,
                port: 1025,
            },
            Frame::Accept { channel: 1 },
            Frame::Refuse {
                channel: 3,
                reason: "no service on port 9".into(),
            },
            Frame::Data {
                channel: 1,
                bytes: b"VMX1 inside the data is fine".to_vec(),
            },
            Frame::Credit {
                channel: 1,
                bytes: 65536,
            },
            Frame::Close { channel: 1 },
            Frame::Reset { channel: 5 },
        ]
    }

    #[test]
    fn every_frame_survives_the_wire() {
        let mut d = Decoder::default();
        for f in frames() {
            d.feed(&f.encode());
            assert_eq!(d.next_frame(), Some(f));
        }
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.skipped(), 0);
    }

    #[test]
    fn a_half_written_frame_is_skipped_and_the_next_one_read() {
        let cut = Frame::Data {
            channel: 1,
            bytes: vec![7; 1000],
        }
        .encode();
        let next = Frame::Hello { epoch: 2 };
        let mut d = Decoder::default();
        // The first 600 bytes of a frame (its writer died), then what a restarted
        // writer sends: the pad and its Hello. The cut frame's header promises more
        // bytes than came; the pad fills them, the sum fails, and the Hello is found.
        d.feed(&cut[..600]);
        assert_eq!(d.next_frame(), None, "waiting for the rest");
        d.feed(&sync_pad());
        d.feed(&next.encode());
        assert_eq!(d.next_frame(), Some(next));
        assert_eq!(d.next_frame(), None);
    }

    #[test]
    fn a_damaged_payload_is_not_delivered() {
        let mut bytes = Frame::Data {
            channel: 1,
            bytes: b"hello".to_vec(),
        }
        .encode();
        bytes[HEADER + 1] ^= 0xff;
        let mut d = Decoder::default();
        d.feed(&bytes);
        d.feed(&Frame::Close { channel: 1 }.encode());
        assert_eq!(d.next_frame(), Some(Frame::Close { channel: 1 }));
    }

    #[test]
    fn an_oversized_length_is_not_waited_for() {
        let mut bytes = Frame::Accept { channel: 1 }.encode();
        // A length over the limit, with a header sum to match: refused at once, not
        // waited for.
        bytes[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        let sum = fnv1a(&bytes[..14]);
        bytes[14..18].copy_from_slice(&sum.to_le_bytes());
        let mut d = Decoder::default();
        d.feed(&bytes);
        d.feed(&Frame::Reset { channel: 2 }.encode());
        assert_eq!(d.next_frame(), Some(Frame::Reset { channel: 2 }));
    }

    #[test]
    fn a_stream_of_fake_magics_costs_time_linear_in_its_length() {
        // Every "VMX1" starts a header that fails its sum: each must cost O(1), not a
        // shift of the whole buffer. 1 MiB at once took about 7 s unoptimised when each
        // did (256 Ki shifts of up to 1 MiB); now about 40 ms.
        let garbage: Vec<u8> = MAGIC.repeat(256 << 10);
        let began = std::time::Instant::now();
        let mut decoder = Decoder::default();
        decoder.feed(&garbage);
        assert_eq!(decoder.next_frame(), None);
        let took = began.elapsed();
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        // All but a tail shorter than a header (it may yet start one) is skipped.
        assert!(decoder.skipped() > (garbage.len() - HEADER) as u64);
    }

    proptest! {
        /// Whatever garbage comes before and between them, and however the bytes are
        /// cut into reads, intact frames come out in order.
        #[test]
        fn frames_come_through_garbage_in_any_chunking(
            garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 10),
            cuts in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let frames = frames();
            let mut stream = Vec::new();
            for (f, g) in frames.iter().zip(garbage.iter().cycle()) {
                stream.extend_from_slice(g);
                stream.extend_from_slice(&f.encode());
            }
            let mut d = Decoder::default();
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + cut).min(stream.len());
                d.feed(&stream[at..end]);
                at = end;
                while let Some(f) = d.next_frame() { got.push(f); }
            }
            // Garbage can at most look like a frame by chance (checksums make that
            // rare); every real frame is there, in order.
            let mut expected = frames.iter();
            let mut next = expected.next();
            for f in &got {
                if Some(f) == next { next = expected.next(); }
            }
            prop_assert!(next.is_none(), "missing {:?} in {:?}", next, got);
        }
    }
}
