//! The `vmkit.agent.v1.Agent` service.

use async_trait::async_trait;
use ttrpc::Code;
use ttrpc::r#async::TtrpcContext;
use ttrpc::error::get_rpc_status;
use vmkit_proto::agent::{
    ExecRequest, ExecResponse, GuestInfoRequest, GuestInfoResponse, OnlineResourcesRequest,
    OnlineResourcesResponse, PingRequest, PingResponse, PowerOffRequest, PowerOffResponse,
    WaitResourcesRequest, WaitResourcesResponse,
};

use crate::exec::ExecError;
use crate::root::Root;

/// The longest ping payload echoed back.
const MAX_PING_PAYLOAD: usize = 64 << 10;

/// The service; `power_off` says whether `PowerOff` may really power off (only in a
/// guest, never in the `--unix` test mode); `root` is where `/proc` and `/sys` are read.
pub(crate) struct AgentService {
    power_off: bool,
    root: Root,
}

impl AgentService {
    pub(crate) fn new(power_off: bool, root: Root) -> AgentService {
        AgentService { power_off, root }
    }
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
        crate::exec::run(&req).await.map_err(|e| match e {
            ExecError::Invalid(reason) => {
                get_rpc_status(Code::INVALID_ARGUMENT, format!("exec: {reason}"))
            }
            ExecError::Spawn(reason) => get_rpc_status(Code::FAILED_PRECONDITION, reason),
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
        if !self.power_off {
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
}
