//! The agent binary on the host (`--unix`): every call, and bad input that must get an
//! error while the agent keeps serving. (In a real guest over vsock: vmkit-qemu's tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context;
use vmkit_proto::agent::{
    ExecRequest, GuestInfoRequest, OnlineResourcesRequest, PingRequest, PowerOffRequest,
    WaitResourcesRequest,
};
use vmkit_proto::{AgentClient, FramedStream};

/// The agent serving in a temp dir; killed when dropped.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    async fn start() -> Agent {
        Agent::start_with(&[]).await
    }

    /// The agent with extra arguments (its limits).
    async fn start_with(args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vmkit-agent"))
            .arg("--unix")
            .arg(dir.path())
            .args(args)
            .spawn()
            .unwrap();
        let agent = Agent { child, dir };
        let began = Instant::now();
        while !agent.stream_path().exists() || !agent.ttrpc_path().exists() {
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "the agent never listened"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        agent
    }

    fn ttrpc_path(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn stream_path(&self) -> PathBuf {
        self.dir.path().join("stream.sock")
    }

    async fn client(&self) -> AgentClient {
        let client =
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.ttrpc_path().display()))
                .await
                .unwrap();
        AgentClient::new(client)
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    let mut req = ExecRequest::new();
    req.argv = argv.iter().map(|s| (*s).to_owned()).collect();
    req
}

