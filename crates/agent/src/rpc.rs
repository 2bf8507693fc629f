//! A lean TTRPC server for the agent's one service.
//!
//! The `ttrpc` crate's server spawns a task per request and passes every frame through
//! channels; under emulation (TCG guests) that made a `Ping` 2.7x the cost of a bare
//! echo round trip. This server speaks the same wire protocol (10-byte header, a
//! protobuf `ttrpc.Request`, a `ttrpc.Response` back) with the same generated
//! [`Agent`] trait as the contract, but answers `Ping` inline on the connection's task
//! and spawns only the calls that may take time. Every bad request gets a status with a
//! reason; only a connection whose bytes are not TTRPC at all is closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use protobuf::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, WriteHalf};
use tokio::sync::Mutex;
use ttrpc::r#async::TtrpcContext;
use ttrpc::proto::{
    GenMessage, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST, MessageHeader,
    Request, Response,
};
use ttrpc::{Code, Status, get_status};
use vmkit_proto::Agent;

use crate::limits::{Budget, Held, Limits, SMALL_BODY};
use crate::service::AgentService;

/// The service name in requests.
const SERVICE: &str = "vmkit.agent.v1.Agent";

type Writer<S> = Arc<Mutex<WriteHalf<S>>>;

/// Serves one connection until it closes, stops speaking TTRPC, stalls mid-frame or
/// idles past the limits (see [`crate::limits`]).
pub(crate) async fn serve<S>(conn: S, service: Arc<AgentService>, limits: Limits, budget: Budget)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(conn);
    // Header and body usually arrive together: one read syscall instead of two (each
    // syscall is expensive in an emulated guest).
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let writer: Writer<S> = Arc::new(Mutex::new(writer));
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        let (msg, held) = match read_frame(&mut reader, &limits, &budget, &in_flight).await {
            Frame::Whole(msg, held) => (msg, held),
            // Oversized: the body was discarded; tell the caller why.
            Frame::Oversized(header) => {
                let status = get_status(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "message length {} exceeds the maximum of {MESSAGE_LENGTH_MAX} bytes",
                        header.length
                    ),
                );
                if respond(&writer, header.stream_id, Err(status))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            // EOF, a stall, an idle connection: nothing sensible can follow.
            Frame::End => return,
        };
        if msg.header.type_ != MESSAGE_TYPE_REQUEST {
            continue; // streaming DATA frames: this service has no streaming methods
        }
        let stream_id = msg.header.stream_id;
        let request = match Request::parse_from_bytes(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                let status =
                    get_status(Code::INVALID_ARGUMENT, format!("Unpack request error {e}"));
                if respond(&writer, stream_id, Err(status)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        drop(msg.payload);
        if request.method == "Ping" {
            // The liveness probe: answered here, no task, no channel.
            let answer = call(&service, msg.header, request).await;
            drop(held);
            if respond(&writer, stream_id, answer).await.is_err() {
                return;
            }
        } else {
            let (service, writer) = (Arc::clone(&service), Arc::clone(&writer));
            let busy = InFlight::enter(&in_flight);
            tokio::spawn(async move {
                let answer = call(&service, msg.header, request).await;
                // The request's bytes count against the budget until it is answered.
                drop(held);
                let _ = respond(&writer, stream_id, answer).await;
                drop(busy);
            });
        }
    }
}

/// What reading the next frame gave.
enum Frame {
    /// A whole frame, and the budget its body holds.
    Whole(GenMessage, Held),
    /// A frame over TTRPC's limit, whose body was read and dropped.
    Oversized(MessageHeader),
    /// The connection ended, stalled mid-frame, or idled out.
    End,
}

/// The next frame when it is wholly in `reader`'s buffer and its body needs no budget
/// (at most [`SMALL_BODY`]); `None` otherwise, for the bounded slow path.
fn buffered_small_frame<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Option<Frame> {
    let buffered = reader.buffer();
    let header = MessageHeader::from(buffered.get(..MESSAGE_HEADER_LENGTH)?);
    let len = usize::try_from(header.length)
        .ok()
        .filter(|l| *l <= SMALL_BODY)?;
    let payload = buffered
        .get(MESSAGE_HEADER_LENGTH..MESSAGE_HEADER_LENGTH + len)?
        .to_vec();
    reader.consume(MESSAGE_HEADER_LENGTH + len);
    Some(Frame::Whole(GenMessage { header, payload }, Held::none()))
}

