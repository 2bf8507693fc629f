//! Ejecting a device: `device_del`, then waiting until QEMU no longer lists it. The
//! guest answers an ACPI eject request with `_OST`; a refusal ends the wait at once
//! with the guest's reason instead of at the deadline.

use std::future::Future;

use tokio::sync::broadcast;
use tokio::time::{Instant, sleep};
use vmkit_core::{Error as CoreError, VmEvent};

use super::context::{Context, POLL, qmp_err};
use crate::error::Error;

/// The `_OST` source code of an eject request (ACPI 6.5, 6.3.5).
const OST_EJECT_REQUEST: u64 = 0x03;
/// The `_OST` status "ejection is in progress": not an answer yet.
const OST_EJECT_IN_PROGRESS: u64 = 0x84;

/// The guest's refusal to eject device `id`, when `event` is one: an `ACPI_DEVICE_OST`
/// answering an eject request with a failure status.
fn ost_refusal(event: &VmEvent, id: &str) -> Option<Error> {
    let VmEvent::Other { name, data } = event else {
        return None;
    };
    let info = data.get("info")?;
    if name != "ACPI_DEVICE_OST"
        || info.get("device")?.as_str()? != id
        || info.get("source")?.as_u64()? != OST_EJECT_REQUEST
    {
        return None;
    }
    let status = info.get("status")?.as_u64()?;
    let meaning = match status {
        0 | OST_EJECT_IN_PROGRESS => return None,
        0x01 => "non-specific failure",
        0x02 => "unrecognized notify code",
        0x80 => {
            "ejection not supported by the guest: its ACPI hot-plug is off or cannot remove this device"
        }
        0x81 => "device in use by an application",
        0x82 => "device busy",
        0x83 => "an ejection dependency is busy or cannot be ejected",
        _ => "a status the ACPI specification does not define",
    };
    Some(Error::GuestRefusedEject { status, meaning })
}

/// Runs `device_del` on `id`, then waits until `gone` reports it gone, asking every
/// [`POLL`] within the hot-plug deadline. The guest's ACPI refusal ends the wait at once
/// with its reason; a timeout names `what` lingered.
pub(crate) async fn eject<F, Fut>(
    ctx: &Context,
    op: &str,
    id: &str,
    what: &str,
    mut gone: F,
) -> vmkit_core::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = vmkit_core::Result<bool>>,
{
    // Subscribed first, so the guest's answer cannot slip past.
    let mut events = ctx.subscribe();
    ctx.qmp()
        .device_del(id)
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let limit = ctx.limits().deadline;
    let deadline = Instant::now() + limit;
    loop {
        if gone().await? {
            return Ok(());
        }
        loop {
            match events.try_recv() {
                Ok(event) => {
                    if let Some(refusal) = ost_refusal(&event, id) {
                        return Err(CoreError::backend(op.to_owned(), refusal));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("{op}: {what}"),
                after: limit,
            });
        }
        sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An `ACPI_DEVICE_OST` as vmkit relays it (data seen from QEMU 10 with a Linux
    /// guest whose `/sys/firmware/acpi/hotplug/memory/enabled` was 0).
    fn ost(device: &str, source: u64, status: u64) -> VmEvent {
        VmEvent::Other {
            name: "ACPI_DEVICE_OST".into(),
            data: json!({"info": {"device": device, "slot": "0", "slot-type": "DIMM",
                                  "source": source, "status": status}}),
        }
    }

    #[test]
    fn an_eject_refusal_says_why_and_anything_else_is_not_one() {
        let refusal = ost_refusal(&ost("vmkit-mem0", 3, 0x80), "vmkit-mem0").unwrap();
        assert_eq!(
            refusal.to_string(),
            "the guest refused to eject it: ACPI _OST status 0x80 (ejection not supported by \
             the guest: its ACPI hot-plug is off or cannot remove this device)"
        );
        assert!(
            ost_refusal(&ost("vmkit-mem0", 3, 0x82), "vmkit-mem0")
                .unwrap()
                .to_string()
                .ends_with("(device busy)")
        );
        // Success, "in progress", an insert's answer, another device, another event.
        assert!(ost_refusal(&ost("vmkit-mem0", 3, 0), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem0", 3, 0x84), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem0", 1, 0x80), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem1", 3, 0x80), "vmkit-mem0").is_none());
        assert!(ost_refusal(&VmEvent::Powerdown, "vmkit-mem0").is_none());
        // QEMU leaves `device` out once the device is gone.
        let gone = VmEvent::Other {
            name: "ACPI_DEVICE_OST".into(),
            data: json!({"info": {"slot": "0", "slot-type": "DIMM", "source": 3, "status": 1}}),
        };
        assert!(ost_refusal(&gone, "vmkit-mem0").is_none());
    }
}
