//! Typed QMP: the commands vmkit sends to change a running VM, as methods taking and
//! returning `qapi-qmp` types (QEMU's own schema), so that a misspelt argument is a
//! compile error and an answer QEMU's schema does not allow is a decode error naming
//! the command. Nothing here sends untyped JSON.

use std::os::fd::BorrowedFd;
use std::path::Path;

use vmkit_qmp::qapi_qmp::{self, ObjectOptions};
use vmkit_qmp::{Error, QmpClient};

/// A device for `device_add`: its driver, id, bus and driver properties.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    driver: String,
    id: String,
    bus: Option<String>,
    props: serde_json::Map<String, serde_json::Value>,
}

impl Device {
    /// A `driver` device with id `id`.
    pub(crate) fn new(driver: impl Into<String>, id: impl Into<String>) -> Self {
        Device {
            driver: driver.into(),
            id: id.into(),
            bus: None,
            props: serde_json::Map::new(),
        }
    }

    /// On bus `bus` (a root port's id).
    #[must_use]
    pub(crate) fn on(mut self, bus: impl Into<String>) -> Self {
        self.bus = Some(bus.into());
        self
    }

    /// With driver property `key` set to `value`.
    #[must_use]
    pub(crate) fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.props.insert(key.to_owned(), value.into());
        self
    }

    /// From a JSON device as the argv's `-device` takes it (`driver`, `id`, properties).
    pub(crate) fn from_json(mut value: serde_json::Value) -> Self {
        let take = |v: &mut serde_json::Value, key: &str| {
            v.as_object_mut()
                .and_then(|o| o.remove(key))
                .and_then(|s| s.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let driver = take(&mut value, "driver");
        let id = take(&mut value, "id");
        let bus = Some(take(&mut value, "bus")).filter(|b| !b.is_empty());
        let props = match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        Device {
            driver,
            id,
            bus,
            props,
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn driver(&self) -> &str {
        &self.driver
    }
}

/// A vCPU as `query-cpus-fast` lists it.
pub(crate) type PresentCpu = qapi_qmp::CpuInfoFastBase;
/// A vCPU slot as `query-hotpluggable-cpus` lists it.
pub(crate) type CpuSlot = qapi_qmp::HotpluggableCPU;
/// A memory device as `query-memory-devices` lists it.
pub(crate) type MemoryDevice = qapi_qmp::MemoryDeviceInfo;

/// The VM's QMP connection, with typed commands.
#[derive(Clone)]
pub(crate) struct Qmp {
    client: QmpClient,
}

impl Qmp {
    pub(crate) fn new(client: QmpClient) -> Self {
        Qmp { client }
    }

    /// `device_add`.
    pub(crate) async fn device_add(&self, device: Device) -> Result<(), Error> {
        let command = qapi_qmp::device_add {
            driver: device.driver,
            id: Some(device.id),
            bus: device.bus,
            arguments: device.props,
        };
        self.client.execute(command).await.map(drop)
    }

    /// `device_del`: asks the guest to release device `id` (its `DEVICE_DELETED`
    /// comes later).
    pub(crate) async fn device_del(&self, id: &str) -> Result<(), Error> {
        let command = qapi_qmp::device_del { id: id.to_owned() };
        self.client.execute(command).await.map(drop)
    }

    /// `object-add` of a RAM backend of `size` bytes: memfd, shared, when a vhost-user
    /// daemon maps guest RAM (`shared`), else private anonymous RAM.
    pub(crate) async fn add_ram_backend(
        &self,
        id: &str,
        size: u64,
        shared: bool,
    ) -> Result<(), Error> {
        let mut base = qapi_qmp::MemoryBackendProperties {
            dump: None,
            host_nodes: None,
            merge: None,
            policy: None,
            prealloc: None,
            prealloc_context: None,
            prealloc_threads: None,
            reserve: None,
            share: None,
            x_use_canonical_path_for_ramblock_id: None,
            size,
        };
        let id = id.to_owned();
        let object = if shared {
            base.share = Some(true);
            ObjectOptions::memory_backend_memfd {
                id,
                memory_backend_memfd: qapi_qmp::MemoryBackendMemfdProperties {
                    base,
                    hugetlb: None,
                    hugetlbsize: None,
                    seal: None,
                },
            }
        } else {
            ObjectOptions::memory_backend_ram {
                id,
                memory_backend_ram: base,
            }
        };
        self.client
            .execute(qapi_qmp::object_add(object))
            .await
            .map(drop)
    }

    /// `object-del`.
    pub(crate) async fn object_del(&self, id: &str) -> Result<(), Error> {
        let command = qapi_qmp::object_del { id: id.to_owned() };
        self.client.execute(command).await.map(drop)
    }

    /// `blockdev-add` of a node given as the argv's `-blockdev` JSON; the schema's
    /// `BlockdevOptions` checks it before anything is sent.
    pub(crate) async fn blockdev_add(&self, node: serde_json::Value) -> Result<(), Error> {
        let options: qapi_qmp::BlockdevOptions =
            serde_json::from_value(node).map_err(|source| Error::Encode {
                command: "blockdev-add".into(),
                source,
            })?;
        self.client
            .execute(qapi_qmp::blockdev_add(options))
            .await
            .map(drop)
    }

    /// `blockdev-del`.
    pub(crate) async fn blockdev_del(&self, node: &str) -> Result<(), Error> {
        let command = qapi_qmp::blockdev_del {
            node_name: node.to_owned(),
        };
        self.client.execute(command).await.map(drop)
    }

    /// `getfd`: hands `fd` to QEMU under `fdname` (QEMU keeps its own copy).
    pub(crate) async fn getfd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        let command = qapi_qmp::getfd {
            fdname: fdname.to_owned(),
        };
        self.client.execute_with_fd(command, fd).await.map(drop)
    }

    /// `closefd`.
    pub(crate) async fn closefd(&self, fdname: &str) -> Result<(), Error> {
        let command = qapi_qmp::closefd {
            fdname: fdname.to_owned(),
        };
        self.client.execute(command).await.map(drop)
    }

    /// `netdev_add` of a TAP netdev on the fd passed as `fdname`.
    pub(crate) async fn add_tap_netdev(&self, id: &str, fdname: &str) -> Result<(), Error> {
        let tap = qapi_qmp::NetdevTapOptions {
            fd: Some(fdname.to_owned()),
            ..Default::default()
        };
        let netdev = qapi_qmp::Netdev::tap {
            id: id.to_owned(),
            tap,
        };
        self.client
            .execute(qapi_qmp::netdev_add(netdev))
            .await
            .map(drop)
    }

    /// `netdev_del`.
    pub(crate) async fn netdev_del(&self, id: &str) -> Result<(), Error> {
        let command = qapi_qmp::netdev_del { id: id.to_owned() };
        self.client.execute(command).await.map(drop)
    }

    /// `qom-set`.
    pub(crate) async fn qom_set(
        &self,
        path: &str,
        property: &str,
        value: serde_json::Value,
    ) -> Result<(), Error> {
        let command = qapi_qmp::qom_set {
            path: path.to_owned(),
            property: property.to_owned(),
            value,
        };
        self.client.execute(command).await.map(drop)
    }

    /// `query-hotpluggable-cpus`.
    pub(crate) async fn hotpluggable_cpus(&self) -> Result<Vec<CpuSlot>, Error> {
        self.client
            .execute(qapi_qmp::query_hotpluggable_cpus {})
            .await
    }

    /// `query-cpus-fast`, the target-neutral part of each entry, by `cpu-index`.
    pub(crate) async fn cpus_fast(&self) -> Result<Vec<PresentCpu>, Error> {
        let cpus = self.client.execute(qapi_qmp::query_cpus_fast {}).await?;
        let mut bases = cpus
            .into_iter()
            .map(|cpu| match cpu {
                qapi_qmp::CpuInfoFast::x86_64(base) | qapi_qmp::CpuInfoFast::i386(base) => Ok(base),
                qapi_qmp::CpuInfoFast::aarch64(base) => Ok(base),
                // Every target carries the same base fields; read them from the JSON.
                other => serde_json::to_value(&other)
                    .and_then(serde_json::from_value)
                    .map_err(|source| Error::Decode {
                        command: "query-cpus-fast".into(),
                        reply: format!("{other:?}"),
                        source,
                    }),
            })
            .collect::<Result<Vec<PresentCpu>, Error>>()?;
        bases.sort_by_key(|c| c.cpu_index);
        Ok(bases)
    }

    /// `query-memory-devices`.
    pub(crate) async fn memory_devices(&self) -> Result<Vec<MemoryDevice>, Error> {
        self.client.execute(qapi_qmp::query_memory_devices {}).await
    }

    /// `chardev-add` of a Unix-socket client chardev connecting to `path`.
    pub(crate) async fn add_unix_chardev(&self, id: &str, path: &Path) -> Result<(), Error> {
        let socket = qapi_qmp::ChardevSocket {
            base: qapi_qmp::ChardevCommon {
                logappend: None,
                logfile: None,
            },
            nodelay: None,
            reconnect: None,
            server: Some(false),
            telnet: None,
            tls_authz: None,
            tls_creds: None,
            tn3270: None,
            wait: None,
            websocket: None,
            addr: qapi_qmp::SocketAddressLegacy::unix(qapi_qmp::UnixSocketAddressWrapper {
                data: qapi_qmp::UnixSocketAddress {
                    abstract_: None,
                    tight: None,
                    path: path.to_string_lossy().into_owned(),
                },
            }),
        };
        let command = qapi_qmp::chardev_add {
            id: id.to_owned(),
            backend: qapi_qmp::ChardevBackend::socket(qapi_qmp::ChardevSocketWrapper {
                data: socket,
            }),
        };
        self.client.execute(command).await.map(drop)
    }

    /// `chardev-remove`.
    pub(crate) async fn chardev_remove(&self, id: &str) -> Result<(), Error> {
        let command = qapi_qmp::chardev_remove { id: id.to_owned() };
        self.client.execute(command).await.map(drop)
    }

    /// Whether the virtio device at QOM `path` has started its vhost backend
    /// (`x-query-virtio-status`).
    pub(crate) async fn vhost_started(&self, path: &str) -> Result<bool, Error> {
        let command = qapi_qmp::x_query_virtio_status {
            path: path.to_owned(),
        };
        Ok(self.client.execute(command).await?.vhost_started)
    }
}
