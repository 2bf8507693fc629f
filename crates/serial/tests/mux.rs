//! The mux over in-memory streams, through what makes a serial channel unreliable: many
//! channels at once, a slow reader, the other side restarting (its end re-attached to
//! the same "port", with a half-written frame left behind), and the stream ending.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::Mutex;
use vmkit_serial::{Channel, Error, Incoming, Mux, Side};

const OPEN: Duration = Duration::from_secs(5);
const ECHO: u32 = 1026;

/// Serves an echo on every channel `incoming` accepts.
fn echo(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(channel) = incoming.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(channel);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` on `channel`, ends its side, and reads back everything.
async fn round_trip(channel: Channel, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(channel);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    drop(writer.await.unwrap());
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_echo_byte_exact_beside_other_channels() {
    let (h, g) = tokio::io::duplex(64 << 10);
    let (host, _) = Mux::new(h, Side::Host);
    let (_guest, incoming) = Mux::serving(g, Side::Guest, &[ECHO]);
    echo(incoming);
    let big = pattern(16 << 20, 7);
    let big_channel = host.open(ECHO, OPEN).await.unwrap();
    let big_trip = tokio::spawn(round_trip(big_channel, big.clone()));
    // Small calls on other channels meanwhile.
    let mut small = Vec::new();
    for n in 0..8u8 {
        let channel = host.open(ECHO, OPEN).await.unwrap();
        small.push(tokio::spawn(round_trip(
            channel,
            pattern(1000 + usize::from(n), n),
        )));
    }
    for (n, call) in small.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), pattern(1000 + n, n as u8));
    }
    let back = big_trip.await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "16 MiB came back altered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_up_only_its_own_channel() {
    let (h, g) = tokio::io::duplex(64 << 10);
    let (host, _) = Mux::new(h, Side::Host);
    let (_guest, mut incoming) = Mux::new(g, Side::Guest);
    let mut stalled = host.open(9, OPEN).await.unwrap();
    let stalled_far = incoming.accept().await.unwrap();
    echo(incoming);
    // Nobody reads the far end of `stalled`: a write of 4 MiB stops at its window.
    let writer = tokio::spawn(async move {
        stalled.write_all(&pattern(4 << 20, 1)).await.unwrap();
        stalled.shutdown().await.unwrap();
        stalled
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !writer.is_finished(),
        "a write past the window must wait for the reader"
    );
    // The other channels are not held up.
    let began = Instant::now();
    let channel = host.open(ECHO, OPEN).await.unwrap();
    assert_eq!(
        round_trip(channel, pattern(100_000, 3)).await,
        pattern(100_000, 3)
    );
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    // The slow reader catches up and gets every byte.
    let mut r = stalled_far;
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    assert!(got == pattern(4 << 20, 1));
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn a_port_nobody_serves_is_refused_at_once() {
    let (h, g) = tokio::io::duplex(64 << 10);
    let (host, _) = Mux::new(h, Side::Host);
    let (_guest, incoming) = Mux::serving(g, Side::Guest, &[ECHO]);
    echo(incoming);
    let err = host.open(4242, OPEN).await.unwrap_err();
    assert!(matches!(err, Error::Refused { port: 4242, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "port 4242: refused: nothing serves port 4242"
    );
}

#[tokio::test]
async fn an_ended_stream_fails_every_channel_and_open_at_once() {
    let (h, g) = tokio::io::duplex(64 << 10);
    let (host, _) = Mux::new(h, Side::Host);
    let (guest, incoming) = Mux::new(g, Side::Guest);
    echo(incoming);
    let mut channel = host.open(ECHO, OPEN).await.unwrap();
    let mut reader = host.open(ECHO, OPEN).await.unwrap();
    let pending_read = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        reader.read(&mut buf).await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let began = Instant::now();
    drop(guest);
    let read = pending_read.await.unwrap();
    assert!(read.is_err(), "a waiting read fails: {read:?}");
    host.wait_closed().await;
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert!(channel.write_all(b"x").await.is_err());
    let err = host.open(ECHO, OPEN).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
}

/// A serial port between a fixed end and an end that can be detached and attached
/// again (a guest agent restarting; a host reconnecting), as QEMU's chardev is: bytes
/// written toward a detached end are lost.
struct Port {
    toward_swappable: Arc<Mutex<Option<WriteHalf<DuplexStream>>>>,
    toward_fixed: Arc<Mutex<WriteHalf<DuplexStream>>>,
}

impl Port {
    /// The port and its fixed end.
    fn new() -> (Port, DuplexStream) {
        let (fixed, inner) = tokio::io::duplex(64 << 10);
        let (mut from_fixed, to_fixed) = tokio::io::split(inner);
        let toward_swappable: Arc<Mutex<Option<WriteHalf<DuplexStream>>>> = Arc::default();
        let sink = Arc::clone(&toward_swappable);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match from_fixed.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(w) = sink.lock().await.as_mut() {
                    let _ = w.write_all(&buf[..n]).await;
                }
            }
        });
        (
            Port {
                toward_swappable,
                toward_fixed: Arc::new(Mutex::new(to_fixed)),
            },
            fixed,
        )
    }

    /// A new swappable end, replacing the old one (which goes deaf).
    async fn attach(&self) -> DuplexStream {
        let (end, inner) = tokio::io::duplex(64 << 10);
        let (mut from_end, to_end) = tokio::io::split(inner);
        *self.toward_swappable.lock().await = Some(to_end);
        let sink = Arc::clone(&self.toward_fixed);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match from_end.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let _ = sink.lock().await.write_all(&buf[..n]).await;
                    }
                }
            }
        });
        end
    }

    /// Writes raw bytes toward the fixed end, as a dying writer would.
    async fn inject(&self, bytes: &[u8]) {
        self.toward_fixed
            .lock()
            .await
            .write_all(bytes)
            .await
            .unwrap();
    }
}

/// Opens a channel, retrying while the other side is not there yet or restarted.
async fn open_again(mux: &Mux, port: u32) -> Channel {
    let deadline = Instant::now() + OPEN;
    loop {
        match mux.open(port, Duration::from_millis(500)).await {
            Ok(channel) => return channel,
            Err(e @ Error::Closed { .. }) => panic!("{e}"),
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_ends_the_old_channels_and_serves_new_ones() {
    let (port, host_end) = Port::new();
    let (host, _) = Mux::new(host_end, Side::Host);
    let (guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let mut old = open_again(&host, ECHO).await;
    old.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    old.read_exact(&mut buf).await.unwrap();

    // The agent dies in the middle of writing a frame; a new one opens the port.
    drop(guest);
    port.inject(b"VMX1\x06\x00\x01\x00\x00\x00\x00\x10\x00\x00half a frame")
        .await;
    let (_guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    // The old channel fails once the new agent's hello arrives (not at some deadline).
    let began = Instant::now();
    let mut rest = Vec::new();
    let read = old.read_to_end(&mut rest).await;
    assert!(
        read.is_err(),
        "the old channel must fail: {read:?} {rest:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    // New channels reach the new agent, byte-exact.
    let channel = open_again(&host, ECHO).await;
    assert_eq!(
        round_trip(channel, pattern(300_000, 9)).await,
        pattern(300_000, 9)
    );
    assert!(host.closed().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_host_is_served_again_and_the_agent_drops_its_old_channels() {
    let (port, guest_end) = Port::new();
    let (_guest, mut incoming) = Mux::new(guest_end, Side::Guest);
    let (first, _) = Mux::new(port.attach().await, Side::Host);
    let _mine = open_again(&first, ECHO).await;
    let mut theirs = incoming.accept().await.unwrap();
    echo(incoming);
    // The host goes away and comes back (vmkit reconnecting to QEMU's socket).
    drop(first);
    let (second, _) = Mux::new(port.attach().await, Side::Host);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), theirs.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "the agent's old channel fails when the new host says hello: {read:?}"
    );
    let channel = open_again(&second, ECHO).await;
    assert_eq!(round_trip(channel, b"again".to_vec()).await, b"again");
}

/// The agent dies and its next life takes its time: QEMU tells the host the guest
/// closed its port (`peer_closed`). The old channel fails at once, not when the next
/// life says hello, and an open made in the gap waits for that hello and reaches the
/// new agent — it is neither sent into the gap nor failed by the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_peer_fails_its_channels_at_once_and_opens_wait_for_its_next_life() {
    let (port, host_end) = Port::new();
    let (host, _) = Mux::new(host_end, Side::Host);
    let (guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let mut old = open_again(&host, ECHO).await;
    old.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    old.read_exact(&mut buf).await.unwrap();

    drop(guest);
    let began = Instant::now();
    host.peer_closed("the guest closed its port");
    let read = old.read(&mut buf).await;
    assert!(read.is_err(), "the old channel fails: {read:?}");
    assert!(began.elapsed() < Duration::from_millis(100));

    // An open in the gap: it waits for the next life, however slow, within its timeout.
    let host2 = host.clone();
    let waiting = tokio::spawn(async move { host2.open(ECHO, OPEN).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "an open in the gap must wait");
    let (next, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let channel = waiting
        .await
        .unwrap()
        .expect("the open reaches the new agent");
    assert_eq!(
        round_trip(channel, pattern(100_000, 4)).await,
        pattern(100_000, 4)
    );

    // With no next life, an open ends at its own timeout, as a timeout.
    drop(next);
    host.peer_closed("the guest closed its port");
    let err = host
        .open(ECHO, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}

/// A live peer answers a probe at once; a dead one (its end detached, as a killed
/// agent's port) does not, and the probe says so within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_tells_a_live_peer_from_a_dead_one() {
    let (port, host_end) = Port::new();
    let (host, _) = Mux::new(host_end, Side::Host);
    let (guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let _ = open_again(&host, ECHO).await;
    let began = Instant::now();
    assert!(host.peer_answers(Duration::from_secs(2)).await);
    assert!(began.elapsed() < Duration::from_millis(500));
    drop(guest);
    let began = Instant::now();
    assert!(!host.peer_answers(Duration::from_millis(300)).await);
    assert!(began.elapsed() >= Duration::from_millis(300));
    // A probe that its next life answers is no answer from the life the host's
    // channels are with; once the host has met the next life, that one answers.
    let host2 = host.clone();
    let probe = tokio::spawn(async move { host2.peer_answers(Duration::from_secs(2)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    assert!(
        !probe.await.unwrap(),
        "the next life is not the one that died"
    );
    assert!(host.peer_answers(Duration::from_secs(2)).await);
}

/// QEMU's word that the port closed can come after the next life already said hello
/// (two sockets, no order between them): the host says hello again, the new agent
/// answers, and opens go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_word_of_the_closed_port_does_not_wedge_the_link() {
    let (port, host_end) = Port::new();
    let (host, _) = Mux::new(host_end, Side::Host);
    let (guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let _old = open_again(&host, ECHO).await;
    drop(guest);
    let (_guest, incoming) = Mux::new(port.attach().await, Side::Guest);
    echo(incoming);
    let _ = open_again(&host, ECHO).await;
    host.peer_closed("the guest closed its port");
    let channel = host.open(ECHO, Duration::from_secs(2)).await.unwrap();
    assert_eq!(round_trip(channel, b"late".to_vec()).await, b"late");
}

/// The mux works over any stream: here a Unix socket pair, as QEMU's chardev gives.
#[tokio::test]
async fn it_runs_over_a_unix_socket() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    fn check<T: AsyncRead + AsyncWrite + Send + 'static>(_: &T) {}
    check(&a);
    let (host, _) = Mux::new(a, Side::Host);
    let (_guest, incoming) = Mux::new(b, Side::Guest);
    echo(incoming);
    let channel = host.open(ECHO, OPEN).await.unwrap();
    assert_eq!(
        round_trip(channel, pattern(1 << 20, 5)).await,
        pattern(1 << 20, 5)
    );
}

/// FNV-1a, as the wire sums its header and payload.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A frame as a hostile peer writes it by hand (crates/serial/src/frame.rs's layout).
fn raw_frame(kind: u8, channel: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = b"VMX1".to_vec();
    out.extend_from_slice(&[kind, 0]);
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&fnv1a(payload).to_le_bytes());
    out
}

/// A peer that asks for an answer with every frame (an open this side refuses) and reads
/// none of them: this side queues its answers up to `MAX_QUEUED`, then ends the link
/// saying why, instead of holding more without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_nothing_cannot_make_this_side_queue_without_end() {
    let (h, mut g) = tokio::io::duplex(64 << 10);
    let (host, incoming) = Mux::new(h, Side::Host);
    drop(incoming); // this side accepts no channel: every open is refused
    // Each open (26 bytes) is answered by a refusal of about 60: 16 MiB of answers
    // need about 300,000 opens, 8 MiB written.
    let opens: Vec<u8> = (1..=400_000u32)
        .flat_map(|channel| raw_frame(3, channel * 2, &1025u32.to_le_bytes()))
        .collect();
    let began = Instant::now();
    let writing = tokio::spawn(async move {
        let _ = g.write_all(&opens).await;
        g
    });
    let err = loop {
        match host.open(ECHO, Duration::from_millis(200)).await {
            Err(Error::Closed { reason }) => break reason,
            _ => {
                assert!(
                    began.elapsed() < Duration::from_secs(60),
                    "the link still lives"
                );
            }
        }
    };
    assert!(err.contains("the other side reads nothing"), "{err}");
    assert!(
        err.contains(&format!("{} MiB", vmkit_serial::MAX_QUEUED >> 20)),
        "{err}"
    );
    drop(writing);
}
