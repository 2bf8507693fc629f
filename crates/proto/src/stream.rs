//! The header that opens a raw stream on the agent's stream port, and the agent's answer.
//!
//! The host connects, writes one header line, and reads one reply line; after `OK` the
//! connection carries the stream's bytes both ways:
//!
//! ```text
//! host  → VMKIT-STREAM/1 echo\n
//! agent → OK\n
//! host  → VMKIT-STREAM/1 exec ["nope"]\n
//! agent → ERR program nope: not found in PATH /usr/local/sbin:…\n
//! host  → VMKIT-STREAM/1 attach 7 stdout from=4096\n
//! ```

/// What every header starts with: the protocol and its version.
pub const MAGIC: &str = "VMKIT-STREAM/1";
/// The longest header or reply line, newline included.
pub const MAX_HEADER: usize = 4096;

/// What a stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHeader {
    /// Every byte sent comes back; the agent closes its side after the host's EOF.
    Echo,
    /// A program's stdio: the stream's bytes go to its stdin (EOF closes it), its stdout
    /// and stderr come back interleaved; the agent closes its side once the program exits
    /// and its output is drained.
    Exec {
        /// The program and its arguments.
        argv: Vec<String>,
    },
    /// One stdio stream of a process the agent's process service spawned (see
    /// `docs/decision-process-service.md`): `id` is the agent's process id, `from` the
    /// number of bytes of that stream the host has already received (0 on a first
    /// attach; a reconnecting host resumes there).
    Attach {
        /// The agent's process id.
        id: u64,
        /// Which stream.
        stream: StdioStream,
        /// Bytes of the stream the host already has.
        from: u64,
    },
}

/// A process's stdio stream, as [`StreamHeader::Attach`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    /// Its stdin (host → process).
    Stdin,
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
    /// Its TTY, both ways (a process spawned with one has no other stream).
    Tty,
}

