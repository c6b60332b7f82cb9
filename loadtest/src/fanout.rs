//! `loadgen fanout`: how long a committed change takes to reach N subscribers.
//!
//! Setup over `POST /rpc`: log in as admin, create one event with one ticket type (large
//! capacity, `{"kind":"any"}`), register one customer (the reserver). Then N WebSocket
//! connections (no login) each `pool.subscribe` to the event, opened a bounded number at a
//! time, and each starts reading its notifications. The reserver then makes M reservations
//! of one ticket, paced at R per second (one call at a time), over its own WebSocket.
//!
//! Versions: only the reserver changes the pool, so its k-th successful reservation
//! produces version `base + k`, where `base` is the version `events.get` reports before
//! the first one (after an error the base is read again). The instant its answer arrived
//! (the change is durable then) is recorded per version. Each subscriber records, for
//! every `pool.update`, the instant it arrived and the version it carries; an update that
//! jumps over versions (coalesced by the server) is attributed to the version it carries
//! and the versions jumped over are counted as coalesced. The latency of a (subscriber,
//! received version) pair is receipt − commit answer; an update that arrived before the
//! reserver's answer counts as 0 and is counted as "before the answer".
//!
//! Bounded: at most M reservations and at most `--max-duration` for them, then at most
//! `--settle` for the last updates to arrive; then every connection is closed.
//!
//! Several servers (cluster mode): the subscribers spread over the `--subscriber-url`s,
//! round robin, while the event is created and reserved through `--url`. Many subscribers:
//! `--source-addresses N` binds them to 127.0.0.1 … 127.0.0.N (each address has its own
//! ephemeral ports), and `--subscribers-per-process` hands them to helper processes
//! ([`crate::fanout_processes`]) when one process may not open that many files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    check_source_addresses, light_ws_config, source_address, CallError, HttpRpc, Target, WsRpc,
    WsStream, MAX_SOURCE_ADDRESSES,
};
use crate::fanout_processes;
use crate::limits;
use crate::report::{new_histogram, Latency};
use crate::reserve::{create_hot_event, parse_duration, run_id, string_at, ticket_type_count};
use crate::Failure;

/// Flags of `loadgen fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Server base URL; must be a loopback address (127.0.0.0/8, localhost, [::1]). The
    /// event is created, and the reservations made, through it.
    #[arg(long, default_value = "http://127.0.0.1:4000", value_parser = Target::parse)]
    pub url: Target,

    /// A server the subscribers connect to (repeatable: they spread over all of them,
    /// round robin); default `--url`.
    #[arg(long = "subscriber-url", value_parser = Target::parse)]
    pub subscriber_urls: Vec<Target>,

    /// Spread the subscribers over this many loopback source addresses, 127.0.0.1 …
    /// 127.0.0.N, round robin, each connection bound before it connects (each address has
    /// its own ~28,000 ephemeral ports). 1: no bind.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_SOURCE_ADDRESSES as i64))]
    pub source_addresses: u32,

    /// Most subscribers one process holds: above it, helper processes (this program,
    /// started by it) hold them and report what they received at the end. Each process
    /// needs an open file per subscriber.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub subscribers_per_process: Option<u32>,

    /// WebSocket connections subscribed to the event (no login). Run the server with
    /// `--max-connections` above this.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub subscribers: u32,

    /// Reservations of one ticket the reserver makes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub reservations: u32,

    /// Pace of the reservations: `20/s` (or a plain number per second), at most 10000/s.
    #[arg(long, default_value = "20/s", value_parser = parse_rate)]
    pub rate: f64,

    /// Email of an existing admin account (`ticket-api user add --admin`).
    #[arg(long)]
    pub admin_email: String,

    /// Password of that admin account.
    #[arg(long)]
    pub admin_password: String,

    /// Subscriber connections being opened at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connect_concurrency: u32,

    /// Capacity of the ticket type (at least `--reservations`).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub capacity: u64,

    /// Bound on the reservation phase.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_duration: Duration,

    /// After the last reservation, how long to wait for every subscriber to see its
    /// version.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Bound on one call, one connection attempt, and one subscription.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// `20/s`, `20/sec`, `20`: reservations per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text
        .trim()
        .trim_end_matches("/sec")
        .trim_end_matches("/s")
        .trim();
    let rate: f64 = number
        .parse()
        .map_err(|_| format!("not a rate: {text} (e.g. 20/s)"))?;
    if !(rate.is_finite() && rate > 0.0 && rate <= 10_000.0) {
        return Err(format!("{text}: must be above 0 and at most 10000/s"));
    }
    Ok(rate)
}

impl FanoutArgs {
    /// The servers the subscribers connect to.
    pub fn subscriber_urls(&self) -> Vec<Target> {
        if self.subscriber_urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.subscriber_urls.clone()
        }
    }
}

/// What one subscriber saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Receipts {
    /// The version `pool.subscribe` reported.
    pub initial: u64,
    /// Updates that carried a newer version: (version, arrival), in arrival order.
    pub received: Vec<(u64, Instant)>,
    /// Updates whose version was not newer than the one held (ignored, as a client does).
    pub stale: u64,
    /// Set when the connection ended before the run did (e.g. closed 1008 by the server).
    pub lost: Option<String>,
}