/// The status code and message of a failed call.
fn status(err: ttrpc::Error) -> (ttrpc::Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_guest_info_report_what_the_host_sees() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut req = PingRequest::new();
    req.payload = b"hello".to_vec();
    let pong = client.ping(ctx(), &req).await.unwrap();
    assert_eq!(pong.payload, b"hello");
    assert_eq!(pong.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(pong.uptime_ms > 0);

    let info = client
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(info.kernel_release, release.trim());
    assert!(!info.online_cpus.is_empty());
    assert!(info.mem_total_bytes > 0);
    assert!(info.memory_block_size_bytes > 0 && info.mem_online_bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_exit_code_output_and_honours_stdin_env_and_cwd() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut req = exec_req(&[
        "sh",
        "-c",
        "echo out $GREETING; pwd; cat; echo err >&2; exit 3",
    ]);
    req.env = vec!["GREETING=hi".into()];
    req.cwd = "/tmp".into();
    req.stdin = b"from stdin\n".to_vec();
    let resp = client.exec(ctx(), &req).await.unwrap();
    assert_eq!(resp.exit_code, 3);
    assert_eq!(
        String::from_utf8_lossy(&resp.stdout),
        "out hi\n/tmp\nfrom stdin\n"
    );
    assert_eq!(resp.stderr, b"err\n");
    assert!(!resp.timed_out && !resp.stdout_truncated);

    let killed = client
        .exec(ctx(), &exec_req(&["sh", "-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!((killed.exit_code, killed.signal), (-1, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_times_out_and_truncates_without_hanging() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut slow = exec_req(&["sleep", "30"]);
    slow.timeout_ms = 200;
    let began = Instant::now();
    let resp = client.exec(ctx(), &slow).await.unwrap();
    assert!(resp.timed_out);
    assert_eq!(resp.signal, 9);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );

    let big = client
        .exec(ctx(), &exec_req(&["head", "-c", "3000000", "/dev/zero"]))
        .await
        .unwrap();
    assert_eq!(big.exit_code, 0);
    assert_eq!(big.stdout.len(), 1 << 20);
    assert!(big.stdout_truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_reasons_and_the_agent_keeps_serving() {
    let agent = Agent::start().await;
    let client = agent.client().await;

    let (code, msg) = status(client.exec(ctx(), &exec_req(&[])).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (ttrpc::Code::INVALID_ARGUMENT, "exec: argv is empty")
    );
    let (code, msg) = status(
        client
            .exec(ctx(), &exec_req(&["/nonexistent/prog"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(
        msg.starts_with("program /nonexistent/prog: no such file"),
        "{msg}"
    );
    let mut bad_env = exec_req(&["true"]);
    bad_env.env = vec!["NOEQUALS".into()];
    let (_, msg) = status(client.exec(ctx(), &bad_env).await.unwrap_err());
    assert_eq!(msg, "exec: env[0] \"NOEQUALS\" is not KEY=VALUE");

    let mut huge_ping = PingRequest::new();
    huge_ping.payload = vec![0; 100 << 10];
    let (code, msg) = status(client.ping(ctx(), &huge_ping).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(msg, "ping payload of 102400 bytes exceeds 65536");

    // Over ttrpc's 4 MiB message limit: refused, and the connection still works... or
    // is dropped; either way a new one must be served.
    let mut huge = exec_req(&["cat"]);
    huge.stdin = vec![b'x'; 5 << 20];
    assert!(client.exec(ctx(), &huge).await.is_err());

    // A payload that is not the method's message.
    let raw = ttrpc::r#async::Client::connect(&format!("unix://{}", agent.ttrpc_path().display()))
        .await
        .unwrap();
    let mut request = ttrpc::Request::new();
    request.service = "vmkit.agent.v1.Agent".into();
    request.method = "Exec".into();
    request.payload = vec![0xff; 64];
    request.timeout_nano = 5_000_000_000;
    let reply = raw.request(request).await;
    let reply_status = match reply {
        Ok(resp) => resp.status.into_option(),
        Err(ttrpc::Error::RpcStatus(s)) => Some(s),
        Err(other) => panic!("{other:?}"),
    };
    let reply_status = reply_status.expect("an error status for an undecodable request");
    assert_eq!(reply_status.code(), ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(
        reply_status.message(),
        "Exec: cannot decode the request: Incorrect varint"
    );

    // A method the service does not have.
    let mut unknown = ttrpc::Request::new();
    unknown.service = "vmkit.agent.v1.Agent".into();
    unknown.method = "Reboot".into();
    unknown.timeout_nano = 5_000_000_000;
    let status = match raw.request(unknown).await {
        Ok(resp) => resp.status.into_option(),
        Err(ttrpc::Error::RpcStatus(s)) => Some(s),
        Err(other) => panic!("{other:?}"),
    }
    .expect("a status for an unknown method");
    assert_eq!(
        (status.code(), status.message()),
        (
            ttrpc::Code::NOT_FOUND,
            "/vmkit.agent.v1.Agent/Reboot is not supported"
        )
    );

    // Bytes that are not TTRPC at all, on a connection of their own.
    let mut junk = UnixStream::connect(agent.ttrpc_path()).await.unwrap();
    junk.write_all(&[0xde; 4096]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(300), junk.read_to_end(&mut sink)).await;

    // Still serving, old clients and new.
    let fresh = agent.client().await;
    fresh.ping(ctx(), &PingRequest::new()).await.unwrap();
    client.ping(ctx(), &PingRequest::new()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_is_refused_outside_a_guest_and_online_finds_nothing_to_do() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let (code, msg) = status(
        client
            .power_off(ctx(), &PowerOffRequest::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(
        msg.starts_with("power off: refused outside a guest"),
        "{msg}"
    );
    // Reading sysfs only: on the host nothing is offline that the request covers,
    // or the failures say why; either way the call answers.
    let mut req = OnlineResourcesRequest::new();
    req.cpus = false;
    req.memory = false;
    let resp = client.online_resources(ctx(), &req).await.unwrap();
    assert!(resp.cpus_onlined.is_empty() && resp.memory_blocks_onlined.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_resources_answers_at_once_when_met_and_at_its_timeout_when_not() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    // What the host has (cpu0 is always online): met on the first look.
    let mut req = WaitResourcesRequest::new();
    req.cpus = vec![0];
    req.mem_total_at_least = 1 << 20;
    req.timeout_ms = 5_000;
    let began = Instant::now();
    let resp = client.wait_resources(ctx(), &req).await.unwrap();
    assert!(resp.reached, "{resp:?}");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    let host_cpus = resp.online_cpus;
    assert_eq!(host_cpus.first(), Some(&0));
    assert!(resp.mem_total_bytes >= 1 << 20);

    // A CPU the host does not have and more memory than it has: not met, and the
    // answer comes at the timeout, with what the guest had.
    for (cpus, floor) in [(vec![4096], 0), (vec![], u64::MAX)] {
        let mut req = WaitResourcesRequest::new();
        req.cpus = cpus;
        req.mem_total_at_least = floor;
        req.timeout_ms = 300;
        let began = Instant::now();
        let resp = client.wait_resources(ctx(), &req).await.unwrap();
        let took = began.elapsed();
        assert!(!resp.reached, "{resp:?}");
        assert!(
            (Duration::from_millis(300)..Duration::from_secs(3)).contains(&took),
            "{took:?}"
        );
        assert!(resp.waited_ms >= 300, "{resp:?}");
        assert_eq!(resp.online_cpus, host_cpus);
    }
}

async fn stream(path: &Path, header: &[u8]) -> (FramedStream<UnixStream>, String) {
    let mut conn = UnixStream::connect(path).await.unwrap();
    conn.write_all(header).await.unwrap();
    let mut reply = Vec::new();
    while reply.last() != Some(&b'\n') {
        reply.push(conn.read_u8().await.unwrap());
    }
    (FramedStream::new(conn), String::from_utf8(reply).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_echo_and_carry_a_programs_stdio_and_refuse_bad_headers() {
    let agent = Agent::start().await;
    let (mut echo, reply) = stream(&agent.stream_path(), b"VMKIT-STREAM/1 echo\n").await;
    assert_eq!(reply, "OK\n");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = tokio::io::split(&mut echo);
    let send = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, got) = tokio::join!(send, read.read_to_end(&mut back));
    got.unwrap();
    assert!(back == payload, "echo changed the bytes");

    let (mut exec, reply) = stream(
        &agent.stream_path(),
        b"VMKIT-STREAM/1 exec [\"sh\",\"-c\",\"tr a-z A-Z; echo done >&2\"]\n",
    )
    .await;
    assert_eq!(reply, "OK\n");
    exec.write_all(b"shout\n").await.unwrap();
    exec.shutdown().await.unwrap();
    let mut out = String::new();
    exec.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "SHOUT\ndone\n");

    let (_, reply) = stream(&agent.stream_path(), b"VMKIT-STREAM/1 tar\n").await;
    assert_eq!(
        reply,
        "ERR unknown stream kind \"tar\" (known: echo, exec, attach)\n"
    );
    // The process service knows no process 3.
    let (_, reply) = stream(&agent.stream_path(), b"VMKIT-STREAM/1 attach 3 stdout\n").await;
    assert_eq!(reply, "ERR attach 3 stdout: no process 3\n");
    let (_, reply) = stream(&agent.stream_path(), b"VMKIT-STREAM/1 exec [\"/nope\"]\n").await;
    assert!(
        reply.starts_with("ERR program /nope: no such file"),
        "{reply}"
    );
    let (_, reply) = stream(&agent.stream_path(), &[b'x'; 5000]).await;
    assert_eq!(reply, "ERR stream header longer than 4096 bytes\n");
}

/// The agent process's peak resident memory, in bytes.
fn peak_rss(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// Whether the agent closed `conn` (reads EOF) within `within`.
async fn closed_within(conn: &mut UnixStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, conn.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Issue 12, defect 8: the agent allocated every request's declared length before the
/// bytes arrived, and had no limit on connections or time: 80 connections holding
/// 4 MiB each got it OOM-killed in a 256 MiB guest. Now large bodies share a budget
/// (16 MiB), grow as they arrive, and a stalled frame is dropped after the frame
/// timeout; `Ping` on a fresh connection is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_stalled_requests_neither_exhausts_memory_nor_starves_ping() {
    let agent =
        Agent::start_with(&["--max-connections", "100", "--frame-timeout-ms", "1500"]).await;
    let client = agent.client().await;
    client.ping(ctx(), &PingRequest::new()).await.unwrap();
    let before = peak_rss(&agent);
    let body = std::sync::Arc::new(vec![b'x'; (4 << 20) - 1]);
    let mut flood = Vec::new();
    for _ in 0..80 {
        let mut conn = UnixStream::connect(agent.ttrpc_path()).await.unwrap();
        let body = std::sync::Arc::clone(&body);
        flood.push(tokio::spawn(async move {
            // A 4 MiB request whose last byte never comes.
            let header = ttrpc::proto::MessageHeader::new_request(1, 4 << 20);
            let _ = conn.write_all(&Vec::<u8>::from(header)).await;
            let _ = conn.write_all(&body).await;
            conn
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fresh connection's Ping is answered while the flood holds the budget.
    let began = Instant::now();
    agent
        .client()
        .await
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = peak_rss(&agent).saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the agent's peak memory grew by {} MiB for 80 stalled 4 MiB requests",
        grown >> 20
    );
    for task in flood {
        task.abort();
    }
    client.ping(ctx(), &PingRequest::new()).await.unwrap();
}

/// A connection beyond `--max-connections` is closed at once; once one ends, a new one
/// is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let agent = Agent::start_with(&["--max-connections", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(UnixStream::connect(agent.ttrpc_path()).await.unwrap());
    }
    let mut extra = UnixStream::connect(agent.ttrpc_path()).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "the 4th connection stayed open"
    );
    for conn in &mut held {
        assert!(
            !closed_within(conn, Duration::from_millis(50)).await,
            "an admitted one was closed"
        );
    }
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent
        .client()
        .await
        .ping(ctx(), &PingRequest::new())
        .await
        .unwrap();
}

/// A silent connection is closed after the idle timeout; one with a call in flight is
/// not, and gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let agent = Agent::start_with(&["--idle-timeout-ms", "400"]).await;
    let mut silent = UnixStream::connect(agent.ttrpc_path()).await.unwrap();
    let began = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)).await,
        "never closed"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(350),
        "{:?}",
        began.elapsed()
    );
    let client = agent.client().await;
    let slow = client
        .exec(ctx(), &exec_req(&["sh", "-c", "sleep 1; echo done"]))
        .await
        .unwrap();
    assert_eq!(
        slow.stdout, b"done\n",
        "the answer came after more than the idle timeout"
    );
}

/// Writes `text` to `root/rel`, making its directories.
fn put(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_root_the_agent_reports_and_onlines_what_its_files_say() {
    let guest = tempfile::tempdir().unwrap();
    let g = guest.path();
    put(g, "proc/sys/kernel/osrelease", "6.1.0-fake\n");
    put(g, "proc/meminfo", "MemTotal:         262144 kB\n");
    put(g, "sys/devices/system/cpu/online", "0-1\n");
    put(g, "sys/devices/system/cpu/cpu2/online", "0\n");
    put(g, "sys/devices/system/memory/block_size_bytes", "8000000\n");
    put(g, "sys/devices/system/memory/memory0/online", "1\n");
    put(g, "sys/block/vda/size", "2048\n");
    put(g, "sys/block/vda/serial", "data-1\n");
    let root = g.display().to_string();
    let agent = Agent::start_with(&["--root", &root]).await;
    let client = agent.client().await;
    let info = client
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    assert_eq!(info.kernel_release, "6.1.0-fake");
    assert_eq!(info.online_cpus, [0, 1]);
    assert_eq!(info.mem_total_bytes, 256 << 20);
    assert_eq!(info.memory_block_size_bytes, 128 << 20);
    assert_eq!(info.mem_online_bytes, 128 << 20);
    assert_eq!(info.disks.len(), 1, "{:?}", info.disks);
    assert_eq!(
        (info.disks[0].name.as_str(), info.disks[0].serial.as_str()),
        ("vda", "data-1")
    );
    assert_eq!(info.disks[0].size_bytes, 1 << 20);
    // A wait for cpu2 onlines it (its `online` file) and is met once the kernel's list
    // (here: whoever keeps the files) shows it.
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut req = WaitResourcesRequest::new();
            req.cpus = vec![2];
            req.online = true;
            req.timeout_ms = 5_000;
            client.wait_resources(ctx(), &req).await.unwrap()
        })
    };
    let cpu2 = g.join("sys/devices/system/cpu/cpu2/online");
    let began = Instant::now();
    while std::fs::read_to_string(&cpu2).unwrap().trim() != "1" {
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "cpu2 never onlined"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    put(g, "sys/devices/system/cpu/online", "0-2\n");
    let resp = waiter.await.unwrap();
    assert!(resp.reached, "{resp:?}");
    assert_eq!(resp.online_cpus, [0, 1, 2]);
}

/// A process outlives the TTRPC connection that spawned it and the streams attached to
/// it: a second connection feeds its stdin, reads its output from where the first left
/// off, and waits for it; a second wait gives the same status; the process is then
/// gone from the list, and a signal to it is refused naming its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_outlives_the_connections_that_started_it() {
    use vmkit_proto::agent::{
        ListProcessesRequest, SignalProcessRequest, SpawnProcessRequest, WaitProcessRequest,
    };
    let agent = Agent::start().await;
    let first = agent.client().await;
    let mut spawn = SpawnProcessRequest::new();
    spawn.argv = ["sh", "-c", "echo early; read x; echo \"got $x\"; exit 5"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    spawn.tag = "outlives".into();
    let spawned = first.spawn_process(ctx(), &spawn).await.unwrap();
    let id = spawned.id;
    let header = |stream: &str, from: u64| {
        format!("VMKIT-STREAM/1 attach {id} {stream} from={from}\n").into_bytes()
    };
    let (mut out, reply) = stream(&agent.stream_path(), &header("stdout", 0)).await;
    assert_eq!(reply, "OK\n");
    let mut early = [0u8; 6];
    out.read_exact(&mut early).await.unwrap();
    assert_eq!(&early, b"early\n");
    // Everything of the first host goes away.
    drop((first, out));

    let second = agent.client().await;
    let listed = second
        .list_processes(ctx(), &ListProcessesRequest::new())
        .await
        .unwrap();
    assert_eq!(listed.processes.len(), 1);
    assert_eq!(listed.processes[0].tag, "outlives");
    assert!(!listed.processes[0].exited);
    let (mut stdin, reply) = stream(&agent.stream_path(), &header("stdin", 0)).await;
    assert_eq!(reply, "OK\n");
    stdin.write_all(b"more\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let (mut out, reply) = stream(&agent.stream_path(), &header("stdout", 6)).await;
    assert_eq!(reply, "OK\n");
    let (mut err, _) = stream(&agent.stream_path(), &header("stderr", 0)).await;
    let mut rest = String::new();
    let mut errors = Vec::new();
    let mut wait = WaitProcessRequest::new();
    wait.id = id;
    let (read, _, waited) = tokio::join!(
        out.read_to_string(&mut rest),
        err.read_to_end(&mut errors),
        second.wait_process(ctx(), &wait)
    );
    read.unwrap();
    assert_eq!(rest, "got more\n");
    assert_eq!(waited.unwrap().exit_code, 5);
    let again = second.wait_process(ctx(), &wait).await.unwrap();
    assert_eq!(again.exit_code, 5, "a second wait gives the same status");
    let listed = second
        .list_processes(ctx(), &ListProcessesRequest::new())
        .await
        .unwrap();
    assert!(listed.processes.is_empty());
    let mut signal = SignalProcessRequest::new();
    signal.id = id;
    signal.signal = 15;
    let (code, msg) = status(second.signal_process(ctx(), &signal).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(msg.contains("has ended (exit code 5)"), "{msg}");
}
