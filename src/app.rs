//! Wiring: builds the application from the settings. The only place that knows which
//! concrete storage, expiry, payment and notification implementations are in use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Accounts, Passwords, Tokens};
use crate::catalog::{Catalog, CatalogService, CreateEventError, EventRecords, FieldError};
use crate::cluster::directory::{Directory, LEASE};
use crate::cluster::forward::Routed;
use crate::cluster::ownership::Ownership;
use crate::cluster::relay::{Relay, RelayTasks};
use crate::config::Settings;
use crate::core::inventory::Inventory;
use crate::core::reservation::{Reservation, Status};
use crate::core::{
    Clock, Event, EventId, ReservationId, SystemClock, TicketTypeId, Timestamp, UserId,
};
use crate::engine::payments::TestPayments;
use crate::engine::ports::{Commits, Records, RecoverySource};
use crate::engine::takeover::TakeoverSource;
use crate::engine::{Engine, EngineParts, ReservationService};
use crate::expiry::{sweeper, Deliveries, ExpiryStartError, DUE_CAPACITY};
use crate::fanout::notify::Notifier;
use crate::fanout::{FanOut, DEFAULT_WINDOW};
use crate::metrics::Metrics;
use crate::rpc::dispatch::{Dispatcher, Limits};
use crate::rpc::session::AddressLimiter;
use crate::rpc::{methods, Services};
use crate::store::batches;
use crate::store::writer::{BatchStorage, StorageHealth, WriteError, Writer};
use crate::store::{Change, Fence, IdempotencyRecord, Store, StoreError, StoredIdempotency};

/// The machine-readable contract, served by `rpc.discover`.
pub const OPENRPC: &str = include_str!("../protocol/openrpc.json");

/// How often the sweeper looks for overdue pending reservations that no expiry source
/// delivered.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often idempotency keys past their 24 hours are deleted.
const FORGET_KEYS_EVERY: Duration = Duration::from_secs(3600);
/// How long a cluster server waits for Redis at start.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the login budgets of quiet addresses are dropped.
const FORGET_ADDRESSES_EVERY: Duration = Duration::from_secs(10);

/// Everything a call may need. Shared by every connection behind an `Arc`.
pub struct App {
    pub settings: Settings,
    /// Reads and catalog writes.
    pub store: Store,
    /// The writer's own connections.
    writer_storage: Arc<dyn BatchStorage>,
    pub inventory: Arc<Inventory>,
    pub engine: Arc<Engine>,
    /// Whether the database is known to be down (the writer probes it until it answers).
    pub storage_health: Arc<StorageHealth>,
    pub catalog: Arc<Catalog>,
    pub fanout: Arc<FanOut>,
    pub tokens: Tokens,
    pub passwords: Passwords,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// What the method table runs with.
    pub services: Arc<Services>,
    /// What calls forwarded by other servers run with (cluster mode): the same, with the
    /// local engine only, so a forwarded call is never forwarded again.
    pub owner_services: Arc<Services>,
    /// Cluster mode's parts; `None` for a server alone on its database.
    pub cluster: Option<ClusterParts>,
    /// Logins and registrations per client address.
    pub auth_limiter: Arc<AddressLimiter>,
    /// Caps open WebSocket connections.
    pub connection_permits: Arc<Semaphore>,
    /// Cancelled when the server begins to shut down.
    pub shutdown: CancellationToken,
    /// Connection tasks, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Expiry, sweeper and clean-up tasks, stopped after the connections.
    background: TaskTracker,
    stop_background: CancellationToken,
    /// The writer runs until the very end, so every queued change is committed.
    stop_writer: CancellationToken,
    writer_task: Mutex<Option<JoinHandle<()>>>,
}