/// Everything `loadgen fanout` measured.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    pub url: String,
    pub subscriber_urls: Vec<String>,
    pub event_id: String,
    /// Processes holding the subscribers (1: this one).
    pub processes: usize,
    pub source_addresses: u32,
    pub subscribers: usize,
    pub rate: f64,
    pub connect_s: f64,
    /// Reservations attempted, acknowledged, refused (by reason), unanswered.
    pub reservations: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub transport_failures: u64,
    pub reserve_elapsed_s: f64,
    pub stopped_by: String,
    /// `tickets.reserve` round trips of the reserver.
    pub reserve_latency: Latency,
    /// Commit answer → `pool.update` arrival, over (subscriber, received version) pairs.
    pub latency: Latency,
    /// The same pairs from the moment the reservation was sent (includes the commit).
    pub latency_from_send: Latency,
    /// Per version: commit answer → the moment the last subscriber held it (or newer);
    /// only versions every subscriber got.
    pub latency_all: Latency,
    /// Updates with a newer version, over all subscribers.
    pub received: u64,
    /// Versions a subscriber never saw on their own because an update jumped over them.
    pub coalesced: u64,
    /// Versions a subscriber had not reached when the run ended.
    pub missing: u64,
    pub stale: u64,
    /// Received updates whose version no acknowledged reservation produced.
    pub unattributed: u64,
    /// Updates carrying a version not after the one before the first reservation: changes
    /// made before the run (a server taking the new event over, say), not counted above.
    pub early: u64,
    /// Received updates that arrived before the reserver's answer (counted as 0 ms).
    pub before_ack: u64,
    /// Subscribers whose connection ended early, and the first reason.
    pub lost_subscribers: u64,
    pub first_loss: Option<String>,
    /// Time from the last answer until every subscriber held the final version (None when
    /// some never did within `--settle`).
    pub settled_s: Option<f64>,
}

impl FanoutReport {
    /// Skipped versions over all versions a subscriber should have seen.
    pub fn coalesced_fraction(&self) -> f64 {
        let total = self.received + self.coalesced;
        if total == 0 {
            0.0
        } else {
            self.coalesced as f64 / total as f64
        }
    }

    /// Successful reservations per second over the reservation phase.
    pub fn achieved_rate(&self) -> f64 {
        if self.reserve_elapsed_s > 0.0 {
            self.ok as f64 / self.reserve_elapsed_s
        } else {
            0.0
        }
    }

