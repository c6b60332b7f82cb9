//! `loadgen reserve`: the end-to-end reservation benchmark.
//!
//! Setup over `POST /rpc`: log in as admin, create one event with one hot ticket type,
//! register one customer per connection. Load over WebSocket: every connection sends
//! `tickets.reserve` in a closed loop (the next call after the previous answer) until the
//! duration passes, the total request bound is reached, or every connection has been told
//! `INSUFFICIENT_TICKETS`. Then `events.get` checks the server's count against the
//! acknowledged reservations.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::time::timeout;

use crate::client::{CallError, HttpRpc, Target, WsRpc};
use crate::metrics::WriterBatches;
use crate::report::{new_histogram, Consistency, Latency, ReserveReport};

/// Flags of `loadgen reserve`.
#[derive(Debug, Clone, Args)]
pub struct ReserveArgs {
    /// Server base URL; must be a loopback address (127.0.0.0/8, localhost, [::1]).
    #[arg(long, default_value = "http://127.0.0.1:4000", value_parser = Target::parse)]
    pub url: Target,

    /// WebSocket connections, each with its own customer account.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// How long the load runs (`10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Total bound on `tickets.reserve` calls over all connections.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: u64,

    /// Capacity of the hot ticket type.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub capacity: u64,

    /// Tickets per reservation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64))]
    pub quantity: u64,

    /// Email of an existing admin account (`ticket-api user add --admin`).
    #[arg(long)]
    pub admin_email: String,

    /// Password of that admin account.
    #[arg(long)]
    pub admin_password: String,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,

    /// Bound on one call (setup or load); an unanswered call counts as a transport failure.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// Registrations in flight at once (password hashing is deliberately slow).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub register_concurrency: u32,
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 10s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

/// A failure before or after the load that makes the run meaningless.
pub type SetupError = String;

/// What the benchmark exercises.
struct Fixture {
    event_id: String,
    ticket_type_id: String,
    tokens: Vec<String>,
}

/// Runs the benchmark; `Ok(report)` also when the consistency check fails (the caller
/// decides the exit code).
pub async fn run(args: &ReserveArgs) -> Result<ReserveReport, SetupError> {
    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
    let fixture = setup(args, &http).await?;

    eprintln!("connecting {} WebSockets…", args.connections);
    let connections = connect_all(args, &fixture.tokens).await?;

    eprintln!(
        "running: up to {:?} or {} requests…",
        args.duration, args.max_requests
    );
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        exhausted: AtomicUsize::new(0),
        transport_failed: AtomicBool::new(false),
    });
    let batches_before = writer_batches(&http).await;
    let params =
        json!({"items": [{"ticket_type_id": fixture.ticket_type_id, "quantity": args.quantity}]});
    let started = Instant::now();
    let deadline = started + args.duration;
    let workers: Vec<_> = connections
        .into_iter()
        .zip(fixture.tokens.iter().cloned())
        .map(|(ws, token)| {
            let worker = Worker {
                url: args.url.ws(Some(&token)),
                params: params.clone(),
                quantity: args.quantity,
                max_requests: args.max_requests,
                call_timeout: args.call_timeout,
                deadline,
                shared: Arc::clone(&shared),
            };
            tokio::spawn(worker.run(ws))
        })
        .collect();
    let mut total = Tally::new();
    for worker in workers {
        match worker.await {
            Ok(tally) => total.merge(tally),
            Err(e) => return Err(format!("a load task failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let writer_batches = match (batches_before, writer_batches(&http).await) {
        // Counters going down mean the server restarted meanwhile: no usable figure.
        (Some(before), Some(after)) if after.batches >= before.batches => Some(after.since(before)),
        _ => None,
    };

    let connections = args.connections as usize;
    let stopped_by = if shared.exhausted.load(Ordering::SeqCst) == connections {
        "pool exhausted"
    } else if shared.issued.load(Ordering::SeqCst) >= args.max_requests {
        "max-requests"
    } else {
        "duration"
    };

    let consistency = match available(&http, &fixture).await {
        Ok(available) => Some(Consistency {
            capacity: args.capacity,
            expected_available: args.capacity.saturating_sub(total.tickets),
            available,
            unknown_tickets: total.transport_failures * args.quantity,
        }),
        Err(e) => {
            eprintln!("events.get after the run failed: {e}");
            None
        }
    };

    Ok(ReserveReport {
        url: args.url.to_string(),
        connections,
        quantity: args.quantity,
        capacity: args.capacity,
        duration_s: args.duration.as_secs_f64(),
        max_requests: args.max_requests,
        requests: total.requests,
        ok: total.ok,
        tickets: total.tickets,
        errors: total.errors,
        transport_failures: total.transport_failures,
        reconnects: total.reconnects,
        elapsed_s: elapsed.as_secs_f64(),
        stopped_by: stopped_by.to_owned(),
        latency: Latency::from_histogram(&total.latency),
        latency_ok: Latency::from_histogram(&total.latency_ok),
        writer_batches,
        consistency,
    })
}

/// The writer's batch counters, when `/metrics` has them.
async fn writer_batches(http: &HttpRpc) -> Option<WriterBatches> {
    match http.get_text("/metrics").await {
        Ok(text) => WriterBatches::parse(&text),
        Err(e) => {
            eprintln!("metrics: {e}");
            None
        }
    }
}

/// A short id that makes this run's emails unique.
pub(crate) fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:x}", nanos & 0xffff_ffff_ffff, std::process::id())
}

