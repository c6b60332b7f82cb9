//! Storage: PostgreSQL or SQLite through sqlx's `Any` driver, with runtime queries written
//! once in the SQL both databases speak (`$n` parameters, BIGINT and TEXT columns). The
//! writer's group commit, the hot path, runs on the native drivers instead (`batches`).
//! Converting rows to domain values, and constraint violations to domain errors, happens
//! here and nowhere else.

pub mod batches;
mod catalog;
mod reservations;
mod tenure;
mod users;
pub mod writer;

pub use reservations::{Change, Fence, IdempotencyRecord, PaymentRecord, StoredIdempotency};

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

use crate::config::DatabaseUrl;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with this unique value exists already.
    #[error("duplicate: {0}")]
    Duplicate(&'static str),
    /// A stored value could not be turned back into a domain value.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The connection failed during COMMIT: the batch may or may not be in the database.
    /// [`writer::BatchStorage::batch_committed`] with this batch id tells, once the database
    /// answers.
    #[error("outcome of batch {batch} unknown: {cause}")]
    OutcomeUnknown { batch: String, cause: sqlx::Error },
    /// Another server has taken the event over since this one's epoch (cluster mode).
    #[error("event {0} was taken over by another server")]
    Fenced(crate::core::EventId),
    /// The database did not answer within the time allowed for this work.
    #[error("{0} took too long")]
    TimedOut(&'static str),
}

impl StoreError {
    fn corrupt(table: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Corrupt {
            table,
            detail: detail.to_string(),
        }
    }
}

/// The database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects; for SQLite the file (and its folder) is created when missing.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = match url {
            DatabaseUrl::Postgres(_) => Backend::Postgres,
            DatabaseUrl::Sqlite(text) => {
                create_sqlite_folder(text);
                Backend::Sqlite
            }
        };
        let options: AnyConnectOptions = url.as_str().parse()?;
        let pool_options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .max_connections(match backend {
                Backend::Postgres => 16,
                Backend::Sqlite => 8,
            });
        let pool = match backend {
            Backend::Postgres => pool_options.connect_with(options).await?,
            // WAL lets readers run beside the one writer; FULL syncs each commit, which the
            // group commit amortises; the busy timeout covers the short writer lock.
            Backend::Sqlite => {
                pool_options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
        };
        Ok(Self { pool, backend })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Applies the migrations of this backend that are not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))
    }

    /// A round trip to the database, for `/health`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn create_sqlite_folder(url: &str) {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(':') {
        return;
    }
    if let Some(parent) = Path::new(path).parent() {
        // A failure here surfaces as a clear connect error just after.
        let _ = std::fs::create_dir_all(parent);
    }
}

/// Maps a unique violation to `Duplicate(what)`, any other error through unchanged.
fn unique_as(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |err| match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Duplicate(what),
        _ => StoreError::Database(err),
    }
}

/// Reads a text column holding an id.
fn id_column<T: std::str::FromStr>(
    row: &sqlx::any::AnyRow,
    table: &'static str,
    column: &'static str,
) -> Result<T, StoreError> {
    use sqlx::Row;
    row.try_get::<String, _>(column)?
        .parse()
        .map_err(|_| StoreError::corrupt(table, format!("bad id in {column}")))
}

fn to_i64(value: u32) -> i64 {
    i64::from(value)
}

fn to_u32(table: &'static str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::corrupt(table, format!("{value} is not a count")))
}
