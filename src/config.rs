//! Configuration: one clap struct, every setting both a flag and an environment variable
//! (PROTOCOL §9). A bad setting stops the program at start with one line naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Realtime ticket-reservation server: JSON-RPC 2.0 over WebSocket, long-poll and HTTP.
#[derive(Debug, Parser)]
#[command(name = "ticket-api", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the server (the default when no sub-command is given).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage events.
    #[command(subcommand)]
    Events(EventsCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Add {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
        /// Give the user the admin role.
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Create the events of a JSON file holding an array of `admin.events.create` params.
    Import { file: PathBuf },
}

/// Every setting of the server. All are global, so they also apply to sub-commands.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address the HTTP listener binds.
    #[arg(
        long,
        env = "TICKET_API_LISTEN",
        default_value = "127.0.0.1:4000",
        global = true
    )]
    pub listen: SocketAddr,

    /// `postgres://…` for PostgreSQL or `sqlite:…` for a SQLite file; default: an embedded
    /// SQLite file in the data folder.
    #[arg(long, env = "DATABASE_URL", value_parser = DatabaseUrl::parse, global = true)]
    pub database_url: Option<DatabaseUrl>,

    /// `redis://…`: expiry through Redis key TTLs and keyspace notifications; default: in-process.
    #[arg(long, env = "REDIS_URL", value_parser = parse_redis_url, global = true)]
    pub redis_url: Option<String>,

    /// Secret signing the JWTs (HS256), at least 32 bytes; default: generated once and kept in
    /// the data folder.
    #[arg(long, env = "TICKET_API_JWT_SECRET", value_parser = parse_jwt_secret, hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,

    /// How long a pending reservation holds its tickets (`3s`, `90s`, `15m`).
    #[arg(long, env = "TICKET_API_RESERVATION_TTL", default_value = "15m", value_parser = parse_positive_duration, global = true)]
    pub reservation_ttl: Duration,

    /// Seed demo events into an empty database.
    #[arg(long, env = "TICKET_API_DEMO", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub demo: bool,

    /// Names this server in logs, metrics and `/health`; default: a random id at each start.
    #[arg(long, env = "TICKET_API_NODE_ID", value_parser = parse_node_id, global = true)]
    pub node_id: Option<String>,

    /// Several servers share one PostgreSQL database and one Redis (needs both).
    #[arg(long, env = "TICKET_API_CLUSTER", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub cluster: bool,

    /// Cluster mode: the base URL other servers reach this one at (`http://10.0.0.5:4000`);
    /// default: `http://` and the address the listener bound (which must then not be
    /// `0.0.0.0` or `[::]`).
    #[arg(long, env = "TICKET_API_ADVERTISE_URL", value_parser = parse_advertise_url, global = true)]
    pub advertise_url: Option<String>,

    /// Folder of the embedded database and the generated JWT secret.
    #[arg(
        long,
        env = "TICKET_API_DATA_DIR",
        default_value = "data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// How long an issued token stays valid.
    #[arg(long, env = "TICKET_API_TOKEN_TTL", default_value = "24h", value_parser = parse_positive_duration, global = true)]
    pub token_ttl: Duration,

    /// Log format.
    #[arg(long, env = "TICKET_API_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Most WebSocket connections open at once; an upgrade over it answers 503.
    #[arg(long, env = "TICKET_API_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_connections: u32,

    /// Calls per second allowed on one connection or session (each batch entry counts).
    #[arg(long, env = "TICKET_API_RATE_LIMIT", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub rate_limit: u32,

    /// Calls a connection may make in a burst above the steady rate.
    #[arg(long, env = "TICKET_API_RATE_BURST", default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub rate_burst: u32,

    /// `auth.register` and `auth.login` calls per second allowed from one client address.
    #[arg(long, env = "TICKET_API_AUTH_RATE_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub auth_rate_limit: u32,

    /// `auth.register` and `auth.login` calls one client address may make in a burst.
    #[arg(long, env = "TICKET_API_AUTH_RATE_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub auth_rate_burst: u32,

    /// Origins (`https://shop.example`) besides the server's own host allowed to use `/ws`
    /// and `/lp`, comma-separated; `*` allows any. A request without `Origin` is allowed.
    #[arg(long, env = "TICKET_API_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin, global = true)]
    pub allowed_origins: Vec<String>,

    /// An HTTP connection that has not sent a request's headers this long after it opened
    /// or after its last response is closed.
    #[arg(long, env = "TICKET_API_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, global = true)]
    pub header_timeout: Duration,

    /// Most connections open at once from one client address; more are answered 503.
    #[arg(long, env = "TICKET_API_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_connections_per_address: u32,

    /// Largest message accepted, in bytes (WebSocket close 1009, HTTP 413 above it).
    #[arg(long, env = "TICKET_API_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..), global = true)]
    pub max_message_bytes: u32,

    /// Most entries in one batch.
    #[arg(long, env = "TICKET_API_MAX_BATCH", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_batch: u32,

    /// Transactions the writer keeps in flight on PostgreSQL, each on its own connection
    /// (SQLite commits one at a time whatever this says).
    #[arg(long, env = "TICKET_API_WRITER_CONNECTIONS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16), global = true)]
    pub writer_connections: u32,

    /// A WebSocket whose writes stall this long (the client stopped reading) is sent close
    /// 1008; one that still does not read is dropped at most 10 s later.
    #[arg(long, env = "TICKET_API_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, global = true)]
    pub write_timeout: Duration,

    /// Long-poll: how long a GET waits for notifications.
    #[arg(long, env = "TICKET_API_POLL_TIMEOUT", default_value = "25s", value_parser = parse_positive_duration, global = true)]
    pub poll_timeout: Duration,

    /// Long-poll: a session expires this long after its last request.
    #[arg(long, env = "TICKET_API_SESSION_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration, global = true)]
    pub session_timeout: Duration,

    /// Prefix of every Redis key this server writes, so several servers can share one Redis.
    #[arg(
        long,
        env = "TICKET_API_REDIS_PREFIX",
        default_value = "ticket-api:",
        global = true
    )]
    pub redis_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(String),
    Sqlite(String),
}

