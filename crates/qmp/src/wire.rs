//! QMP on the wire: compact command encoding, bounded line reading, and the parser that
//! sorts each line into a greeting, a reply or an event.
//!
//! QEMU reads QMP one byte per system call (about 3 µs a byte on our machines), so the
//! encoder writes the fewest bytes it can: no whitespace, no empty `"arguments"`, short
//! numeric ids.

use std::io::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::event::Timestamp;

/// Encodes `{"execute":NAME[,"arguments":ARGS][,"id":ID]}\n` into `out`.
/// Arguments that serialise to `{}` (or `null`) are left out.
pub(crate) fn encode_command(
    out: &mut Vec<u8>,
    name: &str,
    arguments: &impl serde::Serialize,
    id: Option<u64>,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"execute\":");
    serde_json::to_writer(&mut *out, name)?;
    let mark = out.len();
    out.extend_from_slice(b",\"arguments\":");
    let args_start = out.len();
    serde_json::to_writer(&mut *out, arguments)?;
    if matches!(&out[args_start..], b"{}" | b"null") {
        out.truncate(mark);
    }
    if let Some(id) = id {
        // Writing into a Vec cannot fail.
        let _ = write!(out, ",\"id\":{id}");
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// Why a line could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection between messages.
    Eof,
    /// The peer closed the connection in the middle of a message.
    EofMidMessage { partial: usize },
    /// A message longer than the limit.
    TooLarge { limit: usize },
    /// The socket failed.
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => f.write_str("QEMU closed the connection"),
            ReadError::EofMidMessage { partial } => write!(
                f,
                "QEMU closed the connection in the middle of a message ({partial} bytes without a newline)"
            ),
            ReadError::TooLarge { limit } => {
                write!(f, "a message exceeded the {limit}-byte limit")
            }
            ReadError::Io(e) => write!(f, "reading the QMP socket: {e}"),
        }
    }
}

/// Reads one `\n`-terminated line (without the `\n`) into `line`, refusing lines longer
/// than `limit` bytes before buffering them whole.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> Result<(), ReadError> {
    line.clear();
    loop {
        let available = reader.fill_buf().await.map_err(ReadError::Io)?;
        if available.is_empty() {
            return Err(if line.is_empty() {
                ReadError::Eof
            } else {
                ReadError::EofMidMessage {
                    partial: line.len(),
                }
            });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if line.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(());
        }
    }
}

/// A QMP error object: `{"class": …, "desc": …}`. The class is kept as text: QEMU may
/// add classes the schema does not know.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub(crate) class: String,
    pub(crate) desc: String,
}

/// Every top-level key a QMP server sends, borrowed from the line.
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(rename = "QMP", borrow, default)]
    greeting: Option<&'a RawValue>,
    #[serde(rename = "return", borrow, default)]
    ret: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<Timestamp>,
}

/// One parsed line.
#[derive(Debug)]
pub(crate) enum Message<'a> {
    /// The server's greeting (`{"QMP": …}`), its body unparsed.
    Greeting(&'a RawValue),
    /// A command's reply; `id` is `None` when the server sent none.
    Reply {
        id: Option<Id>,
        result: Result<&'a RawValue, ErrorBody>,
    },
    /// An asynchronous event; `data` is `None` when the event carries none.
    Event {
        name: std::borrow::Cow<'a, str>,
        data: Option<&'a RawValue>,
        timestamp: Timestamp,
    },
}

/// A reply's id: ours are numbers; anything else is kept as its JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Id {
    Number(u64),
    Other(String),
}

/// Why a line is not a QMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError(pub(crate) String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// At most this much of a bad line is quoted in an error.
const QUOTE: usize = 120;

fn quote(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(QUOTE)]);
    let more = if line.len() > QUOTE { "…" } else { "" };
    format!("{:?}{more}", text)
}

