//! `shutdown`: staged and bounded. The guest agent's `PowerOff` when an agent answers,
//! and the grace period; then the ACPI power button (`system_powerdown`) and the grace
//! period again; then QMP `quit`; then SIGTERM; then SIGKILL. QEMU is always reaped and its
//! socket removed; the [`ExitInfo`] names the stage that ended it. Idempotent: a second
//! or concurrent caller waits for the first and gets the same answer.

use std::time::Duration;

use vmkit_core::{Error as CoreError, ExitInfo, ExitReason, ShutdownStage, VmState};
use vmkit_qmp::qapi_qmp;

use crate::error::Error;
use crate::process::{Process, ProcessExit};
use crate::vm::Vm;

/// How long QEMU may take to exit after `quit` or SIGTERM (measured: 25 ms and 16 ms).
const FORCED_STAGE_WAIT: Duration = Duration::from_secs(1);
/// How long the kernel may take to end a SIGKILLed QEMU.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `shutdown`: the one stop of the VM, or the answer of the stop already under way.
pub(crate) async fn shutdown(vm: &Vm) -> vmkit_core::Result<ExitInfo> {
    let _stop = match vm.life().begin_shutdown().await {
        Ok(stop) => stop,
        // Ended before, by another caller's stop (whose stages are bounded), never
        // started, or by a start this stop cancelled: the answer is known.
        Err(info) => return Ok(info),
    };
    let Some(process) = vm.process() else {
        // Nothing was ever spawned (cannot happen after a successful start; kept total).
        return Ok(vm.end(ExitInfo::never_started()).await);
    };
    if let Some(exit) = process.exited() {
        // It was already gone (a crash, or the guest powered off) when we came.
        return Ok(vm.end(vm.unrequested_exit(exit).await).await);
    }
    let qmp = vm.qmp("shutdown").ok();
    let (stage, exit) = stop_in_stages(vm, &process, qmp).await;
    match exit {
        Some(exit) => Ok(vm.end(requested_exit(vm, stage, exit)).await),
        None => {
            let error = Error::Unkillable {
                pid: process.pid(),
                waited: KILL_WAIT,
            };
            let mut info = requested_exit(vm, ShutdownStage::Kill, ProcessExit::default());
            info.message = Some(error.to_string());
            vm.end(info).await;
            Err(CoreError::backend("shutdown", error))
        }
    }
}

/// The stage's [`ExitInfo`] once QEMU is gone during a `shutdown`.
fn requested_exit(vm: &Vm, stage: ShutdownStage, exit: ProcessExit) -> ExitInfo {
    // The graceful stages ask the guest, which then shuts itself down.
    let graceful = matches!(
        stage,
        ShutdownStage::GuestPowerOff | ShutdownStage::AcpiPowerdown
    );
    let reason = if graceful && vm.guest_initiated() {
        ExitReason::GuestShutdown
    } else {
        ExitReason::HostShutdown
    };
    ExitInfo {
        reason,
        stage: Some(stage),
        exit_code: exit.code,
        signal: exit.signal,
        message: None,
    }
}

/// The first stage: the guest agent powers the guest off (a clean kernel power-off, no
/// reliance on the guest's ACPI button handling), then QEMU exits within `grace`.
/// `None` when there is no live agent, it refuses or does not answer within
/// `timeout`, or the guest has not powered off within `grace`: the next stage follows.
async fn guest_power_off(
    vm: &Vm,
    process: &Process,
    grace: Duration,
    timeout: Duration,
) -> Option<ProcessExit> {
    let agent = vm.with_running(|r| r.live_agent().cloned()).flatten()?;
    let id = vm.id();
    let nanos = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
    let client = vmkit_proto::AgentClient::new(agent.client);
    let req = vmkit_proto::agent::PowerOffRequest::new();
    let call = client.power_off(ttrpc::context::with_timeout(nanos), &req);
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::info!(vm = %id, error = %e, "the agent refused PowerOff; trying ACPI");
            return None;
        }
        Err(_) => {
            tracing::info!(vm = %id, ?timeout, "the agent did not answer PowerOff; trying ACPI");
            return None;
        }
    }
    let exit = process.wait_timeout(grace).await;
    if exit.is_none() {
        tracing::info!(vm = %id, ?grace, "the guest did not power off; trying ACPI");
    }
    exit
}

/// Runs the stages until QEMU is gone; returns the stage that ended it and how it
/// ended (`None` if even SIGKILL did not end it within [`KILL_WAIT`]).
async fn stop_in_stages(
    vm: &Vm,
    process: &Process,
    qmp: Option<vmkit_qmp::QmpClient>,
) -> (ShutdownStage, Option<ProcessExit>) {
    let grace = vm.config().timeouts.shutdown_grace;
    let command_timeout = vm.config().timeouts.command.min(FORCED_STAGE_WAIT);
    let id = vm.id();
    if let Some(qmp) = &qmp {
        // A paused guest cannot act on the power button: go straight to quit. QEMU
        // says whether its vCPUs run (an earlier pause or resume may have timed out and
        // been carried out since); vmkit's state stands in when it cannot answer.
        let running = match qmp
            .execute_with_timeout(qapi_qmp::query_status {}, command_timeout)
            .await
        {
            Ok(status) => {
                vm.follow_qemu(status.running);
                status.running
            }
            Err(_) => vm.life().state() == VmState::Running,
        };
        if running && let Some(exit) = guest_power_off(vm, process, grace, command_timeout).await {
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
                    tracing::info!(vm = %id, ?grace, "guest ignored the ACPI power button; quitting QEMU");
                }
                Err(e) => {
                    tracing::info!(vm = %id, error = %e, "system_powerdown failed; quitting QEMU")
                }
            }
        }
        if let Err(e) = qmp
            .execute_with_timeout(qapi_qmp::quit {}, command_timeout)
            .await
        {
            // QEMU may close the socket before the reply: not a failure by itself.
            tracing::debug!(vm = %id, error = %e, "quit");
        }
        if let Some(exit) = process.wait_timeout(FORCED_STAGE_WAIT).await {
            return (ShutdownStage::Quit, Some(exit));
        }
        tracing::warn!(vm = %id, "QEMU still running after quit; sending SIGTERM");
    }
    process.signal(libc::SIGTERM);
    if let Some(exit) = process.wait_timeout(FORCED_STAGE_WAIT).await {
        return (ShutdownStage::Terminate, Some(exit));
    }
    tracing::warn!(vm = %id, "QEMU ignored SIGTERM; sending SIGKILL");
    process.signal(libc::SIGKILL);
    (ShutdownStage::Kill, process.wait_timeout(KILL_WAIT).await)
}