impl DatabaseUrl {
    fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Self::Postgres(text.to_owned()))
        } else if text.starts_with("sqlite:") {
            Ok(Self::Sqlite(text.to_owned()))
        } else {
            Err("expected a postgres://… or sqlite:… URL".to_owned())
        }
    }

    /// The embedded default: a SQLite file in the data folder, created when missing.
    pub fn embedded(data_dir: &std::path::Path) -> Self {
        let path = data_dir.join("ticket-api.db");
        Self::Sqlite(format!("sqlite://{}?mode=rwc", path.display()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Postgres(url) | Self::Sqlite(url) => url,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// Never prints the URL itself: it may carry a password.
impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Postgres(_) => f.write_str("postgres://…"),
            Self::Sqlite(url) => write!(f, "{url}"),
        }
    }
}

fn parse_redis_url(text: &str) -> Result<String, String> {
    if !text.starts_with("redis://") {
        return Err("expected a redis://… URL".to_owned());
    }
    crate::expiry::redis::check_url(text)?;
    Ok(text.to_owned())
}

fn parse_jwt_secret(text: &str) -> Result<String, String> {
    if text.len() < 32 {
        return Err("must be at least 32 bytes".to_owned());
    }
    Ok(text.to_owned())
}

/// Logs are coloured only on a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (https://no-color.org).
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`, in any case (PROTOCOL §9).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected one of 1/0, true/false, yes/no, on/off".to_owned()),
    }
}

fn parse_advertise_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .ok_or("an http:// URL (servers talk plain HTTP to each other)")?;
    if rest.is_empty() || rest.contains('/') {
        return Err("http://host:port, without a path".to_owned());
    }
    Ok(url.to_owned())
}

fn parse_node_id(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(text.to_owned())
    } else {
        Err("1 to 64 characters: letters, digits, '-', '_' or '.'".to_owned())
    }
}

/// `*`, `null`, or `scheme://host[:port]`, kept in lower case without a trailing slash.
fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim().trim_end_matches('/').to_ascii_lowercase();
    let valid = origin == "*"
        || origin == "null"
        || origin.split_once("://").is_some_and(|(scheme, host)| {
            !scheme.is_empty() && !host.is_empty() && !host.contains('/')
        });
    if valid {
        Ok(origin)
    } else {
        Err(format!(
            "{text:?} is not an origin such as https://shop.example"
        ))
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 3s, 90s, 15m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

impl Settings {
    /// The database to use: the configured one, or the embedded SQLite file.
    pub fn database(&self) -> DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::embedded(&self.data_dir))
    }

    /// This server's name: the configured one, or a random one at each start.
    pub fn resolve_node_id(&mut self) -> &str {
        self.node_id
            .get_or_insert_with(|| hex::encode(rand::random::<[u8; 6]>()))
    }

    /// Settings for tests and embedders: every default, no database or Redis chosen.
    pub fn defaults() -> Self {
        Cli::parse_from(["ticket-api"]).settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ticket-api").chain(args.iter().copied()))
    }

    #[test]
    fn database_url_must_be_postgres_or_sqlite() {
        let err = parse(&["--database-url", "mysql://x"]).unwrap_err();
        assert!(err.to_string().contains("--database-url"), "{err}");
        assert!(parse(&["--database-url", "sqlite::memory:"]).is_ok());
        assert!(parse(&["--database-url", "postgres://postgres@127.0.0.1/test"]).is_ok());
    }

    #[test]
    fn reservation_ttl_accepts_human_durations() {
        let cli = parse(&["--reservation-ttl", "90s"]).unwrap();
        assert_eq!(cli.settings.reservation_ttl, Duration::from_secs(90));
        assert!(parse(&["--reservation-ttl", "soon"]).is_err());
        assert!(parse(&["--reservation-ttl", "0s"]).is_err());
    }

    #[test]
    fn booleans_accept_the_usual_spellings_in_any_case() {
        for (text, value) in [
            ("1", true),
            ("0", false),
            ("TRUE", true),
            ("false", false),
            ("Yes", true),
            ("no", false),
            ("ON", true),
            ("off", false),
        ] {
            assert_eq!(parse_bool(text), Ok(value), "{text}");
            let flag = format!("--demo={text}");
            assert_eq!(parse(&[&flag]).unwrap().settings.demo, value, "{flag}");
            let flag = format!("--cluster={text}");
            assert_eq!(parse(&[&flag]).unwrap().settings.cluster, value, "{flag}");
        }
        assert!(parse(&["--demo"]).unwrap().settings.demo);
        assert!(!parse(&[]).unwrap().settings.demo);
        assert!(parse(&["--demo=maybe"]).is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
    }

    #[test]
    fn origins_are_kept_in_lower_case() {
        let cli = parse(&["--allowed-origins", "https://Shop.Example/,http://a:8080"]).unwrap();
        assert_eq!(
            cli.settings.allowed_origins,
            ["https://shop.example", "http://a:8080"]
        );
        assert!(parse(&["--allowed-origins", "shop.example"]).is_err());
    }

    #[test]
    fn settings_apply_to_sub_commands_too() {
        let cli = parse(&["migrate", "--database-url", "sqlite::memory:"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Migrate)));
        assert_eq!(cli.settings.database().as_str(), "sqlite::memory:");
    }
}
