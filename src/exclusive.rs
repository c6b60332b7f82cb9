//! One server per database outside cluster mode (PROTOCOL §9): two servers, each with its
//! own inventory in memory, over one database would sell the same tickets twice. A server
//! holds, for its lifetime, a PostgreSQL advisory lock on a connection of its own, or an
//! exclusive lock on a file next to the SQLite database. The operating system and
//! PostgreSQL release both when the process ends, however it ends.
//!
//! Cluster servers hold the same advisory lock *shared*: any number of them together, but
//! never beside a server that holds it exclusively, in either order.

use std::path::PathBuf;

use sqlx::Connection;

use crate::config::DatabaseUrl;

/// The advisory lock's key: "ticket-a" in ASCII, the same for every server of this program.
/// Advisory locks are per database, so servers on other databases do not meet.
const ADVISORY_KEY: i64 = 0x7469_636b_6574_2d61;

/// Held while the server runs; dropping it lets another server start.
pub enum DatabaseLock {
    Postgres(#[allow(dead_code)] sqlx::PgConnection),
    Sqlite(#[allow(dead_code)] std::fs::File),
    /// An in-memory database is this process's alone.
    Private,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("DATABASE_URL: another ticket-api server is using this database; stop it first (several servers on one database need --cluster)")]
    Held,
    #[error("DATABASE_URL: a ticket-api server outside cluster mode is using this database; stop it first, or start every server with --cluster")]
    HeldAlone,
    #[error("DATABASE_URL: ticket-api servers in cluster mode are using this database; start this one with --cluster too")]
    HeldByCluster,
    #[error("database lock: {0}")]
    Failed(String),
}

/// Takes the database for this process (shared with other cluster servers when
/// `cluster`), or says that another server has it.
pub async fn acquire(database: &DatabaseUrl, cluster: bool) -> Result<DatabaseLock, LockError> {
    match database {
        DatabaseUrl::Postgres(url) => {
            let mut connection = sqlx::PgConnection::connect(url)
                .await
                .map_err(|e| LockError::Failed(e.to_string()))?;
            let take = if cluster {
                "SELECT pg_try_advisory_lock_shared($1)"
            } else {
                "SELECT pg_try_advisory_lock($1)"
            };
            let taken: bool = sqlx::query_scalar(take)
                .bind(ADVISORY_KEY)
                .fetch_one(&mut connection)
                .await
                .map_err(|e| LockError::Failed(e.to_string()))?;
            if taken {
                return Ok(DatabaseLock::Postgres(connection));
            }
            // Who holds it: cluster servers hold it shared (mode ShareLock).
            // A bigint advisory key shows as classid (high half) and objid (low half).
            let shared: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND granted AND mode = 'ShareLock' AND objsubid = 1 \
                 AND classid::bigint = $1 AND objid::bigint = $2 AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database()))",
            )
            .bind(ADVISORY_KEY >> 32)
            .bind(ADVISORY_KEY & 0xffff_ffff)
            .fetch_one(&mut connection)
            .await
            .unwrap_or(false);
            Err(match (cluster, shared) {
                (true, _) => LockError::HeldAlone,
                (false, true) => LockError::HeldByCluster,
                (false, false) => LockError::Held,
            })
        }
        DatabaseUrl::Sqlite(url) => {
            let Some(path) = lock_path(url) else {
                return Ok(DatabaseLock::Private);
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| LockError::Failed(e.to_string()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| LockError::Failed(format!("{}: {e}", path.display())))?;
            // `File::try_lock` is an `flock` on Unix: released by the kernel when the process
            // dies, so a crashed server never leaves the folder locked.
            let locked = file.try_lock();
            match locked {
                Ok(()) => Ok(DatabaseLock::Sqlite(file)),
                Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held),
                Err(std::fs::TryLockError::Error(e)) => {
                    Err(LockError::Failed(format!("{}: {e}", path.display())))
                }
            }
        }
    }
}

/// `<database file>.lock`, or `None` for an in-memory database.
fn lock_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.contains("mode=memory") {
        return None;
    }
    Some(PathBuf::from(format!("{path}.lock")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_next_to_the_database_file() {
        assert_eq!(
            lock_path("sqlite://data/ticket-api.db?mode=rwc"),
            Some(PathBuf::from("data/ticket-api.db.lock"))
        );
        assert_eq!(
            lock_path("sqlite:/tmp/x.db"),
            Some(PathBuf::from("/tmp/x.db.lock"))
        );
        assert_eq!(lock_path("sqlite::memory:"), None);
        assert_eq!(lock_path("sqlite://x?mode=memory"), None);
    }

    #[tokio::test]
    async fn a_second_holder_of_one_sqlite_database_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::embedded(dir.path());
        let first = acquire(&url, false).await.unwrap();
        assert!(matches!(acquire(&url, false).await, Err(LockError::Held)));
        drop(first);
        assert!(acquire(&url, false).await.is_ok());
    }
}