pub(crate) fn string_at<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, SetupError> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no {pointer} in {value}"))
}

/// Logs in as the admin and creates one event with one `any` ticket type of `capacity`;
/// returns the event id and the ticket type id.
pub(crate) async fn create_hot_event(
    http: &HttpRpc,
    admin_email: &str,
    admin_password: &str,
    name: &str,
    capacity: u64,
) -> Result<(String, String), SetupError> {
    let login = http
        .call(
            "auth.login",
            json!({"email": admin_email, "password": admin_password}),
            None,
        )
        .await
        .map_err(|e| format!("admin login ({admin_email}): {e}"))?;
    let admin_token = string_at(&login, "/token")?.to_owned();
    let starts_at =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(30 * 24 * 3600))
            .to_string();
    let event = http
        .call(
            "admin.events.create",
            json!({
                "name": name,
                "starts_at": starts_at,
                "venue": "loopback",
                "ticket_types": [{
                    "name": "Hot",
                    "price": {"amount": 1000, "currency": "EUR"},
                    "capacity": capacity,
                    "rule": {"kind": "any"},
                }],
            }),
            Some(&admin_token),
        )
        .await
        .map_err(|e| format!("admin.events.create: {e}"))?;
    Ok((
        string_at(&event, "/id")?.to_owned(),
        string_at(&event, "/ticket_types/0/id")?.to_owned(),
    ))
}

async fn setup(args: &ReserveArgs, http: &HttpRpc) -> Result<Fixture, SetupError> {
    let run = run_id();
    eprintln!("setup: run {run} against {}", args.url);

    let (event_id, ticket_type_id) = create_hot_event(
        http,
        &args.admin_email,
        &args.admin_password,
        &format!("loadgen {run}"),
        args.capacity,
    )
    .await?;
    eprintln!("setup: event {event_id}, ticket type {ticket_type_id}");

    eprintln!(
        "setup: registering {} customers, {} at a time…",
        args.connections, args.register_concurrency
    );
    let registered = Instant::now();
    let tokens: Vec<String> = stream::iter(0..args.connections)
        .map(|i| {
            let email = format!("loadgen-{run}-{i}@loadgen.invalid");
            async move {
                let result = http
                    .call(
                        "auth.register",
                        json!({"email": email, "password": "loadgen-password"}),
                        None,
                    )
                    .await
                    .map_err(|e| format!("auth.register {email}: {e}"))?;
                string_at(&result, "/token").map(str::to_owned)
            }
        })
        .buffered(args.register_concurrency as usize)
        .try_collect()
        .await?;
    eprintln!(
        "setup: {} customers in {:.1} s",
        tokens.len(),
        registered.elapsed().as_secs_f64()
    );
    Ok(Fixture {
        event_id,
        ticket_type_id,
        tokens,
    })
}

async fn connect_all(args: &ReserveArgs, tokens: &[String]) -> Result<Vec<WsRpc>, SetupError> {
    let call_timeout = args.call_timeout;
    stream::iter(tokens.iter().map(|token| args.url.ws(Some(token))))
        .map(|url| async move {
            match timeout(call_timeout, WsRpc::connect(&url)).await {
                Ok(result) => result,
                Err(_) => Err("WebSocket connect timed out".to_owned()),
            }
        })
        .buffered(64)
        .try_collect()
        .await
}