    pub fn print_human(&self) {
        println!(
            "fanout: {} subscribers against {}, {} reservations at {}/s",
            self.subscribers, self.url, self.reservations, self.rate
        );
        if self.subscriber_urls.len() > 1 || self.processes > 1 || self.source_addresses > 1 {
            println!(
                "  subscribers spread over {} (round robin), held by {} process(es), from {} source address(es)",
                self.subscriber_urls.join(", "),
                self.processes,
                self.source_addresses
            );
        }
        println!(
            "  subscribers connected and subscribed in {:.2} s",
            self.connect_s
        );
        println!(
            "  reservations: {} ok ({:.1}/s achieved), {} errors, {} transport failures in {:.2} s (stopped by {})",
            self.ok,
            self.achieved_rate(),
            self.errors.values().sum::<u64>(),
            self.transport_failures,
            self.reserve_elapsed_s,
            self.stopped_by
        );
        for (reason, count) in &self.errors {
            println!("    {reason}: {count}");
        }
        let l = self.reserve_latency;
        println!(
            "  reserve round trip: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        let l = self.latency;
        println!(
            "  commit answer → pool.update ({} subscriber×version pairs): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        let l = self.latency_from_send;
        println!(
            "  reservation sent → pool.update (same pairs): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        let l = self.latency_all;
        println!(
            "  commit answer → every subscriber has it ({} versions): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        println!(
            "  updates: {} received, {} versions coalesced ({:.1} %), {} missing at the end, {} stale, {} unattributed, {} before the answer, {} from before the first reservation",
            self.received,
            self.coalesced,
            100.0 * self.coalesced_fraction(),
            self.missing,
            self.stale,
            self.unattributed,
            self.before_ack,
            self.early
        );
        match self.settled_s {
            Some(s) => println!(
                "  every subscriber held the final version {:.1} ms after the last answer",
                s * 1000.0
            ),
            None => println!("  NOT every subscriber held the final version by the end"),
        }
        if self.lost_subscribers > 0 {
            println!(
                "  {} subscriber connections ended early; first: {}",
                self.lost_subscribers,
                self.first_loss.as_deref().unwrap_or("?")
            );
        }
    }

    pub fn to_json(&self) -> Value {
        let lat = |l: Latency| json!({"count": l.count, "p50_ms": l.p50_ms, "p90_ms": l.p90_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms});
        json!({
            "tool": "loadgen fanout",
            "url": self.url,
            "subscriber_urls": self.subscriber_urls,
            "event_id": self.event_id,
            "processes": self.processes,
            "source_addresses": self.source_addresses,
            "subscribers": self.subscribers,
            "rate_per_s": self.rate,
            "connect_s": self.connect_s,
            "reservations": self.reservations,
            "ok": self.ok,
            "errors": self.errors,
            "transport_failures": self.transport_failures,
            "reserve_elapsed_s": self.reserve_elapsed_s,
            "achieved_rate_per_s": self.achieved_rate(),
            "stopped_by": self.stopped_by,
            "reserve_latency_ms": lat(self.reserve_latency),
            "latency_ms": lat(self.latency),
            "latency_from_send_ms": lat(self.latency_from_send),
            "latency_all_ms": lat(self.latency_all),
            "received": self.received,
            "coalesced": self.coalesced,
            "coalesced_fraction": self.coalesced_fraction(),
            "missing": self.missing,
            "stale": self.stale,
            "unattributed": self.unattributed,
            "early": self.early,
            "before_ack": self.before_ack,
            "lost_subscribers": self.lost_subscribers,
            "settled_s": self.settled_s,
        })
    }
}

/// The event under test.
#[derive(Clone)]
struct Fixture {
    event_id: String,
    ticket_type_id: String,
    reserver_token: String,
}

pub async fn run(args: &FanoutArgs) -> Result<FanoutReport, Failure> {
    let n = args.subscribers as usize;
    let processes = process_plan(args.subscribers, args.subscribers_per_process);
    let per_process = processes.iter().map(|r| r.len()).max().unwrap_or(0) as u64;
    let what = if processes.len() > 1 {
        "subscriber connections in one helper process (--subscribers-per-process)"
    } else {
        "subscriber connections"
    };
    limits::ensure_fds_for(per_process, what).map_err(Failure::Flags)?;
    if args.capacity < u64::from(args.reservations) {
        return Err(Failure::Flags(format!(
            "--capacity {} is below --reservations {}",
            args.capacity, args.reservations
        )));
    }
    let subscriber_urls = args.subscriber_urls();
    check_source_addresses(
        args.source_addresses,
        &subscriber_urls.iter().collect::<Vec<_>>(),
    )
    .map_err(Failure::Flags)?;
    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
    let fixture = setup(args, &http).await.map_err(Failure::Setup)?;
    let plan = Subscribe {
        urls: Arc::new(subscriber_urls.clone()),
        event_id: Arc::from(fixture.event_id.as_str()),
        ticket_type: Arc::from(fixture.ticket_type_id.as_str()),
        source_addresses: args.source_addresses,
        connect_concurrency: args.connect_concurrency as usize,
        call_timeout: args.call_timeout,
    };

    let connect_started = Instant::now();
    let (outcome, receipts) = if processes.len() > 1 {
        eprintln!(
            "connecting {n} subscribers in {} helper processes over {} server(s) from {} source address(es)…",
            processes.len(),
            subscriber_urls.len(),
            args.source_addresses
        );
        let mut helpers = fanout_processes::spawn(args, &plan, &processes)
            .await
            .map_err(Failure::Setup)?;
        let connect_s = connect_started.elapsed().as_secs_f64();
        eprintln!("{n} subscribers ready in {connect_s:.2} s");
        let outcome = reserve_on_own_thread(args, &fixture)
            .await
            .map_err(Failure::Setup)?;
        let receipts = fanout_processes::collect(&mut helpers, outcome.final_version, args.settle)
            .await
            .map_err(Failure::Setup)?;
        ((outcome, connect_s), receipts)
    } else {
        eprintln!(
            "connecting {n} subscribers over {} server(s), {} at a time…",
            subscriber_urls.len(),
            args.connect_concurrency
        );
        let held = plan.open(0..n).await.map_err(Failure::Setup)?;
        let connect_s = connect_started.elapsed().as_secs_f64();
        eprintln!("{n} subscribers ready in {connect_s:.2} s");
        let outcome = match reserve_on_own_thread(args, &fixture).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let _ = held.stop().await;
                return Err(Failure::Setup(e));
            }
        };
        // Settle: wait (bounded) until every subscriber holds the final version.
        let behind = held
            .wait_for(outcome.final_version, Instant::now() + args.settle)
            .await;
        if behind > 0 {
            eprintln!("{behind} subscribers did not reach the final version within --settle");
        }
        let receipts = held.stop().await.map_err(Failure::Setup)?;
        ((outcome, connect_s), receipts)
    };
    let (outcome, connect_s) = outcome;
    let settled_s = match settled_at(&receipts, outcome.final_version) {
        Settled::Never => None,
        Settled::FromTheStart => Some(0.0),
        Settled::At(at) => Some(
            outcome
                .last_ack
                .map_or(0.0, |ack| at.saturating_duration_since(ack).as_secs_f64()),
        ),
    };

    let tally = tally(&receipts, &outcome, n);
    Ok(FanoutReport {
        url: args.url.to_string(),
        subscriber_urls: subscriber_urls.iter().map(Target::to_string).collect(),
        event_id: fixture.event_id.clone(),
        processes: processes.len(),
        source_addresses: args.source_addresses,
        subscribers: n,
        rate: args.rate,
        connect_s,
        reservations: outcome.attempted,
        ok: outcome.ok,
        errors: outcome.errors,
        transport_failures: outcome.transport_failures,
        reserve_elapsed_s: outcome.elapsed.as_secs_f64(),
        stopped_by: outcome.stopped_by.to_owned(),
        reserve_latency: Latency::from_histogram(&outcome.latency),
        latency: Latency::from_histogram(&tally.latency),
        latency_from_send: Latency::from_histogram(&tally.latency_from_send),
        latency_all: Latency::from_histogram(&tally.latency_all),
        received: tally.received,
        coalesced: tally.coalesced,
        missing: tally.missing,
        stale: tally.stale,
        unattributed: tally.unattributed,
        early: tally.early,
        before_ack: tally.before_ack,
        lost_subscribers: tally.lost,
        first_loss: tally.first_loss,
        settled_s,
    })
}

/// The slots (subscriber indexes) each process holds: one process for all of them, or,
/// with `per_process` below the count, consecutive ranges of at most `per_process`, each
/// held by a helper process.
pub(crate) fn process_plan(subscribers: u32, per_process: Option<u32>) -> Vec<Range<usize>> {
    let n = subscribers as usize;
    let per = match per_process {
        Some(per) if (per as usize) < n => per.max(1) as usize,
        _ => {
            let all = 0..n;
            return vec![all];
        }
    };
    (0..n.div_ceil(per))
        .map(|k| k * per..((k + 1) * per).min(n))
        .collect()
}

/// When every subscriber held the final version (or a newer one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Some subscriber never did.
    Never,
    /// All held it from their subscription on (nothing was reserved).
    FromTheStart,
    /// The arrival of the update that brought the last of them there.
    At(Instant),
}

