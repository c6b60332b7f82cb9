//! `loadgen reserve`: the end-to-end reservation benchmark.
//!
//! Setup over `POST /rpc`: log in as admin, create the ticket types (one hot one, or
//! `--ticket-types N` spread over events of at most 50 types each), register one customer
//! per connection. Load over WebSocket: every connection sends `tickets.reserve` either in a
//! closed loop (the next call after the previous answer) or, with `--rate`, on the open-model
//! schedule of [`crate::schedule`] (latency from the intended send), until the duration
//! passes, the total request bound is reached, or every connection has been told
//! `INSUFFICIENT_TICKETS`. Then `events.get` checks every ticket type's count against the
//! acknowledged reservations.
//!
//! With `--event-id`/`--ticket-type-id` an existing ticket type is used instead (no admin
//! needed, nothing created): its `available` before the load is the baseline of the
//! check, read through `--check-url` (in cluster mode: the event's owner, whose count is
//! exact, where another server's mirror may lag). `--idempotency-keys` sends a fresh
//! `idempotency_key` with every call, to measure what keys cost.
//!
//! Around the load window it can also read `/proc`: the CPU time of named processes
//! (`--cpu`) and the server's resident memory (`--server-pid`), after the writer has
//! drained, so the figures belong to the load and not to the setup.

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
use crate::procfs::{self, CpuProbe, Rss};
use crate::report::{new_histogram, Consistency, ExistingEvent, Latency, ReserveReport, RssWindow};
use crate::schedule::{parse_rate, OpenSchedule};

/// Most ticket types the server accepts in one event.
const TYPES_PER_EVENT: usize = 50;

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
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_requests: u64,

    /// Capacity of each ticket type.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub capacity: u64,

    /// Ticket types the load is spread over (round robin); 1 is one hot ticket type.
    /// They are created in events of at most 50 types each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub ticket_types: u64,

    /// Use this existing event instead of creating one (with `--ticket-type-id`); no admin
    /// account is needed then.
    #[arg(long, requires = "ticket_type_id", conflicts_with_all = ["ticket_types", "capacity"])]
    pub event_id: Option<String>,

    /// The ticket type of `--event-id` to reserve.
    #[arg(long, requires = "event_id")]
    pub ticket_type_id: Option<String>,

    /// The server the consistency check (`events.get` before and after) and the writer's
    /// figures (`/metrics`) are read from; default `--url`. In cluster mode, the event's
    /// owner.
    #[arg(long, value_parser = Target::parse)]
    pub check_url: Option<Target>,

    /// Send a fresh `idempotency_key` with every `tickets.reserve`.
    #[arg(long)]
    pub idempotency_keys: bool,

    /// Tickets per reservation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64))]
    pub quantity: u64,

    /// Open model: this many calls per second over all connections (`2000/s`), each latency
    /// measured from its intended send. Without it, a closed loop.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Email of an existing admin account (`ticket-api user add --admin`); not needed with
    /// `--event-id`.
    #[arg(long, required_unless_present = "event_id")]
    pub admin_email: Option<String>,

    /// Password of that admin account.
    #[arg(long, required_unless_present = "event_id")]
    pub admin_password: Option<String>,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,

    /// A label for this run in the JSON line (e.g. `a-hot-64`).
    #[arg(long, default_value = "reserve")]
    pub phase: String,

    /// CPU time to report over the load window, as µs per reservation: `NAME=PID` (one
    /// process), `NAME=tree:PID` (a process and its descendants, e.g. the postmaster) or
    /// `NAME=self` (this load generator). Repeatable.
    #[arg(long, value_parser = CpuProbe::parse)]
    pub cpu: Vec<CpuProbe>,

    /// The server's process id: its RSS is read before the load and after it, once the
    /// writer has drained (for memory per pending reservation).
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Bound on one call (setup or load); an unanswered call counts as a transport failure.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// Registrations in flight at once (password hashing is deliberately slow).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub register_concurrency: u32,
}

