//! QMP events turned into [`VmEvent`]s.

use vmkit_core::{BlockErrorAction, BlockOperation, VmEvent};
use vmkit_qmp::Event;
use vmkit_qmp::qapi_qmp;
use vmkit_qmp::qapi_qmp::Event as QapiEvent;

/// The [`VmEvent`] for a QMP event; `None` for the end of the stream.
pub(crate) fn to_vm_event(event: &Event) -> Option<VmEvent> {
    match event {
        Event::Qmp { name, event, .. } => Some(match event.as_ref() {
            QapiEvent::SHUTDOWN { data, .. } => VmEvent::ShutdownRequested {
                guest: data.guest,
                reason: enum_name(&data.reason),
            },
            QapiEvent::POWERDOWN { .. } => VmEvent::Powerdown,
            QapiEvent::RESET { data, .. } => VmEvent::Reset { guest: data.guest },
            QapiEvent::STOP { .. } => VmEvent::Stopped,
            QapiEvent::RESUME { .. } => VmEvent::Resumed,
            QapiEvent::DEVICE_DELETED { data, .. } => VmEvent::DeviceDeleted {
                id: data.device.clone(),
                path: data.path.clone(),
            },
            QapiEvent::GUEST_PANICKED { .. } => VmEvent::GuestPanicked,
            QapiEvent::BLOCK_IO_ERROR { data, .. } => VmEvent::BlockIoError {
                node: data.node_name.clone(),
                device: data.device.clone(),
                operation: match data.operation {
                    qapi_qmp::IoOperationType::read => BlockOperation::Read,
                    qapi_qmp::IoOperationType::write => BlockOperation::Write,
                },
                action: match data.action {
                    qapi_qmp::BlockErrorAction::ignore => BlockErrorAction::Ignore,
                    qapi_qmp::BlockErrorAction::report => BlockErrorAction::Report,
                    qapi_qmp::BlockErrorAction::stop => BlockErrorAction::Stop,
                },
                nospace: data.nospace.unwrap_or(false),
                reason: data.reason.clone(),
            },
            other => VmEvent::Other {
                name: name.clone(),
                data: serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.get("data").cloned())
                    .unwrap_or(serde_json::Value::Null),
            },
        }),
        Event::Unknown { name, data, .. } => Some(VmEvent::Other {
            name: name.clone(),
            data: data.clone(),
        }),
        Event::Disconnected { .. } => None,
        _ => None,
    }
}

/// The id of the virtio-serial port whose guest end `event` says closed, if it does.
pub(crate) fn closed_serial_port(event: &Event) -> Option<&str> {
    match event {
        Event::Qmp { event, .. } => match event.as_ref() {
            QapiEvent::VSERPORT_CHANGE { data, .. } if !data.open => Some(&data.id),
            _ => None,
        },
        _ => None,
    }
}

/// A QAPI enum value as QEMU spells it (`"guest-shutdown"`).
fn enum_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmkit_qmp::Timestamp;

    /// The event as vmkit-qmp delivers a line QEMU sent.
    fn qmp_event(name: &str, data: serde_json::Value) -> Event {
        let line =
            json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}});
        match serde_json::from_value::<QapiEvent>(line) {
            Ok(event) => Event::Qmp {
                name: name.to_owned(),
                event: Box::new(event),
                timestamp: Timestamp::default(),
            },
            Err(_) => Event::Unknown {
                name: name.to_owned(),
                data,
                timestamp: Timestamp::default(),
            },
        }
    }

    #[test]
    fn a_disk_error_is_typed() {
        // QEMU's own example, with the node name vmkit gives a cold disk.
        let event = qmp_event(
            "BLOCK_IO_ERROR",
            json!({"device": "", "node-name": "vmkit-disk1", "operation": "write",
                   "action": "stop", "nospace": true, "reason": "No space left on device"}),
        );
        assert_eq!(
            to_vm_event(&event),
            Some(VmEvent::BlockIoError {
                node: Some("vmkit-disk1".into()),
                device: String::new(),
                operation: BlockOperation::Write,
                action: BlockErrorAction::Stop,
                nospace: true,
                reason: "No space left on device".into(),
            })
        );
        let read = qmp_event(
            "BLOCK_IO_ERROR",
            json!({"device": "ide0-hd1", "operation": "read", "action": "report",
                   "reason": "Input/output error"}),
        );
        assert!(matches!(
            to_vm_event(&read),
            Some(VmEvent::BlockIoError {
                node: None,
                operation: BlockOperation::Read,
                action: BlockErrorAction::Report,
                nospace: false,
                ..
            })
        ));
    }

    #[test]
    fn the_events_vmkit_acts_on() {
        assert_eq!(
            to_vm_event(&qmp_event(
                "SHUTDOWN",
                json!({"guest": true, "reason": "guest-shutdown"})
            )),
            Some(VmEvent::ShutdownRequested {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        assert_eq!(
            to_vm_event(&qmp_event("POWERDOWN", json!({}))),
            Some(VmEvent::Powerdown)
        );
        assert_eq!(
            to_vm_event(&qmp_event(
                "RESET",
                json!({"guest": false, "reason": "host-qmp-system-reset"})
            )),
            Some(VmEvent::Reset { guest: false })
        );
        assert_eq!(
            to_vm_event(&qmp_event("STOP", json!({}))),
            Some(VmEvent::Stopped)
        );
        assert_eq!(
            to_vm_event(&qmp_event("RESUME", json!({}))),
            Some(VmEvent::Resumed)
        );
        assert_eq!(
            to_vm_event(&qmp_event(
                "DEVICE_DELETED",
                json!({"device": "cpu1", "path": "/machine/peripheral/cpu1"})
            )),
            Some(VmEvent::DeviceDeleted {
                id: Some("cpu1".into()),
                path: "/machine/peripheral/cpu1".into()
            })
        );
        assert_eq!(
            to_vm_event(&qmp_event("GUEST_PANICKED", json!({"action": "pause"}))),
            Some(VmEvent::GuestPanicked)
        );
    }

    #[test]
    fn other_and_unknown_events_keep_their_data() {
        assert_eq!(
            to_vm_event(&qmp_event("BALLOON_CHANGE", json!({"actual": 1024}))),
            Some(VmEvent::Other {
                name: "BALLOON_CHANGE".into(),
                data: json!({"actual": 1024})
            })
        );
        assert_eq!(
            to_vm_event(&qmp_event("VMKIT_FUTURE_EVENT", json!({"x": 1}))),
            Some(VmEvent::Other {
                name: "VMKIT_FUTURE_EVENT".into(),
                data: json!({"x": 1})
            })
        );
        assert_eq!(
            to_vm_event(&Event::Disconnected {
                reason: "eof".into()
            }),
            None
        );
    }
}