/// [`Settled`] from what the subscribers received.
pub(crate) fn settled_at(receipts: &[Receipts], final_version: u64) -> Settled {
    let mut last = None;
    for r in receipts {
        if r.initial >= final_version {
            continue;
        }
        match r.received.iter().find(|(v, _)| *v >= final_version) {
            Some(&(_, at)) => last = last.max(Some(at)),
            None => return Settled::Never,
        }
    }
    last.map_or(Settled::FromTheStart, Settled::At)
}

/// How subscribers connect: the same in this process and in a helper process.
#[derive(Clone)]
pub(crate) struct Subscribe {
    /// Slot `i` connects to `urls[i mod len]`.
    pub urls: Arc<Vec<Target>>,
    pub event_id: Arc<str>,
    pub ticket_type: Arc<str>,
    /// Slot `i` binds [`source_address`]`(i, source_addresses)` before it connects.
    pub source_addresses: u32,
    pub connect_concurrency: usize,
    pub call_timeout: Duration,
}

/// Subscribers held by this process.
pub(crate) struct Held {
    tasks: Vec<JoinHandle<Receipts>>,
    /// Each one's latest version, so the end of the run can be seen.
    latest: Arc<Vec<AtomicU64>>,
    stop: watch::Sender<bool>,
}

impl Subscribe {
    /// Connects and subscribes the subscribers of `slots`, `connect_concurrency` at a time;
    /// all or none (the ones opened are closed again on a failure).
    pub async fn open(&self, slots: Range<usize>) -> Result<Held, String> {
        let first = slots.start;
        let count = slots.len();
        let latest: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let (stop_tx, stop_rx) = watch::channel(false);
        let opened: Vec<Result<JoinHandle<Receipts>, String>> = stream::iter(slots)
            .map(|slot| {
                let target = &self.urls[slot % self.urls.len()];
                let source = source_address(slot, self.source_addresses);
                let latest = Arc::clone(&latest);
                let stop = stop_rx.clone();
                async move {
                    let (ws, initial) = open_subscriber(
                        target,
                        source,
                        &self.event_id,
                        &self.ticket_type,
                        self.call_timeout,
                    )
                    .await?;
                    latest[slot - first].store(initial, Ordering::SeqCst);
                    Ok(tokio::spawn(subscriber(
                        ws,
                        Arc::clone(&self.ticket_type),
                        initial,
                        latest,
                        slot - first,
                        stop,
                    )))
                }
            })
            .buffered(self.connect_concurrency)
            .collect()
            .await;
        let mut tasks = Vec::with_capacity(count);
        let mut failures = Vec::new();
        for result in opened {
            match result {
                Ok(task) => tasks.push(task),
                Err(e) => failures.push(e),
            }
        }
        let held = Held {
            tasks,
            latest,
            stop: stop_tx,
        };
        if let Some(first_failure) = failures.first() {
            let failed = failures.len();
            let _ = held.stop().await;
            return Err(format!(
                "{failed} of {count} subscribers could not connect and subscribe; first: {first_failure}"
            ));
        }
        Ok(held)
    }
}