/// Counts a connection's calls in flight; an idle connection is one with none.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one frame within the limits: waits up to the idle timeout for it to begin
/// (for ever while calls are in flight), holds budget for its body before reading it,
/// and reads the rest within the frame timeout, growing the body as bytes arrive.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limits: &Limits,
    budget: &Budget,
    in_flight: &AtomicUsize,
) -> Frame {
    while reader.buffer().is_empty() {
        match tokio::time::timeout(limits.idle_timeout, reader.fill_buf()).await {
            Ok(Ok([])) | Ok(Err(_)) => return Frame::End,
            Ok(Ok(_)) => {}
            Err(_) if in_flight.load(Ordering::SeqCst) > 0 => {}
            Err(_) => return Frame::End,
        }
    }
    // The usual case: a small frame already whole in the buffer (one read brought it),
    // taken without a timer (timers are dear in an emulated guest).
    if let Some(frame) = buffered_small_frame(reader) {
        return frame;
    }
    let frame = async {
        let header = MessageHeader::read_from(&mut *reader).await.ok()?;
        let len = usize::try_from(header.length).unwrap_or(usize::MAX);
        if len > MESSAGE_LENGTH_MAX {
            let mut rest = (&mut *reader).take(u64::from(header.length));
            let discarded = tokio::io::copy(&mut rest, &mut tokio::io::sink())
                .await
                .ok()?;
            return (discarded == u64::from(header.length)).then_some(Err(header));
        }
        Some(Ok(header))
    };
    let header = match tokio::time::timeout(limits.frame_timeout, frame).await {
        Ok(Some(Ok(header))) => header,
        Ok(Some(Err(oversized))) => return Frame::Oversized(oversized),
        Ok(None) | Err(_) => return Frame::End,
    };
    let len = usize::try_from(header.length).unwrap_or(usize::MAX);
    let held = budget.hold(len).await;
    let body = async {
        let mut body = Vec::new();
        while body.len() < len {
            if body.len() == body.capacity() {
                // Double, from 64 KiB, but never past the declared length.
                let grow = (len - body.len()).min(body.capacity().max(64 << 10));
                body.reserve_exact(grow);
            }
            let room = u64::try_from(body.capacity() - body.len()).unwrap_or(u64::MAX);
            let n = (&mut *reader).take(room).read_buf(&mut body).await.ok()?;
            if n == 0 {
                return None;
            }
        }
        Some(body)
    };
    match tokio::time::timeout(limits.frame_timeout, body).await {
        Ok(Some(payload)) => Frame::Whole(GenMessage { header, payload }, held),
        Ok(None) | Err(_) => Frame::End,
    }
}

/// Runs one request against the service, within its timeout.
async fn call(
    service: &AgentService,
    header: MessageHeader,
    request: Request,
) -> Result<Vec<u8>, Status> {
    if request.service != SERVICE {
        return Err(get_status(
            Code::NOT_FOUND,
            format!("/{}/{} is not supported", request.service, request.method),
        ));
    }
    let ctx = TtrpcContext {
        mh: header,
        metadata: HashMap::new(),
        timeout_nano: request.timeout_nano,
        connection_data: Arc::default(),
    };
    let work = dispatch(service, &ctx, &request.method, &request.payload);
    match u64::try_from(request.timeout_nano) {
        // Ping cannot wait on anything: no timer for it (timers are dear in emulation).
        _ if request.method == "Ping" => work.await,
        Ok(nanos) if nanos > 0 => tokio::time::timeout(Duration::from_nanos(nanos), work)
            .await
            .unwrap_or_else(|_| {
                Err(get_status(
                    Code::DEADLINE_EXCEEDED,
                    format!("{} ran out of its {}ns", request.method, nanos),
                ))
            }),
        _ => work.await,
    }
}