/// What the benchmark exercises.
struct Fixture {
    /// `(event id, ticket type id)` of every ticket type, in creation order.
    ticket_types: Vec<(String, String)>,
    /// Each ticket type's `available` before the load: the capacity of a created one.
    baseline: Vec<u64>,
    /// An existing ticket type's capacity and `available` before the load.
    existing: Option<(u64, u64)>,
    tokens: Vec<String>,
    /// Makes this run's idempotency keys unique.
    run: String,
}

/// Runs the benchmark; `Ok(report)` also when the consistency check fails (the caller
/// decides the exit code).
pub async fn run(args: &ReserveArgs) -> Result<ReserveReport, SetupError> {
    crate::limits::ensure_fds_for(u64::from(args.connections), "connections")?;
    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
    let check = HttpRpc::new(
        args.check_url.clone().unwrap_or_else(|| args.url.clone()),
        args.call_timeout,
    );
    let fixture = setup(args, &http, &check).await?;

    eprintln!("connecting {} WebSockets…", args.connections);
    let urls: Vec<reqwest::Url> = fixture
        .tokens
        .iter()
        .map(|t| args.url.ws(Some(t)))
        .collect();
    let connections = connect_all(&urls, args.call_timeout).await?;

    let batches_before = writer_batches(&check).await;
    let rss_before = args.server_pid.and_then(Rss::read);
    let params = fixture
        .ticket_types
        .iter()
        .map(|(_, id)| json!({"items": [{"ticket_type_id": id, "quantity": args.quantity}]}))
        .collect();
    let outcome = drive(Load {
        connections,
        urls,
        params: Arc::new(params),
        call: CallKind::Reserve,
        quantity: args.quantity,
        max_requests: args.max_requests,
        call_timeout: args.call_timeout,
        duration: args.duration,
        rate: args.rate,
        cpu: args.cpu.clone(),
        idempotency_keys: args
            .idempotency_keys
            .then(|| Arc::from(format!("loadgen-{}", fixture.run))),
    })
    .await?;
    let total = &outcome.tally;

    let rss = match (args.server_pid, rss_before) {
        (Some(pid), Some(before)) => {
            wait_for_writer(&check, Duration::from_secs(30)).await;
            Rss::read(pid).map(|after| RssWindow {
                before_kib: before.current_kib,
                after_kib: after.current_kib,
                peak_kib: after.peak_kib,
            })
        }
        _ => None,
    };
    let writer_batches = match (batches_before, writer_batches(&check).await) {
        // Counters going down mean the server restarted meanwhile: no usable figure.
        (Some(before), Some(after)) if after.batches >= before.batches => Some(after.since(before)),
        _ => None,
    };

    let consistency = match check_counts(&check, &fixture, total).await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("events.get after the run failed: {e}");
            None
        }
    };

    Ok(ReserveReport {
        tool: "loadgen reserve".to_owned(),
        phase: args.phase.clone(),
        url: args.url.to_string(),
        connections: args.connections as usize,
        quantity: args.quantity,
        capacity: fixture
            .existing
            .map_or(args.capacity, |(capacity, _)| capacity),
        ticket_types: fixture.ticket_types.len(),
        existing_event: fixture.existing.map(|(_, before)| ExistingEvent {
            event_id: fixture.ticket_types[0].0.clone(),
            available_before: before,
            check_url: check.target().to_string(),
        }),
        idempotency_keys: args.idempotency_keys,
        offered_rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        max_requests: args.max_requests,
        requests: total.requests,
        ok: total.ok,
        tickets: total.tickets,
        errors: total.errors.clone(),
        transport_failures: total.transport_failures,
        reconnects: total.reconnects,
        late_sends: total.late_sends,
        elapsed_s: outcome.elapsed.as_secs_f64(),
        stopped_by: outcome.stopped_by.to_owned(),
        latency: Latency::from_histogram(&total.latency),
        latency_ok: Latency::from_histogram(&total.latency_ok),
        writer_batches,
        cpu_seconds: outcome.cpu_seconds,
        rss,
        consistency,
    })
}