/// Sorts one line into a [`Message`].
pub(crate) fn parse(line: &[u8]) -> Result<Message<'_>, ParseError> {
    let raw: RawMessage<'_> = serde_json::from_slice(line).map_err(|e| {
        ParseError(format!(
            "a line is not a QMP JSON object ({e}): {}",
            quote(line)
        ))
    })?;
    if let Some(greeting) = raw.greeting {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(name) = raw.event {
        return Ok(Message::Event {
            name,
            data: raw.data,
            timestamp: raw.timestamp.unwrap_or_default(),
        });
    }
    let id = raw.id.map(|id| {
        let text = id.get();
        text.parse::<u64>()
            .map_or_else(|_| Id::Other(text.to_owned()), Id::Number)
    });
    match (raw.ret, raw.error) {
        (Some(ret), None) => Ok(Message::Reply {
            id,
            result: Ok(ret),
        }),
        (None, Some(error)) => Ok(Message::Reply {
            id,
            result: Err(error),
        }),
        _ => Err(ParseError(format!(
            "a message is neither a reply, an error nor an event: {}",
            quote(line)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Serialize)]
    struct NoArgs {}

    #[derive(serde::Serialize)]
    struct Args {
        id: &'static str,
    }

    fn encoded(name: &str, args: &impl serde::Serialize, id: Option<u64>) -> String {
        let mut out = Vec::new();
        encode_command(&mut out, name, args, id).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn commands_are_encoded_compactly() {
        assert_eq!(
            encoded("query-status", &NoArgs {}, Some(7)),
            "{\"execute\":\"query-status\",\"id\":7}\n"
        );
        assert_eq!(
            encoded("query-status", &NoArgs {}, None),
            "{\"execute\":\"query-status\"}\n"
        );
        assert_eq!(
            encoded("device_del", &Args { id: "cpu1" }, Some(12)),
            "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"cpu1\"},\"id\":12}\n"
        );
        assert_eq!(
            encoded("stop", &serde_json::Value::Null, Some(0)),
            "{\"execute\":\"stop\",\"id\":0}\n"
        );
    }

    #[test]
    fn replies_errors_events_and_greetings_are_told_apart() {
        match parse(br#"{"return": {"running": true}, "id": 3}"#).unwrap() {
            Message::Reply {
                id: Some(Id::Number(3)),
                result: Ok(v),
            } => assert_eq!(v.get(), r#"{"running": true}"#),
            other => panic!("{other:?}"),
        }
        match parse(br#"{"error": {"class": "NewClass", "desc": "nope"}, "id": "x"}"#).unwrap() {
            Message::Reply {
                id: Some(Id::Other(id)),
                result: Err(e),
            } => {
                assert_eq!(id, "\"x\"");
                assert_eq!(e.class, "NewClass");
                assert_eq!(e.desc, "nope");
            }
            other => panic!("{other:?}"),
        }
        match parse(br#"{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}"#)
            .unwrap()
        {
            Message::Event {
                name,
                data: None,
                timestamp,
            } => {
                assert_eq!(name, "STOP");
                assert_eq!((timestamp.seconds, timestamp.microseconds), (5, 6));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#).unwrap(),
            Message::Greeting(_)
        ));
    }

    #[test]
    fn bad_lines_say_what_they_were() {
        let err = parse(b"garbage").unwrap_err();
        assert!(
            err.0
                .starts_with("a line is not a QMP JSON object (expected value"),
            "{err}"
        );
        assert!(err.0.ends_with("\"garbage\""), "{err}");
        let err = parse(br#"{"hello": 1}"#).unwrap_err();
        assert_eq!(
            err.0,
            "a message is neither a reply, an error nor an event: \"{\\\"hello\\\": 1}\""
        );
        let long = vec![b'x'; 500];
        assert!(parse(&long).unwrap_err().0.ends_with("…"));
    }

    async fn lines(input: &[u8], limit: usize) -> Vec<Result<String, String>> {
        let mut reader = tokio::io::BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            match read_line(&mut reader, &mut line, limit).await {
                Ok(()) => out.push(Ok(String::from_utf8_lossy(&line).into_owned())),
                Err(ReadError::Eof) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_across_buffer_refills_and_bounded() {
        assert_eq!(
            lines(b"{\"a\":1}\r\n{\"bb\":22}\n", 64).await,
            [Ok("{\"a\":1}".to_owned()), Ok("{\"bb\":22}".to_owned())]
        );
        assert_eq!(
            lines(b"0123456789\n", 10).await,
            [Ok("0123456789".to_owned())]
        );
        assert_eq!(
            lines(b"short\n0123456789A\n", 10).await,
            [
                Ok("short".to_owned()),
                Err("a message exceeded the 10-byte limit".to_owned())
            ]
        );
        assert_eq!(
            lines(b"{\"return\":{}}\n{\"ret", 64).await,
            [
                Ok("{\"return\":{}}".to_owned()),
                Err("QEMU closed the connection in the middle of a message (5 bytes without a newline)".to_owned())
            ]
        );
    }

    proptest! {
        /// Whatever arrives, the parser returns; it never panics.
        #[test]
        fn parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }

        /// JSON-shaped input with QMP's keys in random combinations.
        #[test]
        fn parser_never_panics_on_qmp_shaped_json(
            keys in prop::collection::vec(
                prop::sample::select(vec!["QMP", "return", "error", "id", "event", "data", "timestamp", "class", "desc"]),
                0..6),
            values in prop::collection::vec(
                prop::sample::select(vec!["1", "-1", "18446744073709551616", "\"s\"", "null", "{}", "[]", "{\"class\":\"C\",\"desc\":\"d\"}", "{\"seconds\":1,\"microseconds\":2}", "true"]),
                6),
        ) {
            let body: Vec<String> = keys.iter().zip(&values).map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let line = format!("{{{}}}", body.join(","));
            let _ = parse(line.as_bytes());
        }

        /// The line reader never panics and never returns more than the limit.
        #[test]
        fn line_reader_respects_its_limit(input in prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..200), limit in 1usize..40) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut reader = tokio::io::BufReader::with_capacity(7, &input[..]);
            let mut line = Vec::new();
            let mut total = 0;
            while rt.block_on(read_line(&mut reader, &mut line, limit)).is_ok() {
                prop_assert!(line.len() <= limit);
                prop_assert!(!line.contains(&b'\n'));
                total += 1;
                prop_assert!(total <= input.len());
            }
        }
    }
}
