//! The sub-commands: `serve` (default), `migrate`, `user add`, `events import`.

use std::sync::Arc;

use crate::app::App;
use crate::auth::password::Passwords;
use crate::catalog::{CatalogService, EventDraft};
use crate::config::{Command, EventsCommand, Settings, UserCommand};
use crate::core::{Clock, Email, Password, Role, User, UserId};
use crate::store::Store;

/// A failure of a command, printed as one line.
pub type CommandError = Box<dyn std::error::Error + Send + Sync>;

/// A setting or situation that stops the program before it starts: one line and exit
/// code 2, as a bad setting (PROTOCOL §9).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Cluster mode needs PostgreSQL and Redis (PROTOCOL §9).
fn check_cluster(settings: &Settings) -> Result<(), Refusal> {
    if !settings.cluster {
        return Ok(());
    }
    if !settings.database().is_postgres() {
        return Err(Refusal(
            "--cluster: needs a postgres:// --database-url (DATABASE_URL)".to_owned(),
        ));
    }
    if settings.redis_url.is_none() {
        return Err(Refusal(
            "--cluster: needs --redis-url (REDIS_URL)".to_owned(),
        ));
    }
    Ok(())
}

/// The URL other servers reach this one at: the configured one, or the bound address.
fn advertised(settings: &Settings, bound: std::net::SocketAddr) -> Result<String, Refusal> {
    if let Some(url) = &settings.advertise_url {
        return Ok(url.clone());
    }
    if bound.ip().is_unspecified() {
        return Err(Refusal(format!(
            "--cluster: listening on {bound} needs --advertise-url (TICKET_API_ADVERTISE_URL): the address other servers reach this one at"
        )));
    }
    Ok(format!("http://{bound}"))
}

/// Takes the database for this process: another server on it is a refusal (exit 2).
async fn take_database(
    settings: &Settings,
) -> Result<crate::exclusive::DatabaseLock, CommandError> {
    use crate::exclusive::{acquire, LockError};
    match acquire(&settings.database(), settings.cluster).await {
        Ok(lock) => Ok(lock),
        Err(held @ (LockError::Held | LockError::HeldAlone | LockError::HeldByCluster)) => {
            Err(Refusal(held.to_string()).into())
        }
        Err(other) => Err(other.into()),
    }
}

pub async fn run(command: Command, settings: Settings) -> Result<(), CommandError> {
    match command {
        Command::Serve => serve(settings).await,
        Command::Migrate => {
            let store = Store::connect(&settings.database()).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::User(UserCommand::Add {
            email,
            password,
            admin,
        }) => add_user(settings, &email, password, admin).await,
        Command::Events(EventsCommand::Import { file }) => import_events(settings, &file).await,
    }
}

/// Starts the server and runs it until SIGINT or SIGTERM.
pub async fn serve(mut settings: Settings) -> Result<(), CommandError> {
    check_cluster(&settings)?;
    // Held until the server has stopped.
    let _database = take_database(&settings).await?;
    let listener = crate::server::bind(settings.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    if settings.cluster {
        settings.advertise_url = Some(advertised(&settings, listener.local_addr()?)?);
    }
    let app = App::start(settings).await?;
    let addr = listener.local_addr()?;
    let node = app.settings.node_id.as_deref().unwrap_or("");
    tracing::info!(%addr, node, database = ?app.settings.database(), "listening");
    println!("ticket-api listening on {addr}");
    println!("open http://{addr}/ in a browser; JSON-RPC at ws://{addr}/ws and http://{addr}/rpc");
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing calls in flight");
        shutdown.cancel();
    });
    crate::server::run(listener, Arc::clone(&app)).await?;
    Ok(())
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn add_user(
    settings: Settings,
    email: &str,
    password: String,
    admin: bool,
) -> Result<(), CommandError> {
    let email = Email::parse(email).ok_or("--email: not an email address")?;
    let password =
        Password::for_new_account(password).map_err(|why| format!("--password: {why}"))?;
    let store = Store::connect(&settings.database()).await?;
    store.migrate().await?;
    let hash = Passwords::new(1).hash(password.into_inner()).await?;
    let user = User {
        id: UserId::new(),
        email: email.into(),
        role: if admin { Role::Admin } else { Role::Customer },
    };
    store
        .insert_user(&user, &hash, crate::core::SystemClock.now())
        .await?;
    println!(
        "created {} {} ({})",
        user.role.as_str(),
        user.email,
        user.id
    );
    Ok(())
}

/// Reads an `events import` file: a JSON array of `admin.events.create` params, each
/// checked as the method checks it. Everything is validated first, so a bad file creates
/// nothing.
pub fn parse_import(bytes: &[u8]) -> Result<Vec<EventDraft>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let serde_json::Value::Array(entries) = value else {
        return Err("expected an array of events".to_owned());
    };
    let mut drafts = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let serde_json::Value::Object(object) = entry else {
            return Err(format!("event [{i}]: expected an object"));
        };
        crate::rpc::shape::objects_only(&object, "")
            .map_err(|e| format!("event [{i}]: {}: {}", e.field, e.message))?;
        let draft: EventDraft = serde_path_to_error::deserialize(serde_json::Value::Object(object))
            .map_err(|e| format!("event [{i}]: {}: {}", e.path(), e.inner()))?;
        draft.validate().map_err(|e| format!("event [{i}]: {e}"))?;
        drafts.push(draft);
    }
    Ok(drafts)
}

async fn import_events(settings: Settings, file: &std::path::Path) -> Result<(), CommandError> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let drafts = parse_import(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    // Never behind the back of a running server outside cluster mode: its inventory would
    // not see the new events. Cluster servers pick them up from the database.
    let _database = take_database(&settings).await?;
    let store = Store::connect(&settings.database()).await?;
    store.migrate().await?;
    let catalog = crate::catalog::Catalog::new(
        Arc::new(store.clone()),
        Arc::new(crate::core::Inventory::new()),
        Arc::new(crate::core::SystemClock),
    );
    for draft in &drafts {
        let event = catalog.create_event(draft).await?;
        println!("created event {} ({})", event.name, event.id);
    }
    store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_file_refuses_arrays_in_place_of_objects() {
        let file = br#"[{"name": "x", "starts_at": "2027-01-01T00:00:00Z",
            "ticket_types": [{"name": "a", "price": [100, "EUR"], "capacity": 1, "rule": {"kind": "any"}}]}]"#;
        let error = parse_import(file).unwrap_err();
        assert!(error.contains("ticket_types[0].price"), "{error}");
        assert!(parse_import(b"[[\"x\"]]").is_err());
        assert!(parse_import(b"\xff").unwrap_err().contains("UTF-8"));
        assert_eq!(parse_import(b"[]").unwrap().len(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes, and any cut of a valid file, are refused with a message or read as
        /// valid drafts; never a panic.
        #[test]
        fn an_import_file_of_any_bytes_is_answered(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), cut in 0usize..2_000) {
            let _ = parse_import(&bytes);
            let demo = include_bytes!("demo_events.json");
            if let Ok(drafts) = parse_import(&demo[..cut.min(demo.len())]) {
                for draft in drafts {
                    proptest::prop_assert!(draft.validate().is_ok());
                }
            }
        }
    }
}