/// What one call of the load does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `tickets.reserve`, answered by the server.
    Reserve,
    /// The same request frame, sent back unchanged by an echo server.
    Echo,
}

/// A load over open connections: the part `loadgen reserve` and `loadgen echo` share, so
/// both send the same frames in the same loop.
pub struct Load {
    pub connections: Vec<WsRpc>,
    /// Where each connection re-connects after a transport failure.
    pub urls: Vec<reqwest::Url>,
    /// The call's params, one per ticket type; connection `i`'s call `k` uses
    /// `params[(i + k·connections) mod len]`.
    pub params: Arc<Vec<Value>>,
    pub call: CallKind,
    pub quantity: u64,
    pub max_requests: u64,
    pub call_timeout: Duration,
    pub duration: Duration,
    pub rate: Option<f64>,
    pub cpu: Vec<CpuProbe>,
    /// When set, every call carries `idempotency_key` = this prefix, the connection's index
    /// and the call's number: unique over the run.
    pub idempotency_keys: Option<Arc<str>>,
}

/// What a load measured.
pub struct LoadOutcome {
    pub tally: Tally,
    pub elapsed: Duration,
    /// `duration`, `max-requests` or `pool exhausted`.
    pub stopped_by: &'static str,
    /// CPU seconds per `--cpu` probe over the load window.
    pub cpu_seconds: BTreeMap<String, f64>,
}

