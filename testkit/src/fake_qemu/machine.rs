//! The fake QEMU's machine: the vCPU slots, memory, block nodes and devices its command
//! line made, changed by the hot-plug commands the QEMU backend sends (`device_add`/
//! `device_del` of CPUs, `pc-dimm`s and `virtio-blk-pci` disks, `object-add`/`-del`,
//! `blockdev-add`/`-del`) and reported by the queries it reads
//! (`query-hotpluggable-cpus`, `query-cpus-fast`, `query-memory-devices`). Each command
//! is checked as QEMU checks it, with QEMU's error words, and a change reaches the fake
//! guest's files at once (its guest onlines everything immediately and always releases
//! what is unplugged).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::fake_guest::{FakeGuest, GuestDisk};

/// The vCPU model QEMU 10 reports for x86 TCG's default CPU.
const CPU_DRIVER: &str = "qemu64-x86_64-cpu";
/// Where hot-plugged DIMMs start in the guest's physical address space (4 GiB).
const DEVICE_MEMORY_BASE: u64 = 1 << 32;

/// A command's answer: the `return` value and the events that follow it.
pub(crate) type Answer = Result<(Value, Vec<(&'static str, Value)>), Refusal>;

/// QEMU's refusal of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The QMP error class.
    pub(crate) class: &'static str,
    /// QEMU's words.
    pub(crate) desc: String,
}

fn refuse(desc: impl Into<String>) -> Refusal {
    Refusal {
        class: "GenericError",
        desc: desc.into(),
    }
}

/// A device with an id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Device {
    /// A hot-plugged vCPU in this core.
    Cpu(u32),
    /// A DIMM.
    Dimm {
        memdev: String,
        slot: u32,
        addr: u64,
        size: u64,
    },
    /// A disk over block node `node`; `bus` is its root port (none: on the root complex,
    /// where nothing is hot-pluggable); `guest` its name in the guest.
    Disk {
        node: String,
        bus: Option<String>,
        guest: String,
        serial: String,
    },
    /// A PCIe root port.
    Port,
    /// A virtio-fs device on chardev `chardev`; `bus` as a disk's.
    Fs {
        chardev: String,
        bus: Option<String>,
    },
    /// Anything else the command line made (the vsock device, virtio-mem, …).
    Other,
}

/// The fake machine.
#[derive(Debug, Default)]
pub(crate) struct Machine {
    max_cpus: u32,
    /// Present vCPUs by core (of socket 0, as QEMU 10 lays out `-smp N,maxcpus=M`):
    /// `None` for those there at boot.
    cpus: BTreeMap<u32, Option<String>>,
    boot_memory: u64,
    slots: u32,
    max_memory: u64,
    /// Memory backend objects and their sizes.
    objects: BTreeMap<String, u64>,
    /// Block nodes and the files they open.
    nodes: BTreeMap<String, PathBuf>,
    devices: BTreeMap<String, Device>,
    /// The chardev path of the vhost-user vsock device, when there is one.
    vsock_socket: Option<PathBuf>,
    /// Chardevs added over QMP, and the socket each connected to.
    chardevs: BTreeMap<String, PathBuf>,
    guest: Option<FakeGuest>,
}

/// A size as QEMU's `-m` writes it (`256M`, `1G`, plain bytes).
fn size(text: &str) -> u64 {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse().unwrap_or(0);
    match unit {
        "K" | "k" => n << 10,
        "M" | "m" | "" => n << 20,
        "G" | "g" => n << 30,
        _ => n,
    }
}

fn str_of<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