impl Held {
    /// Waits until every subscriber holds `version` (or newer), all have ended, or `until`
    /// passes; returns how many are behind.
    pub async fn wait_for(&self, version: u64, until: Instant) -> usize {
        loop {
            let behind = self
                .latest
                .iter()
                .filter(|v| v.load(Ordering::SeqCst) < version)
                .count();
            if behind == 0
                || Instant::now() >= until
                || self.tasks.iter().all(JoinHandle::is_finished)
            {
                return behind;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every subscriber (each closes its connection) and returns what each saw, in
    /// slot order.
    pub async fn stop(self) -> Result<Vec<Receipts>, String> {
        let _ = self.stop.send(true);
        let mut receipts = Vec::with_capacity(self.tasks.len());
        let mut failed = None;
        for task in self.tasks {
            match task.await {
                Ok(r) => receipts.push(r),
                Err(e) => failed = Some(format!("a subscriber task failed: {e}")),
            }
        }
        failed.map_or(Ok(receipts), Err)
    }
}

async fn setup(args: &FanoutArgs, http: &HttpRpc) -> Result<Fixture, String> {
    let run = run_id();
    eprintln!("setup: run {run} against {}", args.url);
    let (event_id, ticket_type_id) = create_hot_event(
        http,
        &args.admin_email,
        &args.admin_password,
        &format!("loadgen fanout {run}"),
        args.capacity,
    )
    .await?;
    let email = format!("loadgen-fanout-{run}@loadgen.invalid");
    let registered = http
        .call(
            "auth.register",
            json!({"email": email, "password": "loadgen-password"}),
            None,
        )
        .await
        .map_err(|e| format!("auth.register {email}: {e}"))?;
    let reserver_token = string_at(&registered, "/token")?.to_owned();
    eprintln!("setup: event {event_id}, ticket type {ticket_type_id}, reserver {email}");
    // Several servers: the event reaches the others a moment after its creation.
    for target in args.subscriber_urls() {
        wait_visible(&target, &event_id, args.call_timeout).await?;
    }
    Ok(Fixture {
        event_id,
        ticket_type_id,
        reserver_token,
    })
}

/// Waits (at most [`VISIBLE_WITHIN`]) until `events.get` of the event answers through
/// `target`.
async fn wait_visible(
    target: &Target,
    event_id: &str,
    call_timeout: Duration,
) -> Result<(), String> {
    let http = HttpRpc::new(target.clone(), call_timeout);
    let until = Instant::now() + VISIBLE_WITHIN;
    loop {
        match http
            .call("events.get", json!({"event_id": event_id}), None)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= until => {
                return Err(format!(
                    "the event is not visible through {target} within {VISIBLE_WITHIN:?}: {e}"
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How long an event created on one server may take to be visible on another.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

/// Connects (no login) and subscribes; returns the stream and the version it reported.
async fn open_subscriber(
    target: &Target,
    source: Option<IpAddr>,
    event_id: &str,
    ticket_type: &str,
    call_timeout: Duration,
) -> Result<(WsStream, u64), String> {
    let attempt = async {
        let mut ws =
            WsRpc::connect_from(target, &target.ws(None), source, Some(light_ws_config())).await?;
        let result = ws
            .call("pool.subscribe", &json!({"event_id": event_id}))
            .await
            .map_err(|e| format!("pool.subscribe through {target}: {e}"))?;
        let version = pool_version(&result, ticket_type)
            .ok_or_else(|| format!("pool.subscribe: no version for the ticket type in {result}"))?;
        Ok((ws.into_stream(), version))
    };
    timeout(call_timeout, attempt)
        .await
        .unwrap_or_else(|_| Err("connect and subscribe timed out".to_owned()))
}

/// `version` of `ticket_type` in a `{pools: [{ticket_type_id, available, version}]}`.
fn pool_version(value: &Value, ticket_type: &str) -> Option<u64> {
    value
        .get("pools")?
        .as_array()?
        .iter()
        .find(|p| p.get("ticket_type_id").and_then(Value::as_str) == Some(ticket_type))?
        .get("version")?
        .as_u64()
}

/// The parts of a frame a subscriber reads (typed and borrowed: 10,000 subscribers parse
/// every update, on the same CPUs as the server).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<UpdateParams<'a>>,
}

#[derive(Deserialize)]
struct UpdateParams<'a> {
    #[serde(borrow, default)]
    pools: Vec<PoolEntry<'a>>,
}

#[derive(Deserialize)]
struct PoolEntry<'a> {
    #[serde(borrow)]
    ticket_type_id: Cow<'a, str>,
    version: u64,
}

/// The version of `ticket_type` a `pool.update` frame carries; None for anything else.
fn update_version(text: &str, ticket_type: &str) -> Option<u64> {
    let frame: Frame<'_> = serde_json::from_str(text).ok()?;
    if frame.method.as_deref() != Some("pool.update") {
        return None;
    }
    frame
        .params?
        .pools
        .iter()
        .find(|p| p.ticket_type_id == ticket_type)
        .map(|p| p.version)
}

/// One subscriber: records every `pool.update` until told to stop.
async fn subscriber(
    mut ws: WsStream,
    ticket_type: Arc<str>,
    initial: u64,
    latest: Arc<Vec<AtomicU64>>,
    slot: usize,
    mut stop: watch::Receiver<bool>,
) -> Receipts {
    let mut receipts = Receipts {
        initial,
        ..Receipts::default()
    };
    let mut held = initial;
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.changed() => break,
            frame = ws.next() => frame,
        };
        let arrived = Instant::now();
        match frame {
            Some(Ok(Message::Text(text))) => {
                if let Some(version) = update_version(text.as_str(), &ticket_type) {
                    if version > held {
                        held = version;
                        receipts.received.push((version, arrived));
                        latest[slot].store(version, Ordering::SeqCst);
                    } else {
                        receipts.stale += 1;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                receipts.lost = Some(match frame {
                    Some(f) => format!("closed by the server: {} {}", f.code, f.reason),
                    None => "closed by the server".to_owned(),
                });
                break;
            }
            // Pings are answered by the library.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                receipts.lost = Some(format!("receive: {e}"));
                break;
            }
            None => {
                receipts.lost = Some("connection closed".to_owned());
                break;
            }
        }
    }
    if receipts.lost.is_none() {
        let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    receipts
}

/// What the reserver did.
struct Reserved {
    attempted: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    transport_failures: u64,
    elapsed: Duration,
    stopped_by: &'static str,
    latency: Histogram<u64>,
    /// When the call was sent and its answer arrived, per version its reservation produced.
    acks: HashMap<u64, Ack>,
    /// The version before the first reservation and the one after the last.
    first_version: u64,
    final_version: u64,
    last_ack: Option<Instant>,
}

/// Runs [`reserve_paced`] on a thread and runtime of its own, so that its answers are
/// read (and timed) at once rather than after the thousands of subscriber tasks woken by
/// the same change.
async fn reserve_on_own_thread(args: &FanoutArgs, fixture: &Fixture) -> Result<Reserved, String> {
    let args = args.clone();
    let fixture = fixture.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("reserver".to_owned())
        .spawn(move || {
            let outcome = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async {
                    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
                    reserve_paced(&args, &http, &fixture).await
                }),
                Err(e) => Err(format!("reserver runtime: {e}")),
            };
            let _ = done_tx.send(outcome);
        })
        .map_err(|e| format!("reserver thread: {e}"))?;
    done_rx
        .await
        .unwrap_or_else(|_| Err("the reserver thread panicked".to_owned()))
}

/// One acknowledged reservation.
#[derive(Debug, Clone, Copy)]
struct Ack {
    sent: Instant,
    answered: Instant,
}

/// The reserver: M reservations of one ticket at the given pace, one call at a time.
async fn reserve_paced(
    args: &FanoutArgs,
    http: &HttpRpc,
    fixture: &Fixture,
) -> Result<Reserved, String> {
    let url = args.url.ws(Some(&fixture.reserver_token));
    let connect = |url: reqwest::Url| async move {
        timeout(args.call_timeout, WsRpc::connect(&url))
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_owned()))
    };
    let mut ws = Some(connect(url.clone()).await?);
    let first_version = current_version(http, fixture).await?;
    let mut base = first_version;
    let mut since_base = 0u64;
    let params = json!({"items": [{"ticket_type_id": fixture.ticket_type_id, "quantity": 1}]});
    let mut out = Reserved {
        attempted: 0,
        ok: 0,
        errors: BTreeMap::new(),
        transport_failures: 0,
        elapsed: Duration::ZERO,
        stopped_by: "reservations",
        latency: new_histogram(),
        acks: HashMap::with_capacity(args.reservations as usize),
        first_version,
        final_version: first_version,
        last_ack: None,
    };
    eprintln!(
        "reserving: {} reservations at {}/s (from version {first_version})…",
        args.reservations, args.rate
    );
    let started = Instant::now();
    let deadline = started + args.max_duration;
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for _ in 0..args.reservations {
        pace.tick().await;
        if Instant::now() >= deadline {
            out.stopped_by = "max-duration";
            break;
        }
        let conn = match ws.as_mut() {
            Some(conn) => conn,
            None => match connect(url.clone()).await {
                Ok(conn) => ws.insert(conn),
                Err(e) => {
                    eprintln!("reserver reconnect failed: {e}");
                    continue;
                }
            },
        };
        out.attempted += 1;
        let sent = Instant::now();
        let outcome = timeout(args.call_timeout, conn.call("tickets.reserve", &params))
            .await
            .unwrap_or_else(|_| Err(CallError::Transport("timed out".to_owned())));
        let answered = Instant::now();
        match outcome {
            Ok(_) => {
                out.ok += 1;
                since_base += 1;
                out.acks.insert(base + since_base, Ack { sent, answered });
                out.last_ack = Some(answered);
                out.latency
                    .saturating_record((answered.duration_since(sent).as_micros() as u64).max(1));
                continue;
            }
            Err(CallError::Rpc(error)) => {
                *out.errors.entry(error.reason()).or_default() += 1;
            }
            Err(CallError::Transport(e)) => {
                if out.transport_failures == 0 {
                    eprintln!("reserver transport failure (further ones only counted): {e}");
                }
                out.transport_failures += 1;
                ws = None;
            }
        }
        // After anything but a success the version may have moved otherwise: read it again.
        base = current_version(http, fixture).await?;
        since_base = 0;
    }
    out.elapsed = started.elapsed();
    out.final_version = current_version(http, fixture).await?;
    if let Some(conn) = ws {
        conn.close().await;
    }
    Ok(out)
}

/// `version` of the ticket type as `events.get` reports it.
async fn current_version(http: &HttpRpc, fixture: &Fixture) -> Result<u64, String> {
    ticket_type_count(http, &fixture.event_id, &fixture.ticket_type_id, "version").await
}

/// The figures over all subscribers.
struct Tally {
    latency: Histogram<u64>,
    latency_from_send: Histogram<u64>,
    latency_all: Histogram<u64>,
    received: u64,
    coalesced: u64,
    missing: u64,
    stale: u64,
    unattributed: u64,
    early: u64,
    before_ack: u64,
    lost: u64,
    first_loss: Option<String>,
}

fn tally(receipts: &[Receipts], reserved: &Reserved, subscribers: usize) -> Tally {
    let mut t = Tally {
        latency: new_histogram(),
        latency_from_send: new_histogram(),
        latency_all: new_histogram(),
        received: 0,
        coalesced: 0,
        missing: 0,
        stale: 0,
        unattributed: 0,
        early: 0,
        before_ack: 0,
        lost: 0,
        first_loss: None,
    };
    // Per version after the first: how many subscribers held it (or newer), and since when
    // the last of them did.
    let first = reserved.first_version;
    let span = reserved.final_version.saturating_sub(first) as usize;
    let mut held_by = vec![0usize; span];
    let mut held_since: Vec<Option<Instant>> = vec![None; span];
    let micros = |from: Instant, to: Instant| (to.duration_since(from).as_micros() as u64).max(1);
    for r in receipts {
        t.stale += r.stale;
        if let Some(loss) = &r.lost {
            t.lost += 1;
            t.first_loss.get_or_insert_with(|| loss.clone());
        }
        let mut held = r.initial;
        for &(version, arrived) in &r.received {
            if version <= first {
                // A change before the run (e.g. the owner's takeover of the new event
                // moving its version on): nothing the reserver did.
                t.early += 1;
                held = version;
                continue;
            }
            let from = held.max(first);
            t.received += 1;
            t.coalesced += version - from - 1;
            match reserved.acks.get(&version) {
                Some(ack) => {
                    if arrived >= ack.answered {
                        t.latency.saturating_record(micros(ack.answered, arrived));
                    } else {
                        t.before_ack += 1;
                        t.latency.saturating_record(1);
                    }
                    t.latency_from_send
                        .saturating_record(micros(ack.sent, arrived));
                }
                None => t.unattributed += 1,
            }
            for v in (from + 1)..=version.min(first + span as u64) {
                let i = (v - first - 1) as usize;
                held_by[i] += 1;
                held_since[i] = held_since[i].max(Some(arrived));
            }
            held = version;
        }
        t.missing += reserved.final_version.saturating_sub(held);
    }
    for (i, (count, since)) in held_by.iter().zip(&held_since).enumerate() {
        let version = first + 1 + i as u64;
        if let (true, Some(since), Some(ack)) =
            (*count == subscribers, since, reserved.acks.get(&version))
        {
            t.latency_all.saturating_record(if *since >= ack.answered {
                micros(ack.answered, *since)
            } else {
                1
            });
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("20/s"), Ok(20.0));
        assert_eq!(parse_rate("2.5/sec"), Ok(2.5));
        assert_eq!(parse_rate("100"), Ok(100.0));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1e9").is_err());
    }

    #[test]
    fn subscribers_are_split_over_helper_processes_only_above_the_per_process_count() {
        let all = 0..1000;
        assert_eq!(process_plan(1000, None), vec![all.clone()]);
        assert_eq!(process_plan(1000, Some(1000)), vec![all.clone()]);
        assert_eq!(process_plan(1000, Some(5000)), vec![all]);
        assert_eq!(
            process_plan(3000, Some(1000)),
            vec![0..1000, 1000..2000, 2000..3000]
        );
        assert_eq!(
            process_plan(2500, Some(1000)),
            vec![0..1000, 1000..2000, 2000..2500]
        );
        assert_eq!(process_plan(3, Some(1)), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn settled_is_when_the_last_subscriber_reached_the_final_version() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let a = Receipts {
            initial: 0,
            received: vec![(1, ms(5)), (2, ms(9))],
            ..Receipts::default()
        };
        let b = Receipts {
            initial: 0,
            received: vec![(2, ms(12)), (3, ms(20))],
            ..Receipts::default()
        };
        assert_eq!(settled_at(&[a.clone(), b.clone()], 2), Settled::At(ms(12)));
        assert_eq!(settled_at(&[a.clone(), b], 3), Settled::Never);
        let already = Receipts {
            initial: 2,
            ..Receipts::default()
        };
        assert_eq!(
            settled_at(std::slice::from_ref(&already), 2),
            Settled::FromTheStart
        );
        assert_eq!(settled_at(&[already, a], 2), Settled::At(ms(9)));
    }

    #[test]
    fn subscriber_urls_default_to_the_url() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: FanoutArgs,
        }
        use clap::Parser as _;
        let base = ["fanout", "--admin-email", "a", "--admin-password", "p"];
        let args = Cli::try_parse_from(base).unwrap().args;
        assert_eq!(args.subscriber_urls(), vec![args.url.clone()]);
        let mut more = base.to_vec();
        more.extend([
            "--subscriber-url",
            "http://127.0.0.1:1",
            "--subscriber-url",
            "http://127.0.0.2:2",
        ]);
        let args = Cli::try_parse_from(more).unwrap().args;
        let urls: Vec<String> = args
            .subscriber_urls()
            .iter()
            .map(Target::to_string)
            .collect();
        assert_eq!(urls, ["http://127.0.0.1:1", "http://127.0.0.2:2"]);
        let mut bad = base.to_vec();
        bad.extend(["--source-addresses", "255"]);
        assert!(Cli::try_parse_from(bad).is_err());
        let mut bad = base.to_vec();
        bad.extend(["--subscribers-per-process", "0"]);
        assert!(Cli::try_parse_from(bad).is_err());
    }

