//! The `vmkit.agent.v1.Agent` service.

use async_trait::async_trait;
use std::sync::Arc;
use ttrpc::Code;
use ttrpc::r#async::TtrpcContext;
use ttrpc::error::get_rpc_status;

use vmkit_proto::agent::{
    CloseStdinRequest, CloseStdinResponse, ExecRequest, ExecResponse, GuestInfoRequest,
    GuestInfoResponse, ListProcessesRequest, ListProcessesResponse, MakeDirRequest,
    MakeDirResponse, MountRequest, MountResponse, OnlineResourcesRequest, OnlineResourcesResponse,
    PingRequest, PingResponse, PowerOffRequest, PowerOffResponse, ProcessEntry, ResizeTtyRequest,
    ResizeTtyResponse, SignalProcessRequest, SignalProcessResponse, SpawnProcessRequest,
    SpawnProcessResponse, UnmountRequest, UnmountResponse, WaitProcessRequest, WaitProcessResponse,
    WaitResourcesRequest, WaitResourcesResponse,
};

use crate::process::reaper::exit_fields;
use crate::process::spawn::{SpawnError, Spec};
use crate::process::{ProcError, Processes};
use crate::root::Root;

/// The longest ping payload echoed back.
const MAX_PING_PAYLOAD: usize = 64 << 10;

/// The service; `in_guest` says whether it runs in a guest: only there does `PowerOff`
/// really power off and do mounts and directories change anything (never in the `--unix`
/// test mode); `root` is where `/proc` and `/sys` are read.
pub(crate) struct AgentService {
    in_guest: bool,
    root: Root,
    processes: Arc<Processes>,
}

impl AgentService {
    pub(crate) fn new(in_guest: bool, root: Root, processes: Arc<Processes>) -> AgentService {
        AgentService {
            in_guest,
            root,
            processes,
        }
    }

    /// Mounts and directories change the guest's filesystem: in the host test mode they
    /// would change the host's, so there they are checked, then refused.
    fn in_guest_only(&self, call: &str) -> ttrpc::Result<()> {
        if self.in_guest {
            Ok(())
        } else {
            Err(status(
                call,
                ProcError::Precondition(
                    "refused outside a guest (the agent runs with --unix)".into(),
                ),
            ))
        }
    }
}

/// A process call's error as a TTRPC status, prefixed with the call.
fn status(call: &str, e: ProcError) -> ttrpc::Error {
    let (code, reason) = match e {
        ProcError::Invalid(r) => (Code::INVALID_ARGUMENT, r),
        ProcError::NotFound(r) => (Code::NOT_FOUND, r),
        ProcError::Precondition(r) => (Code::FAILED_PRECONDITION, r),
        ProcError::Exhausted(r) => (Code::RESOURCE_EXHAUSTED, r),
        ProcError::Failed(r) => (Code::INTERNAL, r),
    };
    get_rpc_status(code, format!("{call}: {reason}"))
}

#[async_trait]
impl vmkit_proto::Agent for AgentService {
    async fn ping(&self, _ctx: &TtrpcContext, req: PingRequest) -> ttrpc::Result<PingResponse> {
        if req.payload.len() > MAX_PING_PAYLOAD {
            return Err(get_rpc_status(
                Code::INVALID_ARGUMENT,
                format!(
                    "ping payload of {} bytes exceeds {MAX_PING_PAYLOAD}",
                    req.payload.len()
                ),
            ));
        }
        let mut resp = PingResponse::new();
        resp.payload = req.payload;
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.uptime_ms = crate::info::uptime_ms();
        Ok(resp)
    }

    async fn guest_info(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestInfoRequest,
    ) -> ttrpc::Result<GuestInfoResponse> {
        Ok(crate::info::guest_info(self.root.clone()).await)
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecRequest) -> ttrpc::Result<ExecResponse> {
        // The codes `Exec` always gave: a program or cwd that is not there is a
        // precondition here, not NOT_FOUND as in the process service.
        crate::exec::run(self.processes.reaper(), &req)
            .await
            .map_err(|e| match e {
                SpawnError::Invalid(reason) => {
                    get_rpc_status(Code::INVALID_ARGUMENT, format!("exec: {reason}"))
                }
                SpawnError::NotFound(reason) | SpawnError::Failed(reason) => {
                    get_rpc_status(Code::FAILED_PRECONDITION, reason)
                }
            })
    }

    async fn online_resources(
        &self,
        _ctx: &TtrpcContext,
        req: OnlineResourcesRequest,
    ) -> ttrpc::Result<OnlineResourcesResponse> {
        Ok(crate::online::online(&self.root, req.cpus, req.memory).await)
    }

    async fn wait_resources(
        &self,
        _ctx: &TtrpcContext,
        req: WaitResourcesRequest,
    ) -> ttrpc::Result<WaitResourcesResponse> {
        Ok(crate::wait::wait(req, self.root.clone()).await)
    }

