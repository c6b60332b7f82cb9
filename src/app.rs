//! Wiring: builds the application from the settings. The only place that knows which
//! concrete storage, expiry and payment implementations are in use.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Passwords, Tokens};
use crate::catalog::{EventDraft, FieldError};
use crate::config::Settings;
use crate::core::inventory::Inventory;
use crate::core::{Clock, Event, SystemClock};
use crate::metrics::Metrics;
use crate::rpc::dispatch::{Dispatcher, Limits};
use crate::rpc::methods;
use crate::store::{Store, StoreError};

/// The machine-readable contract, served by `rpc.discover`.
pub const OPENRPC: &str = include_str!("../protocol/openrpc.json");

/// Everything a call may need. Shared by every connection behind an `Arc`.
pub struct App {
    pub settings: Settings,
    pub store: Store,
    pub inventory: Inventory,
    pub tokens: Tokens,
    pub passwords: Passwords,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    pub dispatcher: Dispatcher,
    /// Caps open WebSocket connections.
    pub connection_permits: Arc<Semaphore>,
    /// Cancelled when the server begins to shut down.
    pub shutdown: CancellationToken,
    /// Connection tasks, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub openrpc: Value,
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("JWT secret file {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
    #[error("demo event {0}")]
    Demo(FieldError),
}

/// Why an event could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateEventError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl App {
    /// Connects storage, migrates, loads the catalog and (with `--demo`) seeds it.
    pub async fn start(settings: Settings) -> Result<Arc<App>, StartError> {
        let store = Store::connect(&settings.database()).await?;
        store.migrate().await?;
        let secret = jwt_secret(&settings)?;
        let tokens = Tokens::new(secret.as_bytes(), settings.token_ttl);
        let limits = Limits {
            max_batch: settings.max_batch as usize,
        };
        let app = Arc::new(App {
            connection_permits: Arc::new(Semaphore::new(settings.max_connections as usize)),
            store,
            inventory: Inventory::new(),
            tokens,
            passwords: Passwords::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            metrics: Metrics::new(),
            clock: Arc::new(SystemClock),
            dispatcher: Dispatcher::new(methods::all(), limits),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            openrpc: serde_json::from_str(OPENRPC).expect("protocol/openrpc.json is valid JSON"),
            settings,
        });
        app.load_catalog().await?;
        if app.settings.demo {
            app.seed_demo().await?;
        }
        Ok(app)
    }

    async fn load_catalog(&self) -> Result<(), StoreError> {
        for event in self.store.load_events().await? {
            let available: Vec<u32> = event.ticket_types.iter().map(|tt| tt.capacity).collect();
            self.inventory.insert_event(event, &available);
        }
        Ok(())
    }

    async fn seed_demo(&self) -> Result<(), StartError> {
        if self.store.event_count().await? > 0 {
            return Ok(());
        }
        for draft in crate::demo::events() {
            match self.create_event(&draft).await {
                Ok(_) => {}
                Err(CreateEventError::Invalid(e)) => return Err(StartError::Demo(e)),
                Err(CreateEventError::Store(e)) => return Err(e.into()),
            }
        }
        tracing::info!("seeded the demo events");
        Ok(())
    }

    /// Validates a draft, stores the event and puts its pools in the inventory.
    pub async fn create_event(&self, draft: &EventDraft) -> Result<Event, CreateEventError> {
        let event = draft.validate()?;
        self.store.insert_event(&event, self.clock.now()).await?;
        let available: Vec<u32> = event.ticket_types.iter().map(|tt| tt.capacity).collect();
        self.inventory.insert_event(event.clone(), &available);
        tracing::info!(event_id = %event.id, name = %event.name, "event created");
        Ok(event)
    }
}

/// The configured secret, or the one kept in the data folder (generated on first use).
fn jwt_secret(settings: &Settings) -> Result<String, StartError> {
    if let Some(secret) = &settings.jwt_secret {
        return Ok(secret.clone());
    }
    let path = settings.data_dir.join("jwt-secret");
    let io = |source| StartError::Secret {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => {
            tracing::warn!(path = %path.display(), "no TICKET_API_JWT_SECRET set: using the secret kept in the data folder");
            return Ok(secret.trim().to_owned());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &secret).map_err(io)?;
    tracing::warn!(path = %path.display(), "no TICKET_API_JWT_SECRET set: generated one and kept it in the data folder");
    Ok(secret)
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents.as_bytes())
}
