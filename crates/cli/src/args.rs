//! The command line: every subcommand and its flags, as clap parses them.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Run and manage vmkit VMs.
#[derive(Debug, Parser)]
#[command(name = "vmkit", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Print JSON (one document per command) for scripts instead of text for people.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More logging on stderr: -v info, -vv debug, -vvv trace (`RUST_LOG` overrides).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// Where detached VMs are registered: `$VMKIT_RUNTIME_DIR`, else
    /// `$XDG_RUNTIME_DIR/vmkit`, else `/run/vmkit` for root, else `/tmp/vmkit-<uid>`.
    #[arg(long, global = true, env = "VMKIT_RUNTIME_DIR", value_name = "DIR")]
    pub(crate) runtime_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Boot a VM: in the foreground (console, or `-- CMD…` run in the guest), or detached.
    Run(Box<RunArgs>),
    /// List the detached VMs.
    Ps {
        /// Output format (`--json` is the same as `--format json`).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Everything known about one VM.
    Inspect {
        /// The VM's name.
        vm: String,
    },
    /// Run a command in a VM's guest, its stdio attached; exits with its exit code.
    Exec(ExecArgs),
    /// Add a device to a running VM, or grow its vCPUs or memory.
    Hotplug {
        /// The VM's name.
        vm: String,
        /// What to add.
        #[command(subcommand)]
        what: HotplugWhat,
    },
    /// Remove a hot-plugged device (a disk, NIC, share or memory id).
    Unplug {
        /// The VM's name.
        vm: String,
        /// The device's id (`vmkit inspect` lists them).
        id: String,
    },
    /// Stop a VM's vCPUs.
    Pause {
        /// The VM's name.
        vm: String,
    },
    /// Restart a paused VM's vCPUs.
    Resume {
        /// The VM's name.
        vm: String,
    },
    /// Shut a VM down: gracefully (the guest powers off), then by force.
    Stop(StopArgs),
    /// Forget stopped VMs (their state dir and logs).
    Rm {
        /// Stop running ones first, by force.
        #[arg(short, long)]
        force: bool,
        /// The VMs' names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// A VM's serial console and VMM log.
    Logs {
        /// Keep printing what is written, until the VM ends.
        #[arg(short, long)]
        follow: bool,
        /// The VM's name.
        vm: String,
    },
    /// The backends this binary has, and those from plugins.
    Backends(BackendSources),
    /// What this host can do: accelerators, vsock kinds, vhost-user, QEMU, and why not.
    Check,
    /// The per-VM supervisor behind `run --detach` (started by vmkit, not by people).
    #[command(hide = true)]
    Supervise {
        /// The VM's entry in the runtime dir.
        dir: PathBuf,
    },
}

/// `ps` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Columns for people.
    Table,
    /// One JSON array.
    Json,
}