    #[test]
    fn update_versions_are_read_for_the_ticket_type_only() {
        let frame = json!({"jsonrpc": "2.0", "method": "pool.update", "params": {
            "subscription": "sub-1", "event_id": "e",
            "pools": [{"ticket_type_id": "other", "available": 1, "version": 9},
                      {"ticket_type_id": "tt", "available": 5, "version": 7}]}})
        .to_string();
        assert_eq!(update_version(&frame, "tt"), Some(7));
        assert_eq!(update_version(&frame, "missing"), None);
        let other = json!({"jsonrpc": "2.0", "method": "reservation.updated", "params": {}});
        assert_eq!(update_version(&other.to_string(), "tt"), None);
        assert_eq!(update_version("not json", "tt"), None);
    }

    fn reserved(acks: &[(u64, Instant)], first: u64, last: u64) -> Reserved {
        let acks = acks.iter().map(|&(version, answered)| {
            let sent = answered
                .checked_sub(Duration::from_millis(1))
                .unwrap_or(answered);
            (version, Ack { sent, answered })
        });
        Reserved {
            attempted: acks.len() as u64,
            ok: acks.len() as u64,
            errors: BTreeMap::new(),
            transport_failures: 0,
            elapsed: Duration::ZERO,
            stopped_by: "reservations",
            latency: new_histogram(),
            acks: acks.collect(),
            first_version: first,
            final_version: last,
            last_ack: None,
        }
    }

