//! [`Backend`]s and the [`Registry`] that lists them: backends linked into the binary
//! register themselves with [`register_backend!`](crate::register_backend); backends
//! loaded at run time (plugins) are added with [`Registry::register`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::InstanceConfig;
use crate::error::{Error, Result};
use crate::info::Capabilities;
use crate::instance::Instance;

/// A VMM backend: a factory of [`Instance`]s.
pub trait Backend: Send + Sync {
    /// The backend's unique name (`"qemu"`).
    fn name(&self) -> &str;

    /// What instances of this backend can do on this host, at most.
    fn capabilities(&self) -> Capabilities;

    /// Validates `config` (once: [`InstanceConfig::validate`] plus the backend's own
    /// rules) and creates an instance in `New`. Starts nothing.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the wrong field.
    fn create(&self, config: InstanceConfig) -> Result<Box<dyn Instance>>;
}

/// A backend linked into the binary. Submit one with [`register_backend!`](crate::register_backend).
///
/// Mind that a crate the binary never names is not linked, and its registration with
/// it: name the backend crate somewhere (`use vmkit_qemu as _;`).
pub struct BackendRegistration {
    factory: fn() -> Arc<dyn Backend>,
}

impl BackendRegistration {
    /// A registration that builds its backend with `factory` (called once per
    /// [`Registry::from_inventory`]; keep it cheap).
    pub const fn new(factory: fn() -> Arc<dyn Backend>) -> Self {
        BackendRegistration { factory }
    }
}

inventory::collect!(BackendRegistration);

/// Registers a backend linked into the binary:
/// `vmkit_core::register_backend!(|| std::sync::Arc::new(MyBackend));`
#[macro_export]
macro_rules! register_backend {
    ($factory:expr) => {
        $crate::__inventory::submit! {
            $crate::BackendRegistration::new($factory)
        }
    };
}

/// Where a backend in a [`Registry`] came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackendOrigin {
    /// Linked into the binary.
    #[default]
    Linked,
    /// Loaded from a plugin library.
    Library(PathBuf),
    /// Served by a backend process, run from this executable.
    Process(PathBuf),
}

impl fmt::Display for BackendOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendOrigin::Linked => f.write_str("linked in"),
            BackendOrigin::Library(path) => write!(f, "library {}", path.display()),
            BackendOrigin::Process(path) => write!(f, "process {}", path.display()),
        }
    }
}

/// One line of [`Registry::listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendListing {
    /// The backend's name.
    pub name: String,
    /// Where it came from.
    pub origin: BackendOrigin,
    /// What its instances can do, at most.
    pub capabilities: Capabilities,
}

/// The backends available to this process, by name.
#[derive(Clone, Default)]
pub struct Registry {
    backends: BTreeMap<String, (Arc<dyn Backend>, BackendOrigin)>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("backends", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry holding every backend registered with
    /// [`register_backend!`](crate::register_backend) in this binary.
    ///
    /// # Errors
    /// [`Error::DuplicateBackend`] when two registrations share a name.
    pub fn from_inventory() -> Result<Self> {
        let mut registry = Registry::new();
        for registration in inventory::iter::<BackendRegistration> {
            registry.register((registration.factory)())?;
        }
        Ok(registry)
    }

    /// Adds a backend linked into the binary.
    ///
    /// # Errors
    /// [`Error::DuplicateBackend`] when the name is taken.
    pub fn register(&mut self, backend: Arc<dyn Backend>) -> Result<()> {
        self.register_from(backend, BackendOrigin::Linked)
    }

    /// Adds a backend that came from `origin` (a plugin library, a backend process).
    ///
    /// # Errors
    /// [`Error::DuplicateBackend`] when the name is taken.
    pub fn register_from(
        &mut self,
        backend: Arc<dyn Backend>,
        origin: BackendOrigin,
    ) -> Result<()> {
        let name = backend.name().to_owned();
        if self.backends.contains_key(&name) {
            return Err(Error::DuplicateBackend { name });
        }
        self.backends.insert(name, (backend, origin));
        Ok(())
    }

    /// Every backend with where it came from and its capabilities, by name.
    pub fn listing(&self) -> Vec<BackendListing> {
        self.backends
            .iter()
            .map(|(name, (backend, origin))| BackendListing {
                name: name.clone(),
                origin: origin.clone(),
                capabilities: backend.capabilities(),
            })
            .collect()
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.backends.keys().cloned().collect()
    }

    /// The backend called `name`.
    ///
    /// # Errors
    /// [`Error::UnknownBackend`] listing the known names.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Backend>> {
        self.backends
            .get(name)
            .map(|(backend, _)| Arc::clone(backend))
            .ok_or_else(|| Error::UnknownBackend {
                name: name.to_owned(),
                known: self.names(),
            })
    }

    /// Creates an instance with the backend called `backend`.
    ///
    /// # Errors
    /// [`Error::UnknownBackend`], or the backend's own validation error.
    pub fn create(&self, backend: &str, config: InstanceConfig) -> Result<Box<dyn Instance>> {
        self.get(backend)?.create(config)
    }
}