impl StdioStream {
    /// The stream's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
            StdioStream::Tty => "tty",
        }
    }

    fn from_name(name: &str) -> Option<StdioStream> {
        [
            StdioStream::Stdin,
            StdioStream::Stdout,
            StdioStream::Stderr,
            StdioStream::Tty,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// Why a header or reply line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamHeaderError {
    /// Longer than [`MAX_HEADER`].
    #[error("stream header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// No newline at the end.
    #[error("stream header not terminated by a newline")]
    Unterminated,
    /// Not UTF-8.
    #[error("stream header is not UTF-8")]
    NotUtf8,
    /// Does not start with [`MAGIC`].
    #[error("not a vmkit stream header (expected {MAGIC:?}): {0:?}")]
    BadMagic(String),
    /// A kind the agent does not know.
    #[error("unknown stream kind {0:?} (known: echo, exec, attach)")]
    UnknownKind(String),
    /// The kind's argument is malformed.
    #[error("bad {kind} stream argument: {reason}")]
    BadArgument {
        /// The stream kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The agent's reply was neither `OK` nor `ERR <reason>`.
    #[error("bad stream reply {0:?} (expected OK or ERR <reason>)")]
    BadReply(String),
}

impl StreamHeader {
    /// The kind's name on the wire (`echo`, `exec`, `attach`).
    pub fn kind(&self) -> &'static str {
        match self {
            StreamHeader::Echo => "echo",
            StreamHeader::Exec { .. } => "exec",
            StreamHeader::Attach { .. } => "attach",
        }
    }

    /// The header line, newline included.
    ///
    /// # Errors
    /// [`StreamHeaderError::BadArgument`] for an empty `argv`, or
    /// [`StreamHeaderError::TooLong`] when the line would exceed [`MAX_HEADER`].
    pub fn encode(&self) -> Result<Vec<u8>, StreamHeaderError> {
        let line = match self {
            StreamHeader::Echo => format!("{MAGIC} echo\n"),
            StreamHeader::Exec { argv } => {
                if argv.is_empty() {
                    return Err(StreamHeaderError::BadArgument {
                        kind: "exec",
                        reason: "argv is empty".into(),
                    });
                }
                // A Vec<String> always serialises; JSON escapes newlines in strings.
                let json = serde_json::to_string(argv).unwrap_or_default();
                format!("{MAGIC} exec {json}\n")
            }
            StreamHeader::Attach { id, stream, from } => match from {
                0 => format!("{MAGIC} attach {id} {}\n", stream.name()),
                from => format!("{MAGIC} attach {id} {} from={from}\n", stream.name()),
            },
        };
        if line.len() > MAX_HEADER {
            return Err(StreamHeaderError::TooLong);
        }
        Ok(line.into_bytes())
    }

    /// Parses a header line (with its newline).
    ///
    /// # Errors
    /// A [`StreamHeaderError`] saying what is wrong; never panics, whatever the bytes.
    pub fn parse(line: &[u8]) -> Result<StreamHeader, StreamHeaderError> {
        let text = line_text(line)?;
        let rest = text
            .strip_prefix(MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| StreamHeaderError::BadMagic(shorten(text)))?;
        let (kind, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "echo" if arg.is_empty() => Ok(StreamHeader::Echo),
            "echo" => Err(StreamHeaderError::BadArgument {
                kind: "echo",
                reason: "echo takes no argument".into(),
            }),
            "exec" => {
                let argv: Vec<String> =
                    serde_json::from_str(arg).map_err(|e| StreamHeaderError::BadArgument {
                        kind: "exec",
                        reason: format!("argv must be a JSON array of strings: {e}"),
                    })?;
                if argv.is_empty() {
                    return Err(StreamHeaderError::BadArgument {
                        kind: "exec",
                        reason: "argv is empty".into(),
                    });
                }
                Ok(StreamHeader::Exec { argv })
            }
            "attach" => parse_attach(arg),
            other => Err(StreamHeaderError::UnknownKind(shorten(other))),
        }
    }
}

/// `<id> <stream>[ from=<offset>]`: decimal numbers (no sign, no leading zeros beyond
/// a lone 0), a known stream, nothing else.
fn parse_attach(arg: &str) -> Result<StreamHeader, StreamHeaderError> {
    let bad = |reason: String| StreamHeaderError::BadArgument {
        kind: "attach",
        reason,
    };
    let number = |what: &str, text: &str| {
        let canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        canonical
            .then(|| text.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| bad(format!("{what} {:?} is not a decimal u64", shorten(text))))
    };
    let mut fields = arg.split(' ');
    let id = number("process id", fields.next().unwrap_or_default())?;
    let name = fields.next().unwrap_or_default();
    let stream = StdioStream::from_name(name).ok_or_else(|| {
        bad(format!(
            "stream {:?} is none of stdin, stdout, stderr, tty",
            shorten(name)
        ))
    })?;
    let from = match fields.next() {
        None => 0,
        Some(field) => match field.strip_prefix("from=") {
            Some(offset) => number("offset", offset)?,
            None => return Err(bad(format!("unexpected {:?}", shorten(field)))),
        },
    };
    match fields.next() {
        None => Ok(StreamHeader::Attach { id, stream, from }),
        Some(extra) => Err(bad(format!("unexpected {:?}", shorten(extra)))),
    }
}

/// The agent's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamReply {
    /// The stream is open.
    Ok,
    /// The stream was refused, and why.
    Err(String),
}

