//! Dialling hybrid vsock against a scripted peer on a Unix socket: late sockets,
//! refused ports, garbage answers, stream headers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vmkit_proto::StreamHeader;
use vmkit_vsock::{Error, GuestAddr, dial, dial_with_retry, open_stream};

/// Guest ports of the scripted peer.
const ECHO: u32 = 1; // OK, then echo
const CLOSED: u32 = 2; // nobody listens: the peer just closes
const GARBAGE: u32 = 3; // answers like a web server
const REFUSING_AGENT: u32 = 4; // OK, then refuses any stream header
const STREAM_AGENT: u32 = 5; // OK, then accepts a header and echoes

/// Serves the script on `path` until the runtime ends.
fn serve(path: PathBuf) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                let port: u32 = line
                    .trim()
                    .strip_prefix("CONNECT ")
                    .unwrap()
                    .parse()
                    .unwrap();
                match port {
                    ECHO => {
                        stream.write_all(b"OK 1234\n").await.unwrap();
                        echo(stream).await;
                    }
                    GARBAGE => stream
                        .write_all(b"HTTP/1.1 400 Bad Request\n")
                        .await
                        .unwrap(),
                    REFUSING_AGENT | STREAM_AGENT => {
                        stream.write_all(b"OK 1234\n").await.unwrap();
                        line.clear();
                        stream.read_line(&mut line).await.unwrap();
                        if port == REFUSING_AGENT {
                            stream
                                .write_all(b"ERR unknown stream kind\n")
                                .await
                                .unwrap();
                        } else {
                            stream.write_all(b"OK\n").await.unwrap();
                            echo(stream).await;
                        }
                    }
                    _ => {} // CLOSED and anything else: drop the connection
                }
            });
        }
    });
}

async fn echo(mut stream: BufReader<tokio::net::UnixStream>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn addr(path: &Path, port: u32) -> GuestAddr {
    GuestAddr::HybridVsock {
        uds: path.into(),
        port,
    }
}

#[tokio::test]
async fn bytes_sent_right_after_ok_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    serve(path.clone());
    let mut conn = dial(&addr(&path, ECHO), Duration::from_secs(2))
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test]
async fn retry_waits_for_a_socket_that_appears_late() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let began = Instant::now();
    let later = path.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        serve(later);
    });
    let one_shot = dial(&addr(&path, ECHO), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(one_shot.is_transient(), "{one_shot}");
    dial_with_retry(&addr(&path, ECHO), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn a_port_nobody_listens_on_times_out_naming_attempts_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    serve(path.clone());
    let began = Instant::now();
    let err = dial_with_retry(&addr(&path, CLOSED), Duration::from_millis(400))
        .await
        .unwrap_err();
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(600),
        "{took:?}"
    );
    let Error::DialTimeout { attempts, last, .. } = &err else {
        panic!("{err}")
    };
    assert!(*attempts > 3, "{err}");
    assert_eq!(
        last, "closed before OK: nothing listens on guest port 2 yet",
        "{err}"
    );
    assert!(
        err.to_string().starts_with(&format!(
            "dial hvsock://{}:2: no connection after {attempts} attempts in 400ms; last: closed before OK",
            path.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_peer_answering_garbage_fails_at_once_with_what_it_said() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    serve(path.clone());
    let began = Instant::now();
    let err = dial_with_retry(&addr(&path, GARBAGE), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(1));
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "dial hvsock://{}:3: the hybrid vsock peer answered \"HTTP/1.1 400 Bad Request\" instead of \"OK <port>\"",
            path.display()
        )
    );
}

#[tokio::test]
async fn a_bad_socket_path_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let began = Instant::now();
    let err = dial_with_retry(&addr(&file.join("v.sock"), ECHO), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(1));
    assert!(err.to_string().contains("Not a directory"), "{err}");
}

#[tokio::test]
async fn streams_open_after_the_agents_ok_and_carry_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    serve(path.clone());
    let mut conn = open_stream(
        &addr(&path, STREAM_AGENT),
        &StreamHeader::Echo,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    conn.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");

    let err = open_stream(
        &addr(&path, REFUSING_AGENT),
        &StreamHeader::Echo,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "stream echo on hvsock://{}:4: the agent refused: unknown stream kind",
            path.display()
        )
    );
}

/// A daemon that has no guest memory table: it accepts every dial and closes it at
/// once, unread (vhost-device-vsock 0.3 before the guest's driver started its device).
fn serve_unread(path: PathBuf) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        }
    });
}

#[tokio::test]
async fn a_probe_tells_a_daemon_that_drops_dials_unread_from_an_empty_port() {
    use vmkit_vsock::{HybridProbe, probe_hybrid};
    let dir = tempfile::tempdir().unwrap();
    let (healthy, unread) = (dir.path().join("v.sock"), dir.path().join("u.sock"));
    serve(healthy.clone());
    serve_unread(unread.clone());
    let within = Duration::from_secs(2);
    assert_eq!(
        probe_hybrid(&healthy, ECHO, within).await,
        HybridProbe::Answered
    );
    assert_eq!(
        probe_hybrid(&healthy, CLOSED, within).await,
        HybridProbe::NotListening
    );
    assert_eq!(
        probe_hybrid(&healthy, GARBAGE, within).await,
        HybridProbe::Other
    );
    // Either way the unread close shows (a broken pipe, or a reset): every time.
    for _ in 0..50 {
        assert_eq!(
            probe_hybrid(&unread, ECHO, within).await,
            HybridProbe::Unread
        );
    }
    let missing = dir.path().join("missing.sock");
    assert_eq!(
        probe_hybrid(&missing, ECHO, within).await,
        HybridProbe::Other
    );
    // A daemon that never answers: the probe ends by its timeout.
    let _silent = std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).unwrap();
    let began = Instant::now();
    let silent = probe_hybrid(&dir.path().join("s.sock"), ECHO, Duration::from_millis(200)).await;
    assert_eq!(silent, HybridProbe::Other);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
}