/// Decodes the payload for `method`, calls it, encodes the answer.
async fn dispatch(
    service: &AgentService,
    ctx: &TtrpcContext,
    method: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Status> {
    macro_rules! unary {
        ($call:ident) => {{
            let req = protobuf::Message::parse_from_bytes(payload).map_err(|e| {
                get_status(
                    Code::INVALID_ARGUMENT,
                    format!("{method}: cannot decode the request: {e}"),
                )
            })?;
            let resp = service.$call(ctx, req).await.map_err(to_status)?;
            resp.write_to_bytes().map_err(|e| {
                get_status(
                    Code::INTERNAL,
                    format!("{method}: cannot encode the answer: {e}"),
                )
            })
        }};
    }
    match method {
        "Ping" => unary!(ping),
        "GuestInfo" => unary!(guest_info),
        "Exec" => unary!(exec),
        "OnlineResources" => unary!(online_resources),
        "WaitResources" => unary!(wait_resources),
        "PowerOff" => unary!(power_off),
        "SpawnProcess" => unary!(spawn_process),
        "WaitProcess" => unary!(wait_process),
        "SignalProcess" => unary!(signal_process),
        "ResizeTty" => unary!(resize_tty),
        "CloseStdin" => unary!(close_stdin),
        "ListProcesses" => unary!(list_processes),
        "Mount" => unary!(mount),
        "Unmount" => unary!(unmount),
        "MakeDir" => unary!(make_dir),
        other => Err(get_status(
            Code::NOT_FOUND,
            format!("/{SERVICE}/{other} is not supported"),
        )),
    }
}

fn to_status(e: ttrpc::Error) -> Status {
    match e {
        ttrpc::Error::RpcStatus(status) => status,
        other => get_status(Code::INTERNAL, other.to_string()),
    }
}

/// Writes the response for `stream_id`: the payload, or the error status.
async fn respond<S: AsyncWrite>(
    writer: &Writer<S>,
    stream_id: u32,
    answer: Result<Vec<u8>, Status>,
) -> std::io::Result<()> {
    let mut response = Response::new();
    match answer {
        Ok(payload) => {
            response.set_status(get_status(Code::OK, ""));
            response.payload = payload;
        }
        Err(status) => response.set_status(status),
    }
    let payload = response
        .write_to_bytes()
        .map_err(|e| std::io::Error::other(format!("encode a response: {e}")))?;
    let too_big = payload.len() > ttrpc::proto::MESSAGE_LENGTH_MAX;
    let payload = if too_big {
        let mut small = Response::new();
        small.set_status(get_status(
            Code::RESOURCE_EXHAUSTED,
            format!(
                "the answer is {} bytes; TTRPC carries at most {}",
                payload.len(),
                ttrpc::proto::MESSAGE_LENGTH_MAX
            ),
        ));
        small
            .write_to_bytes()
            .map_err(|e| std::io::Error::other(format!("encode a response: {e}")))?
    } else {
        payload
    };
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let msg = GenMessage {
        header: MessageHeader::new_response(stream_id, len),
        payload,
    };
    let mut writer = writer.lock().await;
    msg.write_to(&mut *writer)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(stream_id: u32, body: &[u8]) -> Vec<u8> {
        let header = MessageHeader::new_request(stream_id, u32::try_from(body.len()).unwrap());
        let mut bytes = Vec::<u8>::from(header);
        bytes.extend_from_slice(body);
        bytes
    }

    /// Frames come out whole and in order whether they arrive together in one read
    /// (the buffered path), cut into pieces, or over the small-body size (the bounded
    /// path with the budget).
    #[tokio::test]
    async fn frames_are_read_whole_however_they_arrive() {
        let (mut host, agent) = tokio::io::duplex(1 << 20);
        let mut reader = BufReader::with_capacity(64 << 10, agent);
        let (limits, budget) = (Limits::default(), Budget::new(1 << 20));
        let idle = AtomicUsize::new(0);
        let big = vec![7u8; SMALL_BODY + 10];
        let mut wire = frame(1, b"one");
        wire.extend(frame(3, b"two"));
        host.write_all(&wire).await.unwrap();
        let writer = tokio::spawn(async move {
            let cut = frame(5, b"three");
            host.write_all(&cut[..4]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            host.write_all(&cut[4..]).await.unwrap();
            host.write_all(&frame(7, &big)).await.unwrap();
            host
        });
        let mut seen = Vec::new();
        for _ in 0..4 {
            match read_frame(&mut reader, &limits, &budget, &idle).await {
                Frame::Whole(msg, _) => seen.push((msg.header.stream_id, msg.payload.len())),
                _ => panic!("a frame was lost"),
            }
        }
        assert_eq!(seen, [(1, 3), (3, 3), (5, 5), (7, SMALL_BODY + 10)]);
        drop(writer.await.unwrap());
        assert!(matches!(
            read_frame(&mut reader, &limits, &budget, &idle).await,
            Frame::End
        ));
    }
}