impl Machine {
    /// The machine a QEMU command line describes.
    pub(crate) fn from_args(args: &[String]) -> Machine {
        let mut m = Machine {
            max_cpus: 1,
            boot_memory: 128 << 20,
            ..Machine::default()
        };
        m.cpus.insert(0, None);
        for pair in args.windows(2) {
            let value = pair[1].as_str();
            match pair[0].as_str() {
                "-smp" => m.read_smp(value),
                "-m" => m.read_memory(value),
                "-chardev" => {
                    let opts = super::split_qemu_opts(value);
                    if opts.first().map(String::as_str) == Some("socket")
                        && opts.iter().any(|o| o == "id=vmkit-vsock")
                    {
                        m.vsock_socket = opts
                            .iter()
                            .find_map(|o| o.strip_prefix("path="))
                            .map(PathBuf::from);
                    }
                }
                "-object" | "-blockdev" | "-device" => {
                    if let Ok(json) = serde_json::from_str::<Value>(value) {
                        m.read_json_option(&pair[0], &json);
                    }
                }
                _ => {}
            }
        }
        m
    }

    fn read_smp(&mut self, value: &str) {
        let mut parts = value.split(',');
        let boot: u32 = parts.next().and_then(|b| b.parse().ok()).unwrap_or(1);
        self.max_cpus = boot;
        for part in parts {
            if let Some(max) = part.strip_prefix("maxcpus=") {
                self.max_cpus = max.parse().unwrap_or(boot);
            }
        }
        self.cpus = (0..boot).map(|s| (s, None)).collect();
    }

    fn read_memory(&mut self, value: &str) {
        let mut parts = value.split(',');
        self.boot_memory = parts.next().map_or(128 << 20, size);
        self.max_memory = self.boot_memory;
        for part in parts {
            match part.split_once('=') {
                Some(("slots", n)) => self.slots = n.parse().unwrap_or(0),
                Some(("maxmem", n)) => self.max_memory = size(n),
                _ => {}
            }
        }
    }

    fn read_json_option(&mut self, option: &str, json: &Value) {
        match option {
            "-object" => {
                if let Some(id) = str_of(json, "id") {
                    let size = json.get("size").and_then(Value::as_u64).unwrap_or(0);
                    self.objects.insert(id.to_owned(), size);
                }
            }
            "-blockdev" => {
                let _ = self.blockdev_add(json);
            }
            _ => {
                let _ = self.device_add(json);
            }
        }
    }

    /// The directory of the fake guest behind this machine's vsock device, if it has one.
    pub(crate) fn guest_root(&self) -> Option<PathBuf> {
        self.vsock_socket.as_deref().map(FakeGuest::root_for)
    }

    /// "Boots" the guest: writes what it shows into the fake guest at `root`.
    ///
    /// # Errors
    /// When the files cannot be written.
    pub(crate) fn boot(&mut self, guest: FakeGuest) -> std::io::Result<()> {
        guest.boot(
            &self.online_cpus(),
            self.guest_memory(),
            &self.guest_disks(),
        )?;
        self.guest = Some(guest);
        Ok(())
    }

    fn online_cpus(&self) -> Vec<u32> {
        self.cpus.keys().copied().collect()
    }

    fn guest_memory(&self) -> u64 {
        self.boot_memory + self.dimms().map(|(_, d)| d.2).sum::<u64>()
    }

    fn guest_disks(&self) -> Vec<GuestDisk> {
        self.devices
            .values()
            .filter_map(|d| match d {
                Device::Disk {
                    node,
                    guest,
                    serial,
                    ..
                } => Some((node, guest, serial)),
                _ => None,
            })
            .map(|(node, guest, serial)| GuestDisk {
                name: guest.clone(),
                serial: serial.clone(),
                size_bytes: self
                    .nodes
                    .get(node)
                    .and_then(|f| std::fs::metadata(f).ok())
                    .map_or(0, |m| m.len()),
            })
            .collect()
    }

    /// The DIMMs: id, (memdev, slot, size, addr).
    fn dimms(&self) -> impl Iterator<Item = (&String, (&String, u32, u64, u64))> {
        self.devices.iter().filter_map(|(id, d)| match d {
            Device::Dimm {
                memdev,
                slot,
                addr,
                size,
            } => Some((id, (memdev, *slot, *size, *addr))),
            _ => None,
        })
    }