/// Runs `load` until its duration, its request bound, or an exhausted pool.
pub async fn drive(load: Load) -> Result<LoadOutcome, SetupError> {
    let connections = load.connections.len();
    match load.rate {
        Some(rate) => eprintln!(
            "running (open model, {rate:.0} calls/s): up to {:?} or {} requests…",
            load.duration, load.max_requests
        ),
        None => eprintln!(
            "running (closed loop): up to {:?} or {} requests…",
            load.duration, load.max_requests
        ),
    }
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        exhausted: AtomicUsize::new(0),
        transport_failed: AtomicBool::new(false),
    });
    let types = load.params.len().max(1);
    let cpu_before = procfs::sample(&load.cpu);
    let started = Instant::now();
    let deadline = started + load.duration;
    let workers: Vec<_> = load
        .connections
        .into_iter()
        .zip(load.urls)
        .enumerate()
        .map(|(index, (ws, url))| {
            let worker = Worker {
                url,
                params: Arc::clone(&load.params),
                first_type: index % types,
                stride: connections % types,
                call: load.call,
                quantity: load.quantity,
                max_requests: load.max_requests,
                call_timeout: load.call_timeout,
                started,
                deadline,
                schedule: load
                    .rate
                    .map(|r| OpenSchedule::for_connection(r, connections as u32, index as u32)),
                shared: Arc::clone(&shared),
                keys: load
                    .idempotency_keys
                    .as_ref()
                    .map(|prefix| format!("{prefix}-{index}")),
            };
            tokio::spawn(worker.run(ws))
        })
        .collect();
    let mut tally = Tally::new(types);
    for worker in workers {
        match worker.await {
            Ok(t) => tally.merge(t),
            Err(e) => return Err(format!("a load task failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let cpu_seconds = procfs::cpu_seconds(&cpu_before, &procfs::sample(&load.cpu));
    let stopped_by = if shared.exhausted.load(Ordering::SeqCst) == connections {
        "pool exhausted"
    } else if shared.issued.load(Ordering::SeqCst) >= load.max_requests {
        "max-requests"
    } else {
        "duration"
    };
    Ok(LoadOutcome {
        tally,
        elapsed,
        stopped_by,
        cpu_seconds,
    })
}

/// Waits (bounded) until the writer's committed-change counter stops moving, so memory
/// read afterwards holds no queued writes.
async fn wait_for_writer(http: &HttpRpc, bound: Duration) {
    let until = Instant::now() + bound;
    let mut last = None;
    while Instant::now() < until {
        let now = writer_batches(http).await.map(|w| w.changes);
        if now.is_some() && now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("the writer was still committing after {bound:?}");
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

/// Logs in as the admin; returns the token.
async fn admin_token(
    http: &HttpRpc,
    admin_email: &str,
    admin_password: &str,
) -> Result<String, SetupError> {
    let login = http
        .call(
            "auth.login",
            json!({"email": admin_email, "password": admin_password}),
            None,
        )
        .await
        .map_err(|e| format!("admin login ({admin_email}): {e}"))?;
    Ok(string_at(&login, "/token")?.to_owned())
}

/// Creates one event with `types` `any` ticket types of `capacity` each; returns the event
/// id and the ticket type ids.
async fn create_event(
    http: &HttpRpc,
    admin_token: &str,
    name: &str,
    capacity: u64,
    types: usize,
) -> Result<(String, Vec<String>), SetupError> {
    let starts_at =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(30 * 24 * 3600))
            .to_string();
    let ticket_types: Vec<Value> = (0..types)
        .map(|i| {
            json!({
                "name": if types == 1 { "Hot".to_owned() } else { format!("Type {i}") },
                "price": {"amount": 1000, "currency": "EUR"},
                "capacity": capacity,
                "rule": {"kind": "any"},
            })
        })
        .collect();
    let event = http
        .call(
            "admin.events.create",
            json!({
                "name": name,
                "starts_at": starts_at,
                "venue": "loopback",
                "ticket_types": ticket_types,
            }),
            Some(admin_token),
        )
        .await
        .map_err(|e| format!("admin.events.create: {e}"))?;
    let ids = (0..types)
        .map(|i| string_at(&event, &format!("/ticket_types/{i}/id")).map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((string_at(&event, "/id")?.to_owned(), ids))
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
    let token = admin_token(http, admin_email, admin_password).await?;
    let (event_id, mut ids) = create_event(http, &token, name, capacity, 1).await?;
    Ok((event_id, ids.remove(0)))
}

async fn setup(args: &ReserveArgs, http: &HttpRpc, check: &HttpRpc) -> Result<Fixture, SetupError> {
    let run = run_id();
    eprintln!("setup: run {run} against {}", args.url);

    let (ticket_types, baseline, existing) = match (&args.event_id, &args.ticket_type_id) {
        (Some(event_id), Some(ticket_type_id)) => {
            let capacity = ticket_type_count(check, event_id, ticket_type_id, "capacity").await?;
            let before = ticket_type_count(check, event_id, ticket_type_id, "available").await?;
            eprintln!(
                "setup: existing event {event_id}, ticket type {ticket_type_id}: {before} of {capacity} available (through {})",
                check.target()
            );
            (
                vec![(event_id.clone(), ticket_type_id.clone())],
                vec![before],
                Some((capacity, before)),
            )
        }
        _ => {
            let (email, password) = match (&args.admin_email, &args.admin_password) {
                (Some(email), Some(password)) => (email, password),
                _ => {
                    return Err(
                        "--admin-email and --admin-password are needed to create the event"
                            .to_owned(),
                    )
                }
            };
            let token = admin_token(http, email, password).await?;
            let wanted = args.ticket_types as usize;
            let mut ticket_types = Vec::with_capacity(wanted);
            while ticket_types.len() < wanted {
                let types = (wanted - ticket_types.len()).min(TYPES_PER_EVENT);
                let name = format!("loadgen {run} #{}", ticket_types.len() / TYPES_PER_EVENT);
                let (event_id, ids) =
                    create_event(http, &token, &name, args.capacity, types).await?;
                ticket_types.extend(ids.into_iter().map(|id| (event_id.clone(), id)));
            }
            match ticket_types.as_slice() {
                [(event, id)] => eprintln!("setup: event {event}, ticket type {id}"),
                many => eprintln!("setup: {} ticket types", many.len()),
            }
            let baseline = vec![args.capacity; ticket_types.len()];
            (ticket_types, baseline, None)
        }
    };

    eprintln!(
        "setup: registering {} customers, {} at a time…",
        args.connections, args.register_concurrency
    );
    let registered = Instant::now();
    let tokens =
        register_customers(http, &run, args.connections, args.register_concurrency).await?;
    eprintln!(
        "setup: {} customers in {:.1} s",
        tokens.len(),
        registered.elapsed().as_secs_f64()
    );
    Ok(Fixture {
        ticket_types,
        baseline,
        existing,
        tokens,
        run,
    })
}

/// Registers `count` customers (`loadgen-<run>-<i>@loadgen.invalid`), `concurrency` at a
/// time; returns their tokens.
pub(crate) async fn register_customers(
    http: &HttpRpc,
    run: &str,
    count: u32,
    concurrency: u32,
) -> Result<Vec<String>, SetupError> {
    stream::iter(0..count)
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
        .buffered(concurrency as usize)
        .try_collect()
        .await
}

/// Opens one WebSocket per URL, 64 at a time, each attempt bounded by `call_timeout`.
pub(crate) async fn connect_all(
    urls: &[reqwest::Url],
    call_timeout: Duration,
) -> Result<Vec<WsRpc>, SetupError> {
    stream::iter(urls)
        .map(|url| async move {
            match timeout(call_timeout, WsRpc::connect(url)).await {
                Ok(result) => result,
                Err(_) => Err("WebSocket connect timed out".to_owned()),
            }
        })
        .buffered(64)
        .try_collect()
        .await
}

/// Every ticket type's `available` (one `events.get` per event) against its baseline and
/// what was acknowledged for it.
async fn check_counts(
    http: &HttpRpc,
    fixture: &Fixture,
    tally: &Tally,
) -> Result<Consistency, String> {
    let mut available: BTreeMap<&str, u64> = BTreeMap::new();
    let mut events: Vec<&str> = fixture
        .ticket_types
        .iter()
        .map(|(e, _)| e.as_str())
        .collect();
    events.dedup();
    for event_id in events {
        let event = http
            .call("events.get", json!({"event_id": event_id}), None)
            .await
            .map_err(|e| format!("events.get: {e}"))?;
        for t in event
            .get("ticket_types")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(id), Some(a)) = (
                t.get("id").and_then(Value::as_str),
                t.get("available").and_then(Value::as_u64),
            ) {
                if let Some((_, known)) = fixture.ticket_types.iter().find(|(_, k)| k == id) {
                    available.insert(known.as_str(), a);
                }
            }
        }
    }
    let per_type = fixture
        .ticket_types
        .iter()
        .enumerate()
        .map(|(i, (_, id))| {
            let a = available
                .get(id.as_str())
                .copied()
                .ok_or_else(|| format!("events.get: no available for ticket type {id}"))?;
            let c = Consistency::one(
                fixture.baseline[i],
                tally.tickets_by_type[i],
                a,
                tally.unknown_by_type[i],
            );
            Ok(if fixture.existing.is_some() {
                c.against_available_before()
            } else {
                c
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Consistency::combine(&per_type))
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

/// What one connection (or, merged, the whole load) counted.
pub struct Tally {
    pub requests: u64,
    pub ok: u64,
    pub tickets: u64,
    /// Acknowledged tickets per ticket type (index into the load's params).
    pub tickets_by_type: Vec<u64>,
    /// Tickets of unanswered calls per ticket type: they may or may not have been taken.
    pub unknown_by_type: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub transport_failures: u64,
    pub reconnects: u64,
    /// Open model: calls sent more than 1 ms after their intended instant.
    pub late_sends: u64,
    pub latency: Histogram<u64>,
    pub latency_ok: Histogram<u64>,
}

impl Tally {
    fn new(types: usize) -> Self {
        Self {
            requests: 0,
            ok: 0,
            tickets: 0,
            tickets_by_type: vec![0; types],
            unknown_by_type: vec![0; types],
            errors: BTreeMap::new(),
            transport_failures: 0,
            reconnects: 0,
            late_sends: 0,
            latency: new_histogram(),
            latency_ok: new_histogram(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.tickets += other.tickets;
        for (mine, theirs) in self.tickets_by_type.iter_mut().zip(other.tickets_by_type) {
            *mine += theirs;
        }
        for (mine, theirs) in self.unknown_by_type.iter_mut().zip(other.unknown_by_type) {
            *mine += theirs;
        }
        for (reason, count) in other.errors {
            *self.errors.entry(reason).or_default() += count;
        }
        self.transport_failures += other.transport_failures;
        self.reconnects += other.reconnects;
        self.late_sends += other.late_sends;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.latency_ok.add(&other.latency_ok);
    }
}

/// The ticket type (index into the params) of a connection's call number `k`: connection
/// `i` starts at `i mod n` and steps by `connections mod n`, so at any moment the
/// connections hit different ticket types, and over time each connection hits all of them
/// when `connections` and `n` are coprime (else a fixed subset, still spread evenly).
fn type_of_call(first: usize, stride: usize, k: u64, types: usize) -> usize {
    let stride = if stride == 0 { 1 } else { stride };
    ((first as u64 + k.wrapping_mul(stride as u64)) % types as u64) as usize
}

/// The params with `idempotency_key` = `<prefix>-<k>`.
fn with_idempotency_key(params: &Value, prefix: &str, k: u64) -> Value {
    let mut keyed = params.clone();
    if let Some(object) = keyed.as_object_mut() {
        object.insert("idempotency_key".to_owned(), json!(format!("{prefix}-{k}")));
    }
    keyed
}

/// One connection's loop, closed or on an open-model schedule.
struct Worker {
    url: reqwest::Url,
    params: Arc<Vec<Value>>,
    first_type: usize,
    stride: usize,
    call: CallKind,
    quantity: u64,
    max_requests: u64,
    call_timeout: Duration,
    started: Instant,
    deadline: Instant,
    schedule: Option<OpenSchedule>,
    shared: Arc<Shared>,
    /// The prefix of this connection's idempotency keys, when calls carry them.
    keys: Option<String>,
}

impl Worker {
    async fn run(self, ws: WsRpc) -> Tally {
        let types = self.params.len().max(1);
        let mut tally = Tally::new(types);
        let mut conn = Some(ws);
        let mut k: u64 = 0;
        while Instant::now() < self.deadline {
            // Open model: wait for the intended instant; a late call is sent at once.
            let intended = match self.schedule {
                Some(schedule) => {
                    let at = self.started + schedule.intended(k);
                    if at >= self.deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    at
                }
                None => Instant::now(),
            };
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
            let type_index = type_of_call(self.first_type, self.stride, k, types);
            k += 1;
            tally.requests += 1;
            let sent = Instant::now();
            if sent.duration_since(intended) > Duration::from_millis(1) {
                tally.late_sends += 1;
            }
            let keyed;
            let params = match &self.keys {
                Some(prefix) => {
                    keyed = with_idempotency_key(&self.params[type_index], prefix, k);
                    &keyed
                }
                None => &self.params[type_index],
            };
            let call = async {
                match self.call {
                    CallKind::Reserve => ws.call("tickets.reserve", params).await.map(drop),
                    CallKind::Echo => ws.echo("tickets.reserve", params).await,
                }
            };
            let outcome = timeout(self.call_timeout, call)
                .await
                .unwrap_or_else(|_| Err(CallError::Transport("timed out".to_owned())));
            // From the intended send: equal to the actual send in a closed loop.
            let micros = (intended.elapsed().as_micros() as u64).max(1);
            match outcome {
                Ok(()) => {
                    tally.ok += 1;
                    tally.tickets += self.quantity;
                    tally.tickets_by_type[type_index] += self.quantity;
                    tally.latency.saturating_record(micros);
                    tally.latency_ok.saturating_record(micros);
                }
                Err(CallError::Rpc(error)) => {
                    tally.latency.saturating_record(micros);
                    let reason = error.reason();
                    *tally.errors.entry(reason.clone()).or_default() += 1;
                    if reason == "INSUFFICIENT_TICKETS" && types == 1 {
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
                    tally.unknown_by_type[type_index] += self.quantity;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReserveArgs,
    }

    fn parse(args: &[&str]) -> Result<ReserveArgs, String> {
        Cli::try_parse_from(std::iter::once("reserve").chain(args.iter().copied()))
            .map(|cli| cli.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_existing_event_needs_no_admin_but_both_of_its_ids() {
        let args = parse(&["--event-id", "e", "--ticket-type-id", "t"]).unwrap();
        assert_eq!(args.event_id.as_deref(), Some("e"));
        assert!(args.admin_email.is_none());
        assert!(parse(&["--event-id", "e"]).is_err());
        assert!(parse(&["--ticket-type-id", "t"]).is_err());
        assert!(
            parse(&[]).is_err(),
            "without an event, the admin is required"
        );
        assert!(parse(&["--admin-email", "a", "--admin-password", "p"]).is_ok());
    }

    #[test]
    fn an_existing_event_refuses_flags_that_shape_a_created_one() {
        let base = ["--event-id", "e", "--ticket-type-id", "t"];
        for extra in [["--ticket-types", "10"], ["--capacity", "5"]] {
            let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
            assert!(parse(&args).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn check_url_must_be_loopback_too() {
        let admin = ["--admin-email", "a", "--admin-password", "p"];
        let with = |url: &'static str| {
            let mut args = admin.to_vec();
            args.extend(["--check-url", url]);
            parse(&args)
        };
        assert!(with("http://127.0.0.1:4001").is_ok());
        assert!(with("http://10.1.2.3:4001").is_err());
    }

    #[test]
    fn idempotency_keys_are_unique_per_connection_and_call() {
        let params = json!({"items": [{"ticket_type_id": "t", "quantity": 1}]});
        let a = with_idempotency_key(&params, "loadgen-run-3", 7);
        assert_eq!(a["idempotency_key"], "loadgen-run-3-7");
        assert_eq!(a["items"], params["items"]);
        let b = with_idempotency_key(&params, "loadgen-run-31", 7);
        assert_ne!(a["idempotency_key"], b["idempotency_key"]);
        assert!(
            params.get("idempotency_key").is_none(),
            "the shared params stay as they were"
        );
    }

    #[test]
    fn one_ticket_type_is_always_the_hot_one() {
        for k in 0..10 {
            assert_eq!(type_of_call(0, 0, k, 1), 0);
        }
    }

    #[test]
    fn connections_spread_over_all_ticket_types() {
        // 64 connections over 1,000 types: stride 64; gcd(64, 1000) = 8, so each connection
        // visits 125 types and the 64 connections together all 1,000.
        let mut hits = vec![0u32; 1000];
        for conn in 0..64 {
            for k in 0..125 {
                hits[type_of_call(conn, 64, k, 1000)] += 1;
            }
        }
        assert!(hits.iter().all(|&h| h > 0), "every type is used");
        // At one moment (the same k), the connections hit 64 different types.
        let mut now: Vec<usize> = (0..64).map(|c| type_of_call(c, 64, 7, 1000)).collect();
        now.sort();
        now.dedup();
        assert_eq!(now.len(), 64);
    }
}