/// What a cluster server runs besides a single one.
pub struct ClusterParts {
    pub directory: Arc<Directory>,
    pub ownership: Arc<Ownership>,
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
    #[error("expiry: {0}")]
    Expiry(#[from] ExpiryStartError),
    #[error("cluster: {0}")]
    Cluster(String),
}

impl App {
    /// Connects storage, migrates, recovers the inventory and pending reservations, starts
    /// the writer and expiry, and (with `--demo`) seeds the catalog.
    pub async fn start(settings: Settings) -> Result<Arc<App>, StartError> {
        Self::start_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// [`App::start`] on the given clock (tests run on `expiry::timer::TokioClock`, so paused
    /// tokio time drives reservations' expiry).
    pub async fn start_with_clock(
        mut settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<App>, StartError> {
        let node = settings.resolve_node_id().to_owned();
        let store = Store::connect(&settings.database()).await?;
        store.migrate().await?;
        let writer_storage =
            batches::connect(&settings.database(), settings.writer_connections).await?;
        let secret = if settings.cluster && settings.jwt_secret.is_none() {
            // Every server of the cluster must check the tokens the others sign.
            let candidate = hex::encode(rand::random::<[u8; 32]>());
            store.shared_jwt_secret(&candidate).await?
        } else {
            jwt_secret(&settings)?
        };
        let metrics = Arc::new(Metrics::for_node(&node));
        let stop_writer = CancellationToken::new();
        let (writer, writer_task) = Writer::start(
            Arc::clone(&writer_storage),
            Arc::clone(&metrics),
            stop_writer.clone(),
        );
        let inventory = Arc::new(Inventory::new());
        let fanout = FanOut::new(DEFAULT_WINDOW);
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        let (due_tx, due_rx) = mpsc::channel(DUE_CAPACITY);
        let sweep_now = Arc::new(Notify::new());
        let deliveries = Deliveries {
            due: due_tx.clone(),
            sweep_now: Arc::clone(&sweep_now),
            stop: stop_background.clone(),
        };
        let expiry =
            crate::expiry::start(&settings, Arc::clone(&clock), deliveries, &background).await?;
        let storage_health = Arc::clone(writer.health());
        let directory = match (&settings.redis_url, settings.cluster) {
            (Some(url), true) => Some(Arc::new(
                Directory::new(url, &settings.redis_prefix, &node).map_err(StartError::Cluster)?,
            )),
            _ => None,
        };
        let (relay, relay_tasks) = match &directory {
            Some(_) => {
                let (relay, tasks) = Relay::new(Arc::clone(&fanout), &settings.redis_prefix, &node);
                (Some(relay), Some(tasks))
            }
            None => (None, None),
        };
        let notifier: Arc<dyn Notifier> = match &relay {
            Some(relay) => relay.clone(),
            None => fanout.clone(),
        };
        let engine = Arc::new(Engine::new(EngineParts {
            inventory: Arc::clone(&inventory),
            store: Arc::new(store.clone()),
            writer: Arc::new(writer),
            expiry,
            payments: Arc::new(TestPayments),
            notifier,
            clock: Arc::clone(&clock),
            ttl: settings.reservation_ttl,
            fenced: settings.cluster,
        }));
        let tokens = Tokens::new(secret.as_bytes(), settings.token_ttl);
        let passwords = Passwords::new(std::thread::available_parallelism().map_or(2, |n| n.get()));
        let claim_now = Arc::new(Notify::new());
        let mut catalog = Catalog::new(
            Arc::new(store.clone()),
            Arc::clone(&inventory),
            Arc::clone(&clock),
        );
        if directory.is_some() {
            catalog = catalog.claimed_by(Arc::clone(&claim_now));
        }
        let catalog = Arc::new(catalog);
        let tasks = TaskTracker::new();
        let accounts: Arc<Accounts> = Arc::new(
            Accounts::new(
                store.clone(),
                tokens.clone(),
                passwords.clone(),
                Arc::clone(&clock),
            )
            .watching(Arc::clone(&storage_health)),
        );
        let services_with = |reservations: Arc<dyn ReservationService>| {
            Arc::new(Services {
                reservations,
                catalog: catalog.clone(),
                accounts: accounts.clone(),
                subscriptions: Arc::clone(&fanout),
                clock: Arc::clone(&clock),
                metrics: Arc::clone(&metrics),
                tasks: tasks.clone(),
                openrpc: serde_json::from_str(OPENRPC)
                    .expect("protocol/openrpc.json is valid JSON"),
                dispatcher: Dispatcher::new(
                    methods::all(),
                    Limits {
                        max_batch: settings.max_batch as usize,
                    },
                ),
            })
        };
        let owner_services = services_with(engine.clone());
        let (services, cluster) = match &directory {
            Some(directory) => {
                let base_url = settings.advertise_url.clone().ok_or_else(|| {
                    StartError::Cluster("no address to advertise (--advertise-url)".to_owned())
                })?;
                let routed = Routed::new(
                    engine.clone(),
                    Arc::new(store.clone()),
                    Arc::clone(directory),
                    tokens.clone(),
                    Arc::clone(&clock),
                    Arc::clone(&metrics),
                );
                let ownership = Arc::new(Ownership::new(
                    Arc::clone(directory),
                    engine.clone(),
                    Arc::clone(&inventory),
                    Arc::new(store.clone()),
                    Arc::clone(&metrics),
                    relay.clone().expect("a relay in cluster mode"),
                    base_url,
                    Arc::clone(&claim_now),
                ));
                let parts = ClusterParts {
                    directory: Arc::clone(directory),
                    ownership,
                };
                (services_with(Arc::new(routed)), Some(parts))
            }
            None => (Arc::clone(&owner_services), None),
        };
        let app = Arc::new(App {
            auth_limiter: Arc::new(AddressLimiter::new(
                settings.auth_rate_limit,
                settings.auth_rate_burst,
            )),
            connection_permits: Arc::new(Semaphore::new(settings.max_connections as usize)),
            tokens,
            passwords,
            services,
            owner_services,
            cluster,
            catalog,
            shutdown: CancellationToken::new(),
            tasks,
            background,
            stop_background,
            stop_writer,
            writer_task: Mutex::new(Some(writer_task)),
            store,
            writer_storage,
            inventory,
            engine,
            storage_health,
            fanout,
            metrics,
            clock,
            settings,
        });
        match &app.cluster {
            None => app.recover().await?,
            Some(cluster) => {
                app.join_cluster(cluster, relay_tasks).await?;
            }
        }
        app.background
            .spawn(Arc::clone(&app.fanout).run(app.stop_background.clone()));
        app.background.spawn(sweeper::expire_due(
            app.engine.clone(),
            due_rx,
            app.background.clone(),
            app.stop_background.clone(),
        ));
        app.background.spawn(sweeper::sweep(
            app.engine.clone(),
            due_tx,
            sweep_now,
            SWEEP_EVERY,
            app.stop_background.clone(),
        ));
        app.background.spawn(forget_old_keys(Arc::clone(&app)));
        app.background
            .spawn(forget_idle_addresses(Arc::clone(&app)));
        if app.settings.demo {
            app.seed_demo().await?;
        }
        Ok(app)
    }

    /// Rebuilds availability and puts pending reservations back under expiry
    /// (`engine::recovery`), from the database.
    async fn recover(&self) -> Result<(), StoreError> {
        let recovered = self.engine.recover(&self.store).await?;
        tracing::info!(
            events = recovered.events,
            pending = recovered.pending,
            "recovered availability and pending reservations"
        );
        Ok(())
    }

    /// Cluster mode: every event starts as a mirror (nothing is taken over at start), the
    /// relay starts, and the ownership round claims what nobody owns.
    async fn join_cluster(
        &self,
        cluster: &ClusterParts,
        relay: Option<RelayTasks>,
    ) -> Result<(), StartError> {
        let directory = &cluster.directory;
        if !directory.connect(CLUSTER_CONNECT_TIMEOUT).await {
            return Err(StartError::Cluster(format!(
                "Redis did not answer within {} s",
                CLUSTER_CONNECT_TIMEOUT.as_secs()
            )));
        }
        self.take_node_id(directory).await?;
        let mirrored = self.engine.mirror_new_events(&self.store).await?;
        tracing::info!(
            events = mirrored.len(),
            node = directory.node(),
            "joined the cluster: events mirrored until claimed"
        );
        if let Some(relay) = relay {
            self.background
                .spawn(relay.publish(directory.client().clone(), self.stop_background.clone()));
        }
        let subscriber = crate::cluster::directory::subscriber_for(
            self.settings.redis_url.as_deref().unwrap_or_default(),
        )
        .map_err(StartError::Cluster)?;
        self.background.spawn(crate::cluster::relay::listen(
            subscriber,
            self.settings.redis_prefix.clone(),
            directory.node().to_owned(),
            Arc::clone(&self.inventory),
            Arc::clone(&self.fanout),
            Arc::clone(&cluster.ownership.claim_now),
            self.stop_background.clone(),
        ));
        // The first round before any call: this server claims what nobody holds.
        cluster.ownership.round().await;
        self.background
            .spawn(Arc::clone(&cluster.ownership).run(self.stop_background.clone()));
        Ok(())
    }

    /// Two live servers with one node id would renew each other's leases: wait for an
    /// earlier holder of the id to lapse (a restart), else refuse.
    async fn take_node_id(&self, directory: &Directory) -> Result<(), StartError> {
        let url = self.settings.advertise_url.clone().unwrap_or_default();
        let give_up_at = tokio::time::Instant::now() + LEASE + Duration::from_secs(1);
        loop {
            match directory.take_node_id(&url).await {
                Ok(true) => return Ok(()),
                Ok(false) if tokio::time::Instant::now() >= give_up_at => {
                    return Err(StartError::Cluster(format!(
                        "--node-id {} is in use by another running server",
                        directory.node()
                    )))
                }
                Ok(false) => {}
                Err(error) => return Err(StartError::Cluster(format!("Redis: {error}"))),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn seed_demo(&self) -> Result<(), StartError> {
        if self.store.event_count().await? > 0 {
            return Ok(());
        }
        for draft in crate::demo::events() {
            match self.catalog.create_event(&draft).await {
                Ok(_) => {}
                Err(CreateEventError::Invalid(e)) => return Err(StartError::Demo(e)),
                Err(CreateEventError::Store(e)) => return Err(e.into()),
            }
        }
        tracing::info!("seeded the demo events");
        Ok(())
    }

    /// The last step of shutdown, after the connections: stops expiry and the sweeper,
    /// then lets the writer commit everything queued, then closes the database.
    pub async fn stop(&self) {
        self.stop_background.cancel();
        self.background.close();
        self.background.wait().await;
        self.stop_writer.cancel();
        let writer = self
            .writer_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        if let Some(cluster) = &self.cluster {
            // Everything acknowledged is committed: hand the events over now.
            cluster.ownership.resign().await;
            cluster.directory.quit().await;
        }
        self.close_storage().await;
    }

    /// Closes every database connection; from then on each change answers `UNAVAILABLE`.
    pub async fn close_storage(&self) {
        self.writer_storage.close().await;
        self.store.close().await;
    }
}

/// Drops the login budgets of addresses that are back to full, so the table stays small.
async fn forget_idle_addresses(app: Arc<App>) {
    let mut every = tokio::time::interval(FORGET_ADDRESSES_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = app.stop_background.cancelled() => return,
        }
        app.auth_limiter.forget_idle();
    }
}

async fn forget_old_keys(app: Arc<App>) {
    let mut every = tokio::time::interval(FORGET_KEYS_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = app.stop_background.cancelled() => return,
        }
        match app.engine.forget_old_keys().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "forgot idempotency keys older than 24 hours"),
            Err(error) => tracing::warn!(%error, "could not delete old idempotency keys"),
        }
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

/// The engine's writer port is the group-commit writer.
#[async_trait]
impl Commits for Writer {
    async fn commit(
        &self,
        change: Change,
        idempotency: Option<IdempotencyRecord>,
        fence: Option<Fence>,
    ) -> Result<(), WriteError> {
        Writer::commit(self, change, idempotency, fence).await
    }

    fn is_down(&self) -> bool {
        self.health().is_down()
    }
}

/// The engine reads what is committed from the database.
#[async_trait]
impl Records for Store {
    async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, StoreError> {
        Store::reservation(self, id).await
    }

    async fn reservations_of(
        &self,
        user: UserId,
        status: Option<Status>,
        limit: usize,
    ) -> Result<Vec<Reservation>, StoreError> {
        Store::reservations_of(self, user, status, limit).await
    }

    async fn idempotency(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        Store::idempotency(self, user, method, key, now).await
    }

    async fn claim_idempotency_key(
        &self,
        user: UserId,
        method: &str,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<StoredIdempotency>, StoreError> {
        Store::claim_idempotency_key(self, user, method, key, now).await
    }

    async fn delete_old_idempotency_keys(&self, now: Timestamp) -> Result<u64, StoreError> {
        Store::delete_old_idempotency_keys(self, now).await
    }
}

/// Recovery reads the catalog, what is held and what is pending from the database.
#[async_trait]
impl RecoverySource for Store {
    async fn take_over_events(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        Store::take_over_events(self).await
    }

    async fn load_events(&self) -> Result<Vec<Event>, StoreError> {
        Store::load_events(self).await
    }

    async fn held_per_ticket_type(&self) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        Store::held_per_ticket_type(self).await
    }

    async fn pending_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        Store::pending_reservations(self).await
    }
}

/// Taking events over reads and bumps their rows.
#[async_trait]
impl TakeoverSource for Store {
    async fn take_over_event(&self, id: EventId) -> Result<u64, StoreError> {
        Store::take_over_event(self, id).await
    }

    async fn event_epochs(&self) -> Result<HashMap<EventId, u64>, StoreError> {
        Store::event_epochs(self).await
    }

    async fn load_events(&self) -> Result<Vec<Event>, StoreError> {
        Store::load_events(self).await
    }

    async fn held_of_event(&self, id: EventId) -> Result<HashMap<TicketTypeId, u64>, StoreError> {
        Store::held_of_event(self, id).await
    }

    async fn pending_of_event(&self, id: EventId) -> Result<Vec<Reservation>, StoreError> {
        Store::pending_of_event(self, id).await
    }
}

/// Created events are stored in the database.
#[async_trait]
impl EventRecords for Store {
    async fn insert_event(&self, event: &Event, now: Timestamp) -> Result<(), StoreError> {
        Store::insert_event(self, event, now).await
    }
}