    /// Answers one command, or `None` when the machine does not handle it.
    pub(crate) fn handle(&mut self, command: &str, args: &Value) -> Option<Answer> {
        Some(match command {
            "query-hotpluggable-cpus" => Ok((self.hotpluggable_cpus(), Vec::new())),
            "query-cpus-fast" => Ok((self.cpus_fast(), Vec::new())),
            "query-memory-devices" => Ok((self.memory_devices(), Vec::new())),
            "device_add" => self.device_add(args).map(|()| (json!({}), Vec::new())),
            "device_del" => self.device_del(args),
            "object-add" => self.object_add(args).map(|()| (json!({}), Vec::new())),
            "object-del" => self.object_del(args).map(|()| (json!({}), Vec::new())),
            "blockdev-add" => self.blockdev_add(args).map(|()| (json!({}), Vec::new())),
            "blockdev-del" => self.blockdev_del(args).map(|()| (json!({}), Vec::new())),
            "chardev-add" => self.chardev_add(args).map(|()| (json!({}), Vec::new())),
            "chardev-remove" => self.chardev_remove(args).map(|()| (json!({}), Vec::new())),
            _ => return None,
        })
    }

    /// The commands [`Machine::handle`] answers.
    pub(crate) const COMMANDS: [&'static str; 11] = [
        "query-hotpluggable-cpus",
        "query-cpus-fast",
        "query-memory-devices",
        "device_add",
        "device_del",
        "object-add",
        "object-del",
        "blockdev-add",
        "blockdev-del",
        "chardev-add",
        "chardev-remove",
    ];

    fn props(core: u32) -> Value {
        json!({"socket-id": 0, "core-id": core, "thread-id": 0})
    }

    fn qom_path(&self, core: u32) -> Option<String> {
        self.cpus.get(&core).map(|id| match id {
            Some(id) => format!("/machine/peripheral/{id}"),
            None => format!("/machine/unattached/device[{core}]"),
        })
    }

    fn hotpluggable_cpus(&self) -> Value {
        // QEMU lists the slots from the highest core down.
        let slots: Vec<Value> = (0..self.max_cpus)
            .rev()
            .map(|s| {
                let mut slot =
                    json!({"type": CPU_DRIVER, "vcpus-count": 1, "props": Self::props(s)});
                if let Some(path) = self.qom_path(s) {
                    slot["qom-path"] = json!(path);
                }
                slot
            })
            .collect();
        Value::Array(slots)
    }

