//! Bounded line framing for the process transport: a line is read only while it fits
//! the protocol's limit, so a peer that sends a huge line (or no newline at all) is
//! refused after [`crate::wire::MAX_MESSAGE`] bytes instead of being held whole.

use std::io::{self, BufRead};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Why no line came.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The line was longer than the limit (this many bytes seen, and more to come).
    TooLong(usize),
    /// Reading failed, or the stream ended in the middle of a line.
    Io(io::Error),
}

/// Takes what `buf` holds of the current line into `line`: `Some(consumed)` when the
/// line ended in it (the newline consumed too, not kept), `None` when it goes on.
fn take(line: &mut Vec<u8>, buf: &[u8], limit: usize) -> Result<(usize, bool), LineError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if line.len() + end <= limit => {
            line.extend_from_slice(&buf[..end]);
            Ok((end + 1, true))
        }
        Some(end) => Err(LineError::TooLong(line.len() + end)),
        None if line.len() + buf.len() <= limit => {
            line.extend_from_slice(buf);
            Ok((buf.len(), false))
        }
        None => Err(LineError::TooLong(line.len() + buf.len())),
    }
}

fn ended_early(line: &[u8]) -> Result<Option<Vec<u8>>, LineError> {
    if line.is_empty() {
        Ok(None)
    } else {
        Err(LineError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream ended in the middle of a line",
        )))
    }
}

/// The next line (without its newline) of at most `limit` bytes; `None` at the end.
pub(crate) fn read_line(
    reader: &mut impl BufRead,
    limit: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if buf.is_empty() {
            return ended_early(&line);
        }
        let (used, done) = take(&mut line, buf, limit)?;
        reader.consume(used);
        if done {
            return Ok(Some(line));
        }
    }
}

/// [`read_line`] for an async reader.
pub(crate) async fn read_line_async(
    reader: &mut (impl AsyncBufRead + Unpin),
    limit: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            return ended_early(&line);
        }
        let (used, done) = take(&mut line, buf, limit)?;
        reader.consume(used);
        if done {
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_within_the_limit_come_whole_and_a_longer_one_is_refused_early() {
        let mut input = io::BufReader::with_capacity(8, &b"ab\ncdefgh\n\nxyz"[..]);
        assert_eq!(read_line(&mut input, 6).unwrap().unwrap(), b"ab");
        assert_eq!(read_line(&mut input, 6).unwrap().unwrap(), b"cdefgh");
        assert_eq!(read_line(&mut input, 6).unwrap().unwrap(), b"");
        assert!(matches!(read_line(&mut input, 6), Err(LineError::Io(_))));

        // 64 MiB with no newline: refused once the limit is passed, not read whole.
        struct Endless(usize);
        impl io::Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0 += buf.len();
                buf.fill(b'x');
                Ok(buf.len())
            }
        }
        let mut endless = io::BufReader::new(Endless(0));
        match read_line(&mut endless, 1 << 20) {
            Err(LineError::TooLong(seen)) => assert!(seen > 1 << 20),
            other => panic!("{other:?}"),
        }
        assert!(
            endless.get_ref().0 < (1 << 20) + 64 * 1024,
            "read only past the limit"
        );
        assert!(matches!(read_line(&mut &b""[..], 4), Ok(None)));
    }

    #[tokio::test]
    async fn the_async_reader_keeps_the_same_limit() {
        let mut input = tokio::io::BufReader::with_capacity(4, &b"12345\n123456\n"[..]);
        assert_eq!(
            read_line_async(&mut input, 5).await.unwrap().unwrap(),
            b"12345"
        );
        assert!(matches!(
            read_line_async(&mut input, 5).await,
            Err(LineError::TooLong(6))
        ));
    }
}