impl StreamReply {
    /// The reply line, newline included; a reason's newlines become spaces and it is
    /// cut to fit [`MAX_HEADER`].
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StreamReply::Ok => b"OK\n".to_vec(),
            StreamReply::Err(reason) => {
                let mut reason: String = reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let room = MAX_HEADER - "ERR \n".len();
                if reason.len() > room {
                    let mut cut = room;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                }
                format!("ERR {reason}\n").into_bytes()
            }
        }
    }

    /// Parses a reply line (with its newline).
    ///
    /// # Errors
    /// A [`StreamHeaderError`]; never panics.
    pub fn parse(line: &[u8]) -> Result<StreamReply, StreamHeaderError> {
        let text = line_text(line)?;
        if text == "OK" {
            return Ok(StreamReply::Ok);
        }
        match text.strip_prefix("ERR ") {
            // The guest's words end up in the host's errors and logs: control
            // characters (a terminal's escapes, more lines) become spaces, as
            // `encode` writes them.
            Some(reason) => Ok(StreamReply::Err(
                reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect(),
            )),
            None => Err(StreamHeaderError::BadReply(shorten(text))),
        }
    }
}

fn line_text(line: &[u8]) -> Result<&str, StreamHeaderError> {
    if line.len() > MAX_HEADER {
        return Err(StreamHeaderError::TooLong);
    }
    let body = line
        .strip_suffix(b"\n")
        .ok_or(StreamHeaderError::Unterminated)?;
    std::str::from_utf8(body).map_err(|_| StreamHeaderError::NotUtf8)
}

