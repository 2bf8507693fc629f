//! The raw stream's header and the agent's reply to it, as the other side's bytes: a
//! line either fails to parse or parses to what encodes back to a line that parses the
//! same.
#![no_main]

use vmkit_proto::{StreamHeader, StreamReply};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(header) = StreamHeader::parse(data)
        && let Ok(line) = header.encode()
    {
        let again = StreamHeader::parse(&line);
        assert_eq!(again.ok(), Some(header), "a header's round trip");
    }
    if let Ok(reply) = StreamReply::parse(data) {
        let line = reply.encode();
        let again = StreamReply::parse(&line);
        assert_eq!(again.ok(), Some(reply), "a reply's round trip");
    }
});