    fn cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .cpus
            .keys()
            .map(|&s| {
                json!({"cpu-index": s, "qom-path": self.qom_path(s), "thread-id": 10_000 + s,
                       "props": Self::props(s), "target": "x86_64"})
            })
            .collect();
        Value::Array(cpus)
    }

    fn memory_devices(&self) -> Value {
        let dimms: Vec<Value> = self
            .dimms()
            .map(|(id, (memdev, slot, size, addr))| {
                json!({"type": "dimm", "data": {"id": id, "addr": addr, "slot": slot, "node": 0,
                        "memdev": format!("/objects/{memdev}"), "size": size,
                        "hotplugged": true, "hotpluggable": true}})
            })
            .collect();
        Value::Array(dimms)
    }

    fn device_add(&mut self, args: &Value) -> Result<(), Refusal> {
        let driver =
            str_of(args, "driver").ok_or_else(|| refuse("Parameter 'driver' is missing"))?;
        let id = str_of(args, "id").map(str::to_owned);
        if let Some(id) = &id
            && self.devices.contains_key(id)
        {
            return Err(refuse(format!("Duplicate device ID '{id}' for device")));
        }
        let device = match driver {
            CPU_DRIVER => self.add_cpu(args, id.as_deref())?,
            "pc-dimm" => self.add_dimm(args)?,
            "virtio-blk-pci" => self.add_disk(args)?,
            "vhost-user-fs-pci" => self.add_fs(args)?,
            "pcie-root-port" => Device::Port,
            _ => Device::Other,
        };
        if let Some(id) = id {
            self.devices.insert(id, device);
        }
        self.sync_guest();
        Ok(())
    }

    fn add_cpu(&mut self, args: &Value, id: Option<&str>) -> Result<Device, Refusal> {
        let number = |key: &str| {
            args.get(key)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        let socket = number("socket-id").unwrap_or(0);
        let core = number("core-id").unwrap_or(u32::MAX);
        if socket != 0 || core >= self.max_cpus {
            return Err(refuse(format!(
                "Invalid CPU [socket: {socket}, core: {core}, thread: 0], maximum core-id: {}",
                self.max_cpus.saturating_sub(1)
            )));
        }
        if self.cpus.contains_key(&core) {
            return Err(refuse(format!("CPU[{core}] with APIC ID {core} exists")));
        }
        self.cpus.insert(core, id.map(str::to_owned));
        Ok(Device::Cpu(core))
    }

    fn add_dimm(&mut self, args: &Value) -> Result<Device, Refusal> {
        let memdev = str_of(args, "memdev")
            .ok_or_else(|| refuse("'pc-dimm' property 'memdev' is missing"))?;
        let size = *self.objects.get(memdev).ok_or_else(|| {
            refuse(format!(
                "Property 'pc-dimm.memdev' can't find value '{memdev}'"
            ))
        })?;
        if self.dimms().any(|(_, d)| d.0 == memdev) {
            return Err(refuse(format!("can't use already busy memdev: {memdev}")));
        }
        if self.slots == 0 {
            return Err(refuse(
                "no slots where allocated, please specify the 'slots' option",
            ));
        }
        let used: Vec<u32> = self.dimms().map(|(_, d)| d.1).collect();
        let slot = match args.get("slot").and_then(Value::as_u64) {
            Some(s) => {
                let s = u32::try_from(s).unwrap_or(u32::MAX);
                if s >= self.slots {
                    return Err(refuse(format!(
                        "invalid slot number {s}, valid range is [0-{}]",
                        self.slots - 1
                    )));
                }
                if used.contains(&s) {
                    return Err(refuse(format!("slot {s} is busy")));
                }
                s
            }
            None => (0..self.slots)
                .find(|s| !used.contains(s))
                .ok_or_else(|| refuse("no free slots available"))?,
        };
        if self.guest_memory() + size > self.max_memory {
            return Err(refuse(
                "not enough space, currently 0x0 in use of total space for memory devices",
            ));
        }
        let addr = DEVICE_MEMORY_BASE + self.dimms().map(|(_, d)| d.2).sum::<u64>();
        Ok(Device::Dimm {
            memdev: memdev.to_owned(),
            slot,
            addr,
            size,
        })
    }

    fn add_disk(&mut self, args: &Value) -> Result<Device, Refusal> {
        let node = str_of(args, "drive").ok_or_else(|| refuse("drive property not set"))?;
        if !self.nodes.contains_key(node) {
            return Err(refuse(format!(
                "Property 'virtio-blk-pci.drive' can't find value '{node}'"
            )));
        }
        if self
            .devices
            .values()
            .any(|d| matches!(d, Device::Disk { node: n, .. } if n == node))
        {
            return Err(refuse(format!(
                "Conflicts with use by another device as 'root', which does not allow 'write' on {node}"
            )));
        }
        let bus = str_of(args, "bus").map(str::to_owned);
        if let Some(bus) = &bus {
            if self.devices.get(bus) != Some(&Device::Port) {
                return Err(refuse(format!("Bus '{bus}' not found")));
            }
            if let Some((user, _)) = self
                .devices
                .iter()
                .find(|(_, d)| matches!(d, Device::Disk { bus: Some(b), .. } if b == bus))
            {
                return Err(refuse(format!(
                    "PCI: slot 0 function 0 not available for virtio-blk-pci, in use by virtio-blk-pci,id={user}"
                )));
            }
        }
        let taken: Vec<&str> = self
            .devices
            .values()
            .filter_map(|d| match d {
                Device::Disk { guest, .. } => Some(guest.as_str()),
                _ => None,
            })
            .collect();
        let guest = (b'a'..=b'z')
            .map(|c| format!("vd{}", char::from(c)))
            .find(|n| !taken.contains(&n.as_str()))
            .ok_or_else(|| refuse("the fake guest has no more disk names"))?;
        Ok(Device::Disk {
            node: node.to_owned(),
            bus,
            guest,
            serial: str_of(args, "serial").unwrap_or_default().to_owned(),
        })
    }

    fn device_del(&mut self, args: &Value) -> Answer {
        let id = str_of(args, "id").ok_or_else(|| refuse("Parameter 'id' is missing"))?;
        let Some(device) = self.devices.get(id) else {
            return Err(Refusal {
                class: "DeviceNotFound",
                desc: format!("Device '{id}' not found"),
            });
        };
        match device {
            Device::Cpu(socket) => {
                self.cpus.remove(socket);
            }
            Device::Dimm { .. } => {}
            Device::Disk { bus: None, .. }
            | Device::Fs { bus: None, .. }
            | Device::Port
            | Device::Other => {
                return Err(refuse(format!(
                    "Bus 'pcie.0' does not support hotplugging (device {id})"
                )));
            }
            Device::Disk { .. } | Device::Fs { .. } => {}
        }
        self.devices.remove(id);
        self.sync_guest();
        let event = json!({"device": id, "path": format!("/machine/peripheral/{id}")});
        Ok((json!({}), vec![("DEVICE_DELETED", event)]))
    }

    fn object_add(&mut self, args: &Value) -> Result<(), Refusal> {
        let id = str_of(args, "id").ok_or_else(|| refuse("Parameter 'id' is missing"))?;
        if self.objects.contains_key(id) {
            return Err(refuse(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let size = args.get("size").and_then(Value::as_u64).unwrap_or(0);
        if size == 0 {
            return Err(refuse("property 'size' of memory-backend is required"));
        }
        self.objects.insert(id.to_owned(), size);
        Ok(())
    }

    fn object_del(&mut self, args: &Value) -> Result<(), Refusal> {
        let id = str_of(args, "id").ok_or_else(|| refuse("Parameter 'id' is missing"))?;
        if !self.objects.contains_key(id) {
            return Err(refuse(format!("object '{id}' not found")));
        }
        if self.dimms().any(|(_, d)| d.0 == id) {
            return Err(refuse(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.objects.remove(id);
        Ok(())
    }

    fn blockdev_add(&mut self, args: &Value) -> Result<(), Refusal> {
        let node = str_of(args, "node-name")
            .ok_or_else(|| refuse("A top-level block node needs a node-name"))?;
        if self.nodes.contains_key(node) {
            return Err(refuse(format!("Duplicate nodes with node-name='{node}'")));
        }
        let file = args
            .get("file")
            .and_then(|f| str_of(f, "filename"))
            .ok_or_else(|| refuse("Parameter 'file.filename' is missing"))?;
        if !std::path::Path::new(file).exists() {
            return Err(refuse(format!(
                "Could not open '{file}': No such file or directory"
            )));
        }
        self.nodes.insert(node.to_owned(), PathBuf::from(file));
        Ok(())
    }

    fn add_fs(&self, args: &Value) -> Result<Device, Refusal> {
        let chardev = str_of(args, "chardev")
            .ok_or_else(|| refuse("Property 'vhost-user-fs-pci.chardev' can't be empty"))?;
        if !self.chardevs.contains_key(chardev) {
            return Err(refuse(format!(
                "Property 'vhost-user-fs-pci.chardev' can't find value '{chardev}'"
            )));
        }
        Ok(Device::Fs {
            chardev: chardev.to_owned(),
            bus: str_of(args, "bus").map(str::to_owned),
        })
    }

    fn chardev_add(&mut self, args: &Value) -> Result<(), Refusal> {
        let id = str_of(args, "id").ok_or_else(|| refuse("Parameter 'id' is missing"))?;
        if self.chardevs.contains_key(id) {
            return Err(refuse(format!("Chardev '{id}' already exists")));
        }
        let path = args
            .pointer("/backend/data/addr/data/path")
            .and_then(Value::as_str)
            .ok_or_else(|| refuse("Parameter 'backend.data.addr.data.path' is missing"))?;
        if !std::path::Path::new(path).exists() {
            return Err(refuse(format!(
                "Failed to connect to '{path}': No such file or directory"
            )));
        }
        self.chardevs.insert(id.to_owned(), PathBuf::from(path));
        Ok(())
    }

    fn chardev_remove(&mut self, args: &Value) -> Result<(), Refusal> {
        let id = str_of(args, "id").ok_or_else(|| refuse("Parameter 'id' is missing"))?;
        if !self.chardevs.contains_key(id) {
            return Err(refuse(format!("Chardev '{id}' not found")));
        }
        let busy = self
            .devices
            .values()
            .any(|d| matches!(d, Device::Fs { chardev, .. } if chardev == id));
        if busy {
            return Err(refuse(format!("Chardev '{id}' is busy")));
        }
        self.chardevs.remove(id);
        Ok(())
    }

    fn blockdev_del(&mut self, args: &Value) -> Result<(), Refusal> {
        let node =
            str_of(args, "node-name").ok_or_else(|| refuse("Parameter 'node-name' is missing"))?;
        if !self.nodes.contains_key(node) {
            return Err(refuse(format!(
                "Failed to find node with node-name='{node}'"
            )));
        }
        if self
            .devices
            .values()
            .any(|d| matches!(d, Device::Disk { node: n, .. } if n == node))
        {
            return Err(refuse(format!(
                "Node '{node}' is busy: block device is in use by a device"
            )));
        }
        self.nodes.remove(node);
        Ok(())
    }

    /// Shows the machine's devices in the fake guest (once it has booted).
    fn sync_guest(&self) {
        let Some(guest) = &self.guest else {
            return;
        };
        let disks = self.guest_disks();
        let result = guest
            .set_online_cpus(&self.online_cpus())
            .and_then(|()| guest.set_memory(self.guest_memory()))
            .and_then(|()| {
                let shown = std::fs::read_dir(guest.root().join("sys/block"))
                    .map(|dir| {
                        dir.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                for gone in shown.iter().filter(|n| disks.iter().all(|d| &d.name != *n)) {
                    guest.remove_disk(gone)?;
                }
                disks.iter().try_for_each(|d| guest.put_disk(d))
            })
            .and_then(|()| {
                let fs: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(_, d)| matches!(d, Device::Fs { .. }))
                    .map(|(id, _)| format!("virtio-{id}"))
                    .collect();
                guest.set_fs_devices(&fs)
            });
        if let Err(e) = result {
            eprintln!("fake-qemu: updating the fake guest: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A machine as the QEMU backend's command line makes it, with a booted guest.
    fn machine(dir: &std::path::Path) -> Machine {
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let vhost = dir.join("vhost-user-vsock.sock");
        let blockdev = json!({"driver": "raw", "node-name": "vmkit-disk0",
                              "file": {"driver": "file", "filename": disk}});
        let mut m = Machine::from_args(&args(&[
            "-smp",
            "1,maxcpus=3",
            "-m",
            "256M,slots=2,maxmem=768M",
            "-device",
            r#"{"driver":"pcie-root-port","id":"vmkit-rp0","chassis":1}"#,
            "-blockdev",
            &blockdev.to_string(),
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"vmkit-disk0","id":"root","serial":"r1"}"#,
            "-chardev",
            &format!("socket,id=vmkit-vsock,path={}", vhost.display()),
        ]));
        let root = m.guest_root().unwrap();
        assert_eq!(root, FakeGuest::root_for(&vhost));
        m.boot(FakeGuest::create(&root).unwrap()).unwrap();
        m
    }

    fn ok(m: &mut Machine, command: &str, args: Value) -> (Value, Vec<(&'static str, Value)>) {
        m.handle(command, &args)
            .unwrap()
            .unwrap_or_else(|r| panic!("{command} {args}: {r:?}"))
    }

    fn refused(m: &mut Machine, command: &str, args: Value) -> String {
        m.handle(command, &args).unwrap().unwrap_err().desc
    }

    fn guest_file(dir: &std::path::Path, rel: &str) -> String {
        std::fs::read_to_string(FakeGuest::root_for(&dir.join("vhost-user-vsock.sock")).join(rel))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    #[test]
    fn vcpus_plug_into_free_slots_and_leave_with_device_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = machine(dir.path());
        let (slots, _) = ok(&mut m, "query-hotpluggable-cpus", json!(null));
        let slots = slots.as_array().unwrap();
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[0]["props"]["core-id"], 2, "highest core first");
        assert!(slots[2].get("qom-path").is_some() && slots[0].get("qom-path").is_none());
        let cpu = json!({"driver": CPU_DRIVER, "id": "vmkit-cpu0-1-0", "socket-id": 0,
                         "core-id": 1, "thread-id": 0});
        ok(&mut m, "device_add", cpu.clone());
        assert_eq!(
            guest_file(dir.path(), "sys/devices/system/cpu/online"),
            "0,1"
        );
        assert!(refused(&mut m, "device_add", cpu).starts_with("Duplicate device ID"));
        let beyond = json!({"driver": CPU_DRIVER, "id": "c9", "core-id": 3});
        assert!(refused(&mut m, "device_add", beyond).contains("maximum core-id: 2"));
        let (cpus, _) = ok(&mut m, "query-cpus-fast", json!(null));
        assert_eq!(
            cpus[1]["qom-path"], "/machine/peripheral/vmkit-cpu0-1-0",
            "{cpus}"
        );
        let (_, events) = ok(&mut m, "device_del", json!({"id": "vmkit-cpu0-1-0"}));
        assert_eq!(events[0].0, "DEVICE_DELETED");
        assert_eq!(events[0].1["device"], "vmkit-cpu0-1-0");
        assert_eq!(guest_file(dir.path(), "sys/devices/system/cpu/online"), "0");
        let gone = m
            .handle("device_del", &json!({"id": "vmkit-cpu0-1-0"}))
            .unwrap();
        assert_eq!(gone.unwrap_err().class, "DeviceNotFound");
    }

    #[test]
    fn dimms_need_a_free_backend_a_slot_and_room_and_hold_their_backend() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = machine(dir.path());
        let object = |id: &str, mib: u64| json!({"qom-type": "memory-backend-memfd", "id": id, "size": mib << 20});
        let dimm =
            |id: &str, memdev: &str| json!({"driver": "pc-dimm", "id": id, "memdev": memdev});
        assert!(
            refused(&mut m, "device_add", dimm("d0", "nope")).contains("can't find value 'nope'")
        );
        ok(&mut m, "object-add", object("m0", 256));
        assert!(refused(&mut m, "object-add", object("m0", 256)).contains("duplicate"));
        ok(&mut m, "device_add", dimm("d0", "m0"));
        assert_eq!(
            guest_file(dir.path(), "proc/meminfo"),
            "MemTotal: 524288 kB"
        );
        assert!(refused(&mut m, "device_add", dimm("d1", "m0")).contains("busy memdev"));
        assert!(refused(&mut m, "object-del", json!({"id": "m0"})).contains("in use"));
        ok(&mut m, "object-add", object("m1", 512));
        assert!(
            refused(&mut m, "device_add", dimm("d1", "m1")).starts_with("not enough space"),
            "256 boot + 256 + 512 > 768"
        );
        let (devices, _) = ok(&mut m, "query-memory-devices", json!(null));
        assert_eq!(devices[0]["data"]["id"], "d0");
        assert_eq!(devices[0]["data"]["slot"], 0);
        ok(&mut m, "device_del", json!({"id": "d0"}));
        assert_eq!(
            guest_file(dir.path(), "proc/meminfo"),
            "MemTotal: 262144 kB"
        );
        ok(&mut m, "object-del", json!({"id": "m0"}));
        assert!(refused(&mut m, "object-del", json!({"id": "m0"})).contains("not found"));
    }

    #[test]
    fn a_virtio_fs_device_needs_its_chardev_which_stays_busy_until_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = machine(dir.path());
        let socket = dir.path().join("fs.sock");
        let chardev = |path: &std::path::Path| {
            json!({"id": "c0", "backend": {"type": "socket",
                   "data": {"addr": {"type": "unix", "data": {"path": path}}}}})
        };
        assert!(refused(&mut m, "chardev-add", chardev(&socket)).contains("Failed to connect"));
        std::fs::write(&socket, b"").unwrap();
        let fs = json!({"driver": "vhost-user-fs-pci", "id": "s0", "chardev": "c0",
                        "tag": "t", "bus": "vmkit-rp0"});
        assert!(refused(&mut m, "device_add", fs.clone()).contains("can't find value 'c0'"));
        ok(&mut m, "chardev-add", chardev(&socket));
        assert!(refused(&mut m, "chardev-add", chardev(&socket)).contains("already exists"));
        ok(&mut m, "device_add", fs);
        assert!(refused(&mut m, "chardev-remove", json!({"id": "c0"})).contains("busy"));
        ok(&mut m, "device_del", json!({"id": "s0"}));
        ok(&mut m, "chardev-remove", json!({"id": "c0"}));
        assert!(refused(&mut m, "chardev-remove", json!({"id": "c0"})).contains("not found"));
    }

    #[test]
    fn disks_need_their_node_and_a_free_port_and_cold_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = machine(dir.path());
        assert_eq!(guest_file(dir.path(), "sys/block/vda/serial"), "r1");
        let file = dir.path().join("disk.img");
        let node = |name: &str, file: &std::path::Path| {
            json!({"driver": "raw", "node-name": name,
                   "file": {"driver": "file", "filename": file}})
        };
        assert!(
            refused(
                &mut m,
                "blockdev-add",
                node("h0", &dir.path().join("missing"))
            )
            .contains("No such file")
        );
        ok(&mut m, "blockdev-add", node("h0", &file));
        assert!(refused(&mut m, "blockdev-add", node("h0", &file)).starts_with("Duplicate nodes"));
        let disk = |id: &str, bus: &str| json!({"driver": "virtio-blk-pci", "id": id, "drive": "h0", "bus": bus});
        assert!(refused(&mut m, "device_add", disk("d1", "vmkit-rp9")).contains("not found"));
        ok(&mut m, "device_add", disk("d1", "vmkit-rp0"));
        assert_eq!(guest_file(dir.path(), "sys/block/vdb/size"), "8");
        ok(&mut m, "blockdev-add", node("h1", &file));
        let second =
            json!({"driver": "virtio-blk-pci", "id": "d2", "drive": "h1", "bus": "vmkit-rp0"});
        assert!(
            refused(&mut m, "device_add", second)
                .ends_with("not available for virtio-blk-pci, in use by virtio-blk-pci,id=d1")
        );
        assert!(refused(&mut m, "blockdev-del", json!({"node-name": "h0"})).contains("busy"));
        assert!(
            refused(&mut m, "device_del", json!({"id": "root"}))
                .contains("does not support hotplugging")
        );
        ok(&mut m, "device_del", json!({"id": "d1"}));
        assert!(
            !FakeGuest::root_for(&dir.path().join("vhost-user-vsock.sock"))
                .join("sys/block/vdb")
                .exists()
        );
        ok(&mut m, "blockdev-del", json!({"node-name": "h0"}));
    }
}