/// `available` of the hot ticket type as `events.get` reports it.
async fn available(http: &HttpRpc, fixture: &Fixture) -> Result<u64, String> {
    ticket_type_count(
        http,
        &fixture.event_id,
        &fixture.ticket_type_id,
        "available",
    )
    .await
}

/// A count (`available`, `version`) of one ticket type as `events.get` reports it.
pub(crate) async fn ticket_type_count(
    http: &HttpRpc,
    event_id: &str,
    ticket_type_id: &str,
    field: &str,
) -> Result<u64, String> {
    let event = http
        .call("events.get", json!({"event_id": event_id}), None)
        .await
        .map_err(|e| format!("events.get: {e}"))?;
    event
        .get("ticket_types")
        .and_then(Value::as_array)
        .and_then(|types| {
            types
                .iter()
                .find(|t| t.get("id").and_then(Value::as_str) == Some(ticket_type_id))
        })
        .and_then(|t| t.get(field))
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("events.get: no {field} for the ticket type in {event}"))
}

/// State all connections share.
struct Shared {
    /// Calls started, over all connections (the `--max-requests` bound).
    issued: AtomicU64,
    /// Connections that were told `INSUFFICIENT_TICKETS` and stopped.
    exhausted: AtomicUsize,
    /// Whether a transport failure was already printed.
    transport_failed: AtomicBool,
}

/// What one connection counted.
struct Tally {
    requests: u64,
    ok: u64,
    tickets: u64,
    errors: BTreeMap<String, u64>,
    transport_failures: u64,
    reconnects: u64,
    latency: Histogram<u64>,
    latency_ok: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            requests: 0,
            ok: 0,
            tickets: 0,
            errors: BTreeMap::new(),
            transport_failures: 0,
            reconnects: 0,
            latency: new_histogram(),
            latency_ok: new_histogram(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.tickets += other.tickets;
        for (reason, count) in other.errors {
            *self.errors.entry(reason).or_default() += count;
        }
        self.transport_failures += other.transport_failures;
        self.reconnects += other.reconnects;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.latency_ok.add(&other.latency_ok);
    }
}

/// One connection's closed loop.
struct Worker {
    url: reqwest::Url,
    params: Value,
    quantity: u64,
    max_requests: u64,
    call_timeout: Duration,
    deadline: Instant,
    shared: Arc<Shared>,
}

impl Worker {
    async fn run(self, ws: WsRpc) -> Tally {
        let mut tally = Tally::new();
        let mut conn = Some(ws);
        while Instant::now() < self.deadline {
            // After a transport failure: a new connection, within the deadline.
            let ws = match conn.as_mut() {
                Some(ws) => ws,
                None => {
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    match timeout(left.min(self.call_timeout), WsRpc::connect(&self.url)).await {
                        Ok(Ok(ws)) => {
                            tally.reconnects += 1;
                            conn.insert(ws)
                        }
                        _ => {
                            let left = self.deadline.saturating_duration_since(Instant::now());
                            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                            continue;
                        }
                    }
                }
            };
            if self.shared.issued.fetch_add(1, Ordering::SeqCst) >= self.max_requests {
                break;
            }
            tally.requests += 1;
            let sent = Instant::now();
            let outcome = timeout(self.call_timeout, ws.call("tickets.reserve", &self.params))
                .await
                .unwrap_or_else(|_| Err(CallError::Transport("timed out".to_owned())));
            let micros = (sent.elapsed().as_micros() as u64).max(1);
            match outcome {
                Ok(_) => {
                    tally.ok += 1;
                    tally.tickets += self.quantity;
                    tally.latency.saturating_record(micros);
                    tally.latency_ok.saturating_record(micros);
                }
                Err(CallError::Rpc(error)) => {
                    tally.latency.saturating_record(micros);
                    let reason = error.reason();
                    *tally.errors.entry(reason.clone()).or_default() += 1;
                    if reason == "INSUFFICIENT_TICKETS" {
                        // Nothing is released during a run: the pool stays too small.
                        self.shared.exhausted.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                Err(CallError::Transport(e)) => {
                    if !self.shared.transport_failed.swap(true, Ordering::SeqCst) {
                        eprintln!("transport failure (further ones only counted): {e}");
                    }
                    tally.transport_failures += 1;
                    conn = None;
                }
            }
        }
        if let Some(ws) = conn {
            ws.close().await;
        }
        tally
    }
}
