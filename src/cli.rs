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
pub async fn serve(settings: Settings) -> Result<(), CommandError> {
    let listener = crate::server::bind(settings.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let app = App::start(settings).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = ?app.settings.database(), "listening");
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

async fn import_events(settings: Settings, file: &std::path::Path) -> Result<(), CommandError> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let drafts: Vec<EventDraft> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    // Validate everything first, so a bad file creates nothing.
    for (i, draft) in drafts.iter().enumerate() {
        draft
            .validate()
            .map_err(|e| format!("{}: event [{i}]: {e}", file.display()))?;
    }
    let app = App::start(Settings {
        demo: false,
        ..settings
    })
    .await?;
    for draft in &drafts {
        let event = app.catalog.create_event(draft).await?;
        println!("created event {} ({})", event.name, event.id);
    }
    Ok(())
}
