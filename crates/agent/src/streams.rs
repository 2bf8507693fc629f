//! Raw streams: a connection starts with a header line naming what it carries
//! (`vmkit_proto::StreamHeader`); the agent answers `OK` or `ERR <reason>`, and the
//! stream's bytes then travel in frames (`vmkit_proto::FramedStream`) so each side's
//! end of data survives transports without half-close.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vmkit_proto::{FramedStream, MAX_HEADER, StreamHeader, StreamReply};

use crate::Stop;
use crate::exec::{Spawned, spawn};
use crate::limits::Gate;
use crate::listen::{Conn, Listener};
use crate::process::input::Fed;
use crate::process::{Attached, Processes};

/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the host may take to close the connection once both ends were sent.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts streams forever; each connection is served on its own task, up to the
/// gate's limit (one more is closed at once).
pub(crate) async fn serve(listener: Listener, gate: Gate, stop: Stop, processes: Arc<Processes>) {
    loop {
        let conn = listener.accept_or_pause().await;
        let Some(admitted) = gate.admit() else {
            drop(conn);
            continue;
        };
        let processes = Arc::clone(&processes);
        tokio::spawn(stop.bounding(async move {
            handle(conn, &processes).await;
            drop(admitted);
        }));
    }
}

/// Reads the header line a byte at a time (the stream's own bytes may follow it).
async fn read_header(conn: &mut Box<dyn Conn>) -> Result<StreamHeader, String> {
    let mut line = Vec::with_capacity(64);
    while line.last() != Some(&b'\n') {
        if line.len() >= MAX_HEADER {
            return Err(format!("stream header longer than {MAX_HEADER} bytes"));
        }
        match conn.read_u8().await {
            Ok(b) => line.push(b),
            Err(e) => return Err(format!("read the stream header: {e}")),
        }
    }
    StreamHeader::parse(&line).map_err(|e| e.to_string())
}

async fn handle(mut conn: Box<dyn Conn>, processes: &Processes) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn)).await {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => return refuse(conn, &reason).await,
        Err(_) => return refuse(conn, "no stream header within 10 s").await,
    };
    match header {
        StreamHeader::Echo => {
            if conn.write_all(&StreamReply::Ok.encode()).await.is_err() {
                return;
            }
            let (mut read, mut write) = tokio::io::split(FramedStream::new(conn));
            let copied = tokio::io::copy(&mut read, &mut write).await;
            if copied.is_ok() && write.shutdown().await.is_ok() {
                linger(read.unsplit(write)).await;
            }
        }
        StreamHeader::Exec { argv } => exec_stream(conn, processes, &argv).await,
        StreamHeader::Attach { id, stream, from } => match processes.attach(id, stream, from) {
            Ok(attached) => attach(conn, attached).await,
            Err(e) => {
                let reason = format!("attach {id} {}: {}", stream.name(), e.into_reason());
                refuse(conn, &reason).await;
            }
        },
    }
}

/// Carries one stream of a process on the connection: an output until its end, the
/// host's bytes into its input until the host's end, or both for a TTY.
async fn attach(mut conn: Box<dyn Conn>, attached: Attached) {
    if conn.write_all(&StreamReply::Ok.encode()).await.is_err() {
        return;
    }
    let framed = FramedStream::new(conn);
    match attached {
        Attached::Output(output, attachment) => {
            let (read, mut write) = tokio::io::split(framed);
            if output.deliver(attachment, &mut write).await.is_ok() {
                linger(read.unsplit(write)).await;
            }
        }
        Attached::Input(entry) => {
            let (mut read, mut write) = tokio::io::split(framed);
            if entry.input().feed(&mut read).await == Fed::Closed && write.shutdown().await.is_ok()
            {
                linger(read.unsplit(write)).await;
            }
        }
        Attached::Tty(entry, output, attachment) => {
            let (mut read, mut write) = tokio::io::split(framed);
            // The host's keys go in until its end; the session ends with the output's
            // (so the keys never end the select).
            let keys = async {
                entry.input().feed(&mut read).await;
                std::future::pending::<()>().await;
            };
            let delivered = tokio::select! {
                delivered = output.deliver(attachment, &mut write) => delivered.is_ok(),
                () = keys => false,
            };
            if delivered {
                linger(read.unsplit(write)).await;
            }
        }
    }
}

/// Both ends are sent: wait (bounded) for the host to close, so nothing we sent is cut
/// off by our own close.
async fn linger(stream: FramedStream<Box<dyn Conn>>) {
    let mut conn = stream.into_inner();
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(1..) = conn.read(&mut sink).await {}
    })
    .await;
}

async fn refuse(mut conn: Box<dyn Conn>, reason: &str) {
    let _ = conn
        .write_all(&StreamReply::Err(reason.to_owned()).encode())
        .await;
    let _ = conn.shutdown().await;
}

/// The program's stdio over the stream: the stream's bytes go to stdin, stdout and
/// stderr come back as they are produced.
async fn exec_stream(mut conn: Box<dyn Conn>, processes: &Processes, argv: &[String]) {
    let Spawned {
        stdin,
        stdout,
        stderr,
        mut guard,
    } = match spawn(processes.reaper(), argv, &[], "/") {
        Ok(spawned) => spawned,
        Err(e) => return refuse(conn, &e.into_reason()).await,
    };
    if conn.write_all(&StreamReply::Ok.encode()).await.is_err() {
        return;
    }
    let (mut from_host, mut to_host) = tokio::io::split(FramedStream::new(conn));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let pumps = [
        Box::new(stdout) as Box<dyn AsyncRead + Send + Unpin>,
        Box::new(stderr),
    ];
    for mut out in pumps {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n @ 1..) = out.read(&mut buf).await {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    // The host's bytes to the program's stdin; its end frame closes stdin. Hands the
    // read half back for the final linger.
    let feeder = tokio::spawn(async move {
        let mut stdin = stdin;
        let _ = tokio::io::copy(&mut from_host, &mut stdin).await;
        from_host
    });
    let mut delivered = true;
    while let Some(chunk) = rx.recv().await {
        if to_host.write_all(&chunk).await.is_err() {
            delivered = false;
            break;
        }
    }
    let _ = guard.wait().await;
    if delivered
        && to_host.shutdown().await.is_ok()
        && let Ok(Ok(from_host)) = tokio::time::timeout(CLOSE_TIMEOUT, feeder).await
    {
        linger(from_host.unsplit(to_host)).await;
    }
}
