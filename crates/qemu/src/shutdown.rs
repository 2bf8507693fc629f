//! `shutdown`: staged and bounded. The guest agent's `PowerOff` when an agent answers,
//! and the grace period; then the ACPI power button (`system_powerdown`) and the grace
//! period again; then QMP `quit`; then SIGTERM; then SIGKILL. QEMU is always reaped and its
//! socket removed; the [`ExitInfo`] names the stage that ended it. Idempotent: a second
//! or concurrent caller waits for the first and gets the same answer.

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::{Error as CoreError, ExitInfo, ShutdownStage, VmState};
use vmkit_qmp::qapi_qmp;

use crate::error::Error;
use crate::instance::{Shared, requested_exit};
use crate::process::Process;

/// How long QEMU may take to exit after `quit` or SIGTERM (measured: 25 ms and 16 ms).
const FORCED_STAGE_WAIT: Duration = Duration::from_secs(1);
/// How long the kernel may take to end a SIGKILLed QEMU.
const KILL_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn shutdown(shared: &Arc<Shared>) -> vmkit_core::Result<ExitInfo> {
    let first = {
        let mut life = shared.life();
        if let Some(info) = shared.exit_info() {
            return Ok(info);
        }
        !std::mem::replace(&mut life.shutting_down, true)
    };
    if !first {
        // The first caller's stages are bounded; its answer is ours.
        return Ok(shared.wait_exit().await);
    }
    // Tell everything in flight (a start, hot-plug jobs) that the VM is going away.
    shared.cancel.send_replace(true);
    // New → Shutdown as one compare-and-swap, so a racing `start` cannot slip in.
    if shared
        .transition("shutdown", VmState::New, VmState::Shutdown)
        .is_ok()
    {
        return Ok(shared.end(ExitInfo::never_started()).await);
    }
    if shared.state.get() == VmState::Starting {
        // The start was cancelled above; it releases everything and reports. If it
        // finished first, the VM is running and is stopped below.
        let mut exit = shared.exit.subscribe();
        let mut state_poll = tokio::time::interval(Duration::from_millis(5));
        loop {
            tokio::select! {
                _ = async { exit.wait_for(Option::is_some).await.map(|_| ()) } => {
                    return Ok(shared.wait_exit().await);
                }
                _ = state_poll.tick() => {
                    if shared.state.get() != VmState::Starting { break; }
                }
            }
        }
        if let Some(info) = shared.exit_info() {
            return Ok(info);
        }
    }
    let (process, qmp) = {
        let life = shared.life();
        (life.process.clone(), life.qmp.clone())
    };
    let Some(process) = process else {
        // Nothing was ever spawned (cannot happen after a successful start; kept total).
        return Ok(shared.end(ExitInfo::never_started()).await);
    };
    if let Some(exit) = process.exited() {
        // It was already gone (a crash, or the guest powered off) when we came.
        return Ok(shared.end(shared.unrequested_exit(exit).await).await);
    }
    let (stage, exit) = stop_in_stages(shared, &process, qmp).await;
    match exit {
        Some(exit) => Ok(shared.end(requested_exit(shared, stage, exit)).await),
        None => {
            let error = Error::Unkillable {
                pid: process.pid(),
                waited: KILL_WAIT,
            };
            let mut info = requested_exit(
                shared,
                ShutdownStage::Kill,
                crate::process::ProcessExit::default(),
            );
            info.message = Some(error.to_string());
            shared.end(info).await;
            Err(CoreError::backend("shutdown", error))
        }
    }
}

/// The first stage: the guest agent powers the guest off (a clean kernel power-off, no
/// reliance on the guest's ACPI button handling), then QEMU exits within `grace`.
/// `None` when there is no live agent, it refuses or does not answer within
/// `timeout`, or the guest has not powered off within `grace`: the next stage follows.
async fn guest_power_off(
    shared: &Shared,
    process: &Process,
    grace: Duration,
    timeout: Duration,
) -> Option<crate::process::ProcessExit> {
    let agent = shared.life().agent.clone().filter(|a| a.is_alive())?;
    let vm = &shared.config.id;
    let nanos = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
    let client = vmkit_proto::AgentClient::new(agent.client);
    let req = vmkit_proto::agent::PowerOffRequest::new();
    let call = client.power_off(ttrpc::context::with_timeout(nanos), &req);
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::info!(%vm, error = %e, "the agent refused PowerOff; trying ACPI");
            return None;
        }
        Err(_) => {
            tracing::info!(%vm, ?timeout, "the agent did not answer PowerOff; trying ACPI");
            return None;
        }
    }
    let exit = process.wait_timeout(grace).await;
    if exit.is_none() {
        tracing::info!(%vm, ?grace, "the guest did not power off; trying ACPI");
    }
    exit
}

/// Runs the stages until QEMU is gone; returns the stage that ended it and how it
/// ended (`None` if even SIGKILL did not end it within [`KILL_WAIT`]).
async fn stop_in_stages(
    shared: &Shared,
    process: &Process,
    qmp: Option<vmkit_qmp::QmpClient>,
) -> (ShutdownStage, Option<crate::process::ProcessExit>) {
    let grace = shared.config.timeouts.shutdown_grace;
    let command_timeout = shared.config.timeouts.command.min(FORCED_STAGE_WAIT);
    let vm = &shared.config.id;
    if let Some(qmp) = &qmp {
        // A paused guest cannot act on the power button: go straight to quit. QEMU
        // says whether its vCPUs run (an earlier pause or resume may have timed out and
        // been carried out since); vmkit's state stands in when it cannot answer.
        let running = match qmp
            .execute_with_timeout(qapi_qmp::query_status {}, command_timeout)
            .await
        {
            Ok(status) => {
                shared.follow_qemu(status.running);
                status.running
            }
            Err(_) => shared.state.get() == VmState::Running,
        };
        if running
            && let Some(exit) = guest_power_off(shared, process, grace, command_timeout).await
        {
            return (ShutdownStage::GuestPowerOff, Some(exit));
        }
        if running {
            match qmp
                .execute_with_timeout(qapi_qmp::system_powerdown {}, command_timeout)
                .await
            {
                Ok(_) => {
                    if let Some(exit) = process.wait_timeout(grace).await {
                        return (ShutdownStage::AcpiPowerdown, Some(exit));
                    }
                    tracing::info!(%vm, ?grace, "guest ignored the ACPI power button; quitting QEMU");
                }
                Err(e) => tracing::info!(%vm, error = %e, "system_powerdown failed; quitting QEMU"),
            }
        }
        if let Err(e) = qmp
            .execute_with_timeout(qapi_qmp::quit {}, command_timeout)
            .await
        {
            // QEMU may close the socket before the reply: not a failure by itself.
            tracing::debug!(%vm, error = %e, "quit");
        }
        if let Some(exit) = process.wait_timeout(FORCED_STAGE_WAIT).await {
            return (ShutdownStage::Quit, Some(exit));
        }
        tracing::warn!(%vm, "QEMU still running after quit; sending SIGTERM");
    }
    process.signal(libc::SIGTERM);
    if let Some(exit) = process.wait_timeout(FORCED_STAGE_WAIT).await {
        return (ShutdownStage::Terminate, Some(exit));
    }
    tracing::warn!(%vm, "QEMU ignored SIGTERM; sending SIGKILL");
    process.signal(libc::SIGKILL);
    (ShutdownStage::Kill, process.wait_timeout(KILL_WAIT).await)
}