    async fn power_off(
        &self,
        _ctx: &TtrpcContext,
        _req: PowerOffRequest,
    ) -> ttrpc::Result<PowerOffResponse> {
        if !self.in_guest {
            return Err(get_rpc_status(
                Code::FAILED_PRECONDITION,
                "power off: refused outside a guest (the agent runs with --unix)",
            ));
        }
        // Answer first, then power off: the reply must leave before the guest stops.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            // sync(2) may take a while: off the runtime's threads.
            let e = tokio::task::spawn_blocking(vmkit_platform::system::power_off)
                .await
                .unwrap_or_else(|e| std::io::Error::other(e.to_string()));
            crate::log_line(&format!("vmkit-agent: power off: {e}"));
        });
        Ok(PowerOffResponse::new())
    }

    async fn spawn_process(
        &self,
        _ctx: &TtrpcContext,
        req: SpawnProcessRequest,
    ) -> ttrpc::Result<SpawnProcessResponse> {
        let tty = req.tty.as_ref().map(|t| (t.rows, t.cols));
        let spec = Spec::new(
            req.argv,
            &req.env,
            &req.cwd,
            (req.uid, req.gid),
            tty,
            req.tag,
        )
        .map_err(|e| status("spawn", ProcError::from(e)))?;
        let (id, pid) = self.processes.spawn(spec).map_err(|e| status("spawn", e))?;
        let mut resp = SpawnProcessResponse::new();
        resp.id = id;
        resp.pid = pid;
        Ok(resp)
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self
            .processes
            .wait(req.id)
            .await
            .map_err(|e| status(&format!("wait {}", req.id), e))?;
        let mut resp = WaitProcessResponse::new();
        (resp.exit_code, resp.signal) = exit_fields(exit);
        Ok(resp)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        self.processes
            .signal(req.id, req.signal)
            .map_err(|e| status(&format!("signal {} to {}", req.signal, req.id), e))?;
        Ok(SignalProcessResponse::new())
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: ResizeTtyRequest,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        self.processes
            .resize(req.id, req.rows, req.cols)
            .map_err(|e| status(&format!("resize {}", req.id), e))?;
        Ok(ResizeTtyResponse::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        self.processes
            .close_stdin(req.id)
            .await
            .map_err(|e| status(&format!("close stdin of {}", req.id), e))?;
        Ok(CloseStdinResponse::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        _req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let mut resp = ListProcessesResponse::new();
        resp.processes = self
            .processes
            .list()
            .into_iter()
            .map(|p| {
                let mut entry = ProcessEntry::new();
                entry.id = p.id;
                entry.pid = p.pid;
                entry.argv = p.argv;
                entry.tag = p.tag;
                entry.tty = p.tty;
                entry.exited = p.exited;
                entry.buffered_bytes = p.buffered;
                entry
            })
            .collect();
        Ok(resp)
    }

    async fn mount(&self, _ctx: &TtrpcContext, req: MountRequest) -> ttrpc::Result<MountResponse> {
        let call = format!("mount at {}", req.target);
        let planned = crate::mount::plan(&req, &self.root).map_err(|e| status(&call, e))?;
        self.in_guest_only(&call)?;
        // virtio-fs sets DRIVER_OK (what GuestInfo's fs_devices waits for) just before
        // it registers the tag: a mount right after a hot-plug can find no such tag
        // (EINVAL) for a moment. A share's mount is tried again, for at most a second.
        let until = std::time::Instant::now() + crate::mount::TAG_SETTLE;
        loop {
            match crate::mount::mount(&planned) {
                Ok(()) => return Ok(MountResponse::new()),
                Err(_) if planned.waits_for_tag() && std::time::Instant::now() < until => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(status(&call, e)),
            }
        }
    }

    async fn unmount(
        &self,
        _ctx: &TtrpcContext,
        req: UnmountRequest,
    ) -> ttrpc::Result<UnmountResponse> {
        let call = format!("unmount {}", req.target);
        let target = crate::mount::plan_unmount(&req).map_err(|e| status(&call, e))?;
        self.in_guest_only(&call)?;
        crate::mount::unmount(&target, req.lazy).map_err(|e| status(&call, e))?;
        Ok(UnmountResponse::new())
    }

    async fn make_dir(
        &self,
        _ctx: &TtrpcContext,
        req: MakeDirRequest,
    ) -> ttrpc::Result<MakeDirResponse> {
        let call = format!("make dir {}", req.path);
        let (path, mode) = crate::mount::plan_make_dir(&req).map_err(|e| status(&call, e))?;
        self.in_guest_only(&call)?;
        crate::mount::make_dir(&path, mode).map_err(|e| status(&call, e))?;
        Ok(MakeDirResponse::new())
    }
}
