//! The instance traits for `Box<T>` and `Arc<T>` of any instance (`dyn Instance`
//! included): what a `Registry` hands out (`Box<dyn Instance>`) or a runtime shares
//! (`Arc<dyn Instance>`) is itself an `Instance`, so it can be passed where one is
//! expected (a wrapper backend, a conformance target, a generic helper). Every method
//! forwards to the pointee, provided ones included, so an override is kept.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::device_spec::{DeviceInfo, DeviceSpec};
use crate::devices::{DiskConfig, MacAddr, NicConfig};
use crate::error::Result;
use crate::info::{ExitInfo, VmEvent, VmInfo};
use crate::instance::{
    DeviceConfigurator, GuestClient, GuestCommunicator, GuestStream, Instance, StartOptions,
};
use crate::resources::{CpuHotplugger, MemoryHotplugger, ResourceManager};
use crate::state::VmState;

macro_rules! forward {
    ($pointer:ident) => {
        #[async_trait]
        impl<T: Instance + ?Sized> Instance for $pointer<T> {
            async fn start(&self, opts: StartOptions) -> Result<()> {
                (**self).start(opts).await
            }

            async fn shutdown(&self) -> Result<ExitInfo> {
                (**self).shutdown().await
            }

            async fn pause(&self) -> Result<()> {
                (**self).pause().await
            }

            async fn resume(&self) -> Result<()> {
                (**self).resume().await
            }

            async fn wait(&self) -> ExitInfo {
                (**self).wait().await
            }

            fn state(&self) -> VmState {
                (**self).state()
            }

            fn vm_info(&self) -> VmInfo {
                (**self).vm_info()
            }

            fn events(&self) -> broadcast::Receiver<VmEvent> {
                (**self).events()
            }
        }

        #[async_trait]
        impl<T: DeviceConfigurator + ?Sized> DeviceConfigurator for $pointer<T> {
            fn add_device(&self, spec: DeviceSpec) -> Result<()> {
                (**self).add_device(spec)
            }

            async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()> {
                (**self).hotplug_device(spec).await
            }

            async fn unplug(&self, id: &str) -> Result<()> {
                (**self).unplug(id).await
            }

            fn devices(&self) -> Vec<DeviceInfo> {
                (**self).devices()
            }

            fn add_disk(&self, disk: DiskConfig) -> Result<()> {
                (**self).add_disk(disk)
            }

            fn add_nic(&self, nic: NicConfig) -> Result<()> {
                (**self).add_nic(nic)
            }

            fn add_tap_nic(&self, id: &str, tap: &str, mac: Option<MacAddr>) -> Result<()> {
                (**self).add_tap_nic(id, tap, mac)
            }

            async fn hotplug_disk(&self, disk: DiskConfig) -> Result<()> {
                (**self).hotplug_disk(disk).await
            }

            async fn hotplug_nic(&self, nic: NicConfig) -> Result<()> {
                (**self).hotplug_nic(nic).await
            }
        }

        #[async_trait]
        impl<T: GuestCommunicator + ?Sized> GuestCommunicator for $pointer<T> {
            async fn client(&self) -> Result<GuestClient> {
                (**self).client().await
            }

            async fn dial_client(&self) -> Result<GuestClient> {
                (**self).dial_client().await
            }

            async fn dial_client_with_retry(&self, timeout: Duration) -> Result<GuestClient> {
                (**self).dial_client_with_retry(timeout).await
            }

            async fn start_stream(&self, port: u32) -> Result<Box<dyn GuestStream>> {
                (**self).start_stream(port).await
            }
        }

        impl<T: ResourceManager + ?Sized> ResourceManager for $pointer<T> {
            fn cpu_hotplugger(&self) -> Option<&dyn CpuHotplugger> {
                (**self).cpu_hotplugger()
            }

            fn memory_hotplugger(&self) -> Option<&dyn MemoryHotplugger> {
                (**self).memory_hotplugger()
            }
        }
    };
}

forward!(Box);
forward!(Arc);

// Tested where an instance exists to box: vmkit-testkit's tests/fake_backend.rs.