/// `vmkit run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The VM's name: a letter, then letters, digits, `-`, `.`, `_`; at most 32 bytes
    /// (default: `vm-` and a random suffix).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// A config file (TOML, `version = 1`, a `[vm]` table of vmkit's `InstanceConfig`);
    /// flags override it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The kernel (default: the test guest's, `$VMKIT_IMAGE_DIR` or
    /// `target/vmkit-image`).
    #[arg(long, value_name = "FILE")]
    pub(crate) kernel: Option<PathBuf>,
    /// The initramfs (default: the test guest's, beside the default kernel).
    #[arg(long, value_name = "FILE")]
    pub(crate) initrd: Option<PathBuf>,
    /// A kernel command-line parameter (repeat for more).
    #[arg(long = "append", value_name = "PARAM")]
    pub(crate) cmdline: Vec<String>,
    /// vCPUs at boot.
    #[arg(long)]
    pub(crate) cpus: Option<u32>,
    /// vCPUs a hot-plug may reach.
    #[arg(long, value_name = "N")]
    pub(crate) max_cpus: Option<u32>,
    /// Memory at boot, MiB.
    #[arg(long, value_name = "MIB")]
    pub(crate) memory: Option<u64>,
    /// Memory a hot-plug may reach, MiB (gives the VM hot-plug slots).
    #[arg(long, value_name = "MIB")]
    pub(crate) max_memory: Option<u64>,
    /// A disk: `PATH[,id=ID][,ro][,serial=S][,format=raw|qcow2]` (repeat for more).
    #[arg(long = "disk", value_name = "SPEC")]
    pub(crate) disks: Vec<String>,
    /// A NIC: `user` or `tap=NAME`, then `[,id=ID][,mac=MAC]` (repeat for more).
    #[arg(long = "nic", value_name = "SPEC")]
    pub(crate) nics: Vec<String>,
    /// A shared directory: `HOST_DIR,tag=TAG[,id=ID][,ro][,via=virtio-fs|9p]`.
    #[arg(long = "share", value_name = "SPEC")]
    pub(crate) shares: Vec<String>,
    /// The accelerator.
    #[arg(long, value_enum)]
    pub(crate) accel: Option<AccelArg>,
    /// How the host reaches the guest agent.
    #[arg(long, value_enum)]
    pub(crate) transport: Option<TransportArg>,
    /// A backend option, `KEY=VALUE` (QEMU: `machine=microvm`, …; repeat for more).
    #[arg(short = 'o', long = "backend-option", value_name = "KEY=VALUE")]
    pub(crate) backend_options: Vec<String>,
    /// The backend's name (default `qemu`, linked in; or the one a plugin brings).
    #[arg(long, value_name = "NAME")]
    pub(crate) backend: Option<String>,
    /// Bring the backend in from this plugin library.
    #[arg(long, value_name = "FILE", conflicts_with = "backend_process")]
    pub(crate) plugin: Option<PathBuf>,
    /// Bring the backend in from this backend executable (a plugin process).
    #[arg(long, value_name = "EXE")]
    pub(crate) backend_process: Option<PathBuf>,
    /// How long the start may take, seconds.
    #[arg(long, value_name = "SECS")]
    pub(crate) start_timeout: Option<u64>,
    /// Hand the VM to a supervisor process and return once its agent answered.
    #[arg(short, long, conflicts_with = "command")]
    pub(crate) detach: bool,
    /// A command to run in the guest instead of showing the console; its exit code
    /// becomes vmkit's.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `vmkit exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Keep stdin open and pass it on.
    #[arg(short, long)]
    pub(crate) interactive: bool,
    /// Give the command a terminal.
    #[arg(short, long)]
    pub(crate) tty: bool,
    /// An environment variable, `KEY=VALUE` (repeat for more).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,
    /// The working directory in the guest.
    #[arg(short = 'w', long, value_name = "DIR")]
    pub(crate) workdir: Option<String>,
    /// The VM's name.
    pub(crate) vm: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `vmkit stop`.
#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    /// Seconds the guest gets to power off before it is stopped by force.
    #[arg(short = 't', long = "time", value_name = "SECS")]
    pub(crate) time: Option<u64>,
    /// Stop at once by force (the VMM is killed).
    #[arg(short, long)]
    pub(crate) force: bool,
    /// The VM's name.
    pub(crate) vm: String,
}

/// What `vmkit hotplug` adds.
#[derive(Debug, Subcommand)]
pub(crate) enum HotplugWhat {
    /// Set the number of vCPUs (up to the VM's maximum).
    Cpu {
        /// How many vCPUs the VM should have.
        count: u32,
    },
    /// Add memory, MiB.
    Memory {
        /// How much.
        mib: u64,
    },
    /// Add a disk: `PATH[,id=ID][,ro][,serial=S][,format=raw|qcow2]`.
    Disk {
        /// The disk.
        spec: String,
    },
    /// Add a NIC: `user` or `tap=NAME`, then `[,id=ID][,mac=MAC]`.
    Nic {
        /// The NIC.
        spec: String,
    },
    /// Share a directory: `HOST_DIR,tag=TAG[,id=ID][,ro][,via=virtio-fs|9p]`.
    Share {
        /// The share.
        spec: String,
    },
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AccelArg {
    /// KVM where it works, else TCG.
    Auto,
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
    /// Software emulation.
    Tcg,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportArg {
    /// Kernel vsock where the host has it, else hybrid vsock.
    Auto,
    /// Kernel vsock (`/dev/vhost-vsock`).
    Vsock,
    /// Hybrid vsock through vhost-user (`vhost-device-vsock`).
    HybridVsock,
    /// A virtio-serial port: no daemon, no vsock.
    VirtioSerial,
}

/// Where `vmkit backends` looks for more backends.
#[derive(Debug, Default, Args)]
pub(crate) struct BackendSources {
    /// Every plugin library in this directory (repeat for more).
    #[arg(long = "plugins", value_name = "DIR")]
    pub(crate) dirs: Vec<PathBuf>,
    /// A plugin library (repeat for more).
    #[arg(long = "library", value_name = "FILE")]
    pub(crate) libraries: Vec<PathBuf>,
    /// A backend executable, `NAME=EXECUTABLE` (repeat for more).
    #[arg(long = "process", value_name = "NAME=EXE")]
    pub(crate) processes: Vec<String>,
}