/// At most 80 characters of untrusted text, for an error message.
fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(80).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Found by the `stream_header` fuzz target: a reason with control characters read
    /// back differently from what it encodes to, and carried a guest's escapes into the
    /// host's errors.
    #[test]
    fn a_replys_control_characters_become_spaces() {
        let reply = StreamReply::parse(b"ERR \n\n\n\n").unwrap();
        assert_eq!(reply, StreamReply::Err("   ".into()));
        assert_eq!(StreamReply::parse(&reply.encode()).unwrap(), reply);
        let escape = StreamReply::parse(b"ERR \x1b[2Jgone\n").unwrap();
        assert_eq!(escape, StreamReply::Err(" [2Jgone".into()));
    }

    #[test]
    fn headers_round_trip_and_read_as_documented() {
        assert_eq!(
            StreamHeader::Echo.encode().unwrap(),
            b"VMKIT-STREAM/1 echo\n"
        );
        let exec = StreamHeader::Exec {
            argv: vec!["cat".into(), "-n".into()],
        };
        assert_eq!(
            exec.encode().unwrap(),
            b"VMKIT-STREAM/1 exec [\"cat\",\"-n\"]\n"
        );
        assert_eq!(StreamHeader::parse(&exec.encode().unwrap()).unwrap(), exec);
    }

    #[test]
    fn bad_headers_say_what_is_wrong() {
        let err = |line: &[u8]| StreamHeader::parse(line).unwrap_err().to_string();
        assert_eq!(
            err(b"GET / HTTP/1.1\n"),
            "not a vmkit stream header (expected \"VMKIT-STREAM/1\"): \"GET / HTTP/1.1\""
        );
        assert_eq!(
            err(b"VMKIT-STREAM/1 tar x\n"),
            "unknown stream kind \"tar\" (known: echo, exec, attach)"
        );
        assert_eq!(
            err(b"VMKIT-STREAM/1 exec []\n"),
            "bad exec stream argument: argv is empty"
        );
        assert!(
            err(b"VMKIT-STREAM/1 exec ls\n").starts_with("bad exec stream argument: argv must be")
        );
        assert_eq!(
            err(b"VMKIT-STREAM/1 echo"),
            "stream header not terminated by a newline"
        );
        assert_eq!(
            err(&[b'x'; MAX_HEADER + 1]),
            "stream header longer than 4096 bytes"
        );
        let long = StreamHeader::Exec {
            argv: vec!["x".repeat(MAX_HEADER)],
        };
        assert_eq!(long.encode(), Err(StreamHeaderError::TooLong));
    }

    #[test]
    fn replies_round_trip_and_reasons_stay_one_line() {
        assert_eq!(StreamReply::parse(b"OK\n").unwrap(), StreamReply::Ok);
        let err = StreamReply::Err("exec nope:\nNo such file".into());
        assert_eq!(err.encode(), b"ERR exec nope: No such file\n");
        assert_eq!(
            StreamReply::parse(&err.encode()).unwrap(),
            StreamReply::Err("exec nope: No such file".into())
        );
        assert_eq!(
            StreamReply::parse(b"OK 5\n").unwrap_err().to_string(),
            "bad stream reply \"OK 5\" (expected OK or ERR <reason>)"
        );
        let huge = StreamReply::Err("é".repeat(MAX_HEADER));
        assert!(huge.encode().len() <= MAX_HEADER);
        assert!(StreamReply::parse(&huge.encode()).is_ok());
    }

    #[test]
    fn attach_headers_read_as_documented_and_refuse_the_rest() {
        let attach = StreamHeader::Attach {
            id: 7,
            stream: StdioStream::Stdout,
            from: 4096,
        };
        assert_eq!(
            attach.encode().unwrap(),
            b"VMKIT-STREAM/1 attach 7 stdout from=4096\n"
        );
        let first = StreamHeader::Attach {
            id: 0,
            stream: StdioStream::Tty,
            from: 0,
        };
        assert_eq!(first.encode().unwrap(), b"VMKIT-STREAM/1 attach 0 tty\n");
        assert_eq!(
            StreamHeader::parse(b"VMKIT-STREAM/1 attach 0 tty from=0\n").unwrap(),
            first,
            "an explicit from=0 is a first attach too"
        );
        let err = |line: &[u8]| StreamHeader::parse(line).unwrap_err().to_string();
        for (line, says) in [
            (&b"VMKIT-STREAM/1 attach\n"[..], "process id \"\" is not"),
            (b"VMKIT-STREAM/1 attach -1 stdout\n", "process id \"-1\""),
            (b"VMKIT-STREAM/1 attach +1 stdout\n", "process id \"+1\""),
            (b"VMKIT-STREAM/1 attach 007 stdout\n", "process id \"007\""),
            (
                b"VMKIT-STREAM/1 attach 18446744073709551616 stdout\n",
                "is not a decimal u64",
            ),
            (
                b"VMKIT-STREAM/1 attach 1 stdio\n",
                "stream \"stdio\" is none of",
            ),
            (
                b"VMKIT-STREAM/1 attach 1 stdout  from=1\n",
                "unexpected \"\"",
            ),
            (
                b"VMKIT-STREAM/1 attach 1 stdout to=1\n",
                "unexpected \"to=1\"",
            ),
            (b"VMKIT-STREAM/1 attach 1 stdout from=x\n", "offset \"x\""),
            (
                b"VMKIT-STREAM/1 attach 1 stdout from=1 x\n",
                "unexpected \"x\"",
            ),
        ] {
            let text = err(line);
            assert!(text.starts_with("bad attach stream argument: "), "{text}");
            assert!(text.contains(says), "{line:?}: {text}");
        }
    }

    proptest! {
        #[test]
        fn any_attach_round_trips(id: u64, from: u64, which in 0..4usize) {
            let stream = [
                StdioStream::Stdin,
                StdioStream::Stdout,
                StdioStream::Stderr,
                StdioStream::Tty,
            ][which];
            let header = StreamHeader::Attach { id, stream, from };
            let line = header.encode().unwrap();
            prop_assert_eq!(StreamHeader::parse(&line).unwrap(), header);
        }

        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StreamHeader::parse(&bytes);
            let _ = StreamReply::parse(&bytes);
        }

        #[test]
        fn any_argv_that_fits_round_trips(argv in proptest::collection::vec(".*", 1..6)) {
            let header = StreamHeader::Exec { argv };
            if let Ok(line) = header.encode() {
                prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                prop_assert_eq!(StreamHeader::parse(&line).unwrap(), header);
            }
        }
    }
}