    #[test]
    fn coalesced_versions_are_counted_and_latency_is_attributed_to_the_carried_version() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Versions 1..=4 acknowledged at 10, 20, 30, 40 ms.
        let r = reserved(&[(1, ms(10)), (2, ms(20)), (3, ms(30)), (4, ms(40))], 0, 4);
        let a = Receipts {
            initial: 0,
            received: vec![(1, ms(15)), (2, ms(25)), (3, ms(35)), (4, ms(45))],
            ..Receipts::default()
        };
        // Coalesced: 1 and 2 skipped (carried by 3), and 4 missing at the end.
        let b = Receipts {
            initial: 0,
            received: vec![(3, ms(50))],
            stale: 1,
            ..Receipts::default()
        };
        let t = tally(&[a, b], &r, 2);
        assert_eq!(t.received, 5);
        assert_eq!(t.coalesced, 2);
        assert_eq!(t.missing, 1);
        assert_eq!(t.stale, 1);
        let l = Latency::from_histogram(&t.latency);
        assert_eq!(l.count, 5);
        assert!((l.max_ms - 20.0).abs() < 0.1, "{l:?}");
        assert!((l.p50_ms - 5.0).abs() < 0.1, "{l:?}");
        let from_send = Latency::from_histogram(&t.latency_from_send);
        assert!((from_send.max_ms - 21.0).abs() < 0.1, "{from_send:?}");
        // Held by both: versions 1..=3; the last holder got them at 50 ms.
        let all = Latency::from_histogram(&t.latency_all);
        assert_eq!(all.count, 3);
        assert!((all.max_ms - 40.0).abs() < 0.1, "{all:?}");
        assert!((all.p50_ms - 30.0).abs() < 0.1, "{all:?}");
    }

    #[test]
    fn changes_before_the_run_are_set_apart_however_far_the_version_jumped() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Subscribed at version 1; a takeover moved it to 1 << 32 before the first
        // reservation, which then made 1 << 32 + 1.
        let first = 1u64 << 32;
        let r = reserved(&[(first + 1, ms(10))], first, first + 1);
        let a = Receipts {
            initial: 1,
            received: vec![(first, ms(2)), (first + 1, ms(12))],
            ..Receipts::default()
        };
        let b = Receipts {
            initial: 1,
            received: vec![(first + 1, ms(15))],
            ..Receipts::default()
        };
        let t = tally(&[a, b], &r, 2);
        assert_eq!(t.early, 1);
        assert_eq!(t.received, 2);
        assert_eq!(t.coalesced, 0);
        assert_eq!(t.missing, 0);
        let all = Latency::from_histogram(&t.latency_all);
        assert_eq!(all.count, 1);
        assert!((all.max_ms - 5.0).abs() < 0.1, "{all:?}");
    }

    #[test]
    fn updates_before_the_answer_count_as_zero_and_unknown_versions_are_set_apart() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let r = reserved(&[(1, ms(10))], 0, 2);
        let a = Receipts {
            initial: 0,
            received: vec![(1, ms(9)), (2, ms(30))],
            ..Receipts::default()
        };
        let t = tally(&[a], &r, 1);
        assert_eq!(t.before_ack, 1);
        assert_eq!(t.unattributed, 1);
        assert_eq!(t.latency.len(), 1);
        assert_eq!(t.missing, 0);
    }
}
