//! `loadgen takeover`: how long an event is without a seller when its owner dies.
//!
//! With reservations streaming on an existing event through the other servers (`--url`,
//! repeatable: the connections spread over them), it sends SIGKILL to the owner
//! (`--kill-pid`, which must be a `ticket-api` process), and measures from the kill to the
//! first successful `tickets.reserve` *sent after the kill* (a call sent before may still
//! have been committed by the dying owner). Meanwhile calls answer `UNAVAILABLE`, which a
//! client retries after `--retry-pause`; every answer is counted by when it was sent:
//! before the kill, in flight at the kill, after it.
//!
//! Then a consistency check: through every `--url`, `available` must settle (within 10 s:
//! mirrors follow the new owner) at `available before − acknowledged`, short by at most
//! the tickets of unanswered calls. The baseline is read before the load through
//! `--check-url` (the owner, whose count is exact).
//!
//! One kill per run: the caller restarts the killed server and runs it again.
//! Bounded: `--warmup`, then at most `--max-wait` for the first success after the kill.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::timeout;

use crate::client::{CallError, HttpRpc, Target, WsRpc};
use crate::report::Consistency;
use crate::reserve::{
    connect_all, parse_duration, register_customers, run_id, ticket_type_count, SetupError,
};

/// Flags of `loadgen takeover`.
#[derive(Debug, Clone, Args)]
pub struct TakeoverArgs {
    /// A server the reservations go through (repeatable; the connections spread over
    /// them): the servers that live on. Loopback only.
    #[arg(long = "url", required = true, value_parser = Target::parse)]
    pub urls: Vec<Target>,

    /// The event whose owner is killed.
    #[arg(long)]
    pub event_id: String,

    /// Its ticket type reserved (one ticket per call).
    #[arg(long)]
    pub ticket_type_id: String,

    /// The owner's process id: sent SIGKILL once reservations stream. Must be a
    /// `ticket-api` process.
    #[arg(long)]
    pub kill_pid: u32,

    /// Where `available` is read before the load (the owner: its count is exact); default
    /// the first `--url`.
    #[arg(long, value_parser = Target::parse)]
    pub check_url: Option<Target>,

    /// WebSocket connections reserving, one customer each, closed loop.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,

    /// How long reservations stream before the kill.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Bound on the wait for the first success after the kill.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// After a refused or unanswered call, the pause before the next one (as a polite
    /// client retries `UNAVAILABLE`).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub retry_pause: Duration,

    /// Bound on one call or connection attempt.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// Registrations in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub register_concurrency: u32,

    /// A label for this run in the JSON line.
    #[arg(long, default_value = "takeover")]
    pub phase: String,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// Whether `/proc/<pid>/comm` names the server (the name is cut to 15 bytes there).
pub fn is_server_comm(comm: &str) -> bool {
    comm.trim_end() == "ticket-api"
}

/// When calls were sent, relative to the kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Before,
    /// Sent before the kill, answered (or given up) after it.
    InFlight,
    After,
}

/// The window of a call sent at `sent` and finished at `done`, given the kill's instant.
pub fn window(sent: Instant, done: Instant, killed: Option<Instant>) -> Window {
    match killed {
        Some(k) if sent >= k => Window::After,
        Some(k) if done >= k => Window::InFlight,
        _ => Window::Before,
    }
}

/// Outcomes of the calls of one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub transport_failures: u64,
}

impl Outcomes {
    fn merge(&mut self, other: &Outcomes) {
        self.ok += other.ok;
        for (reason, count) in &other.errors {
            *self.errors.entry(reason.clone()).or_default() += count;
        }
        self.transport_failures += other.transport_failures;
    }

    fn to_json(&self) -> Value {
        json!({"ok": self.ok, "errors": self.errors, "transport_failures": self.transport_failures})
    }

    fn line(&self) -> String {
        let mut text = format!("{} ok", self.ok);
        for (reason, count) in &self.errors {
            text += &format!(", {count} {reason}");
        }
        if self.transport_failures > 0 {
            text += &format!(", {} unanswered", self.transport_failures);
        }
        text
    }
}

/// What one connection counted.
#[derive(Debug, Clone, Default)]
struct Tally {
    before: Outcomes,
    in_flight: Outcomes,
    after: Outcomes,
    reconnects: u64,
}

impl Tally {
    fn window_mut(&mut self, w: Window) -> &mut Outcomes {
        match w {
            Window::Before => &mut self.before,
            Window::InFlight => &mut self.in_flight,
            Window::After => &mut self.after,
        }
    }
}

/// State the connections share with the measuring task.
struct Shared {
    /// The instant the kill had been sent: calls sent from then on count as "after".
    killed: Mutex<Option<Instant>>,
    /// The first success of a call sent after the kill: its answer and the server.
    first_after: Mutex<Option<(Instant, usize)>>,
    /// Successes so far (any window).
    ok: std::sync::atomic::AtomicU64,
    changed: Notify,
}

/// Everything `loadgen takeover` measured.
#[derive(Debug, Clone)]
pub struct TakeoverReport {
    pub phase: String,
    pub urls: Vec<String>,
    pub event_id: String,
    pub killed_pid: u32,
    pub connections: u32,
    /// From the kill to the first successful reservation sent after it; `None` when none
    /// came within `--max-wait`.
    pub takeover: Option<Duration>,
    pub first_success_via: Option<String>,
    pub before: Outcomes,
    pub in_flight: Outcomes,
    pub after: Outcomes,
    pub reconnects: u64,
    pub elapsed: Duration,
    pub consistency: Option<Consistency>,
    /// `available` through each `--url` at the end of the check.
    pub available_seen: Vec<Option<u64>>,
}

impl TakeoverReport {
    pub fn print_human(&self) {
        println!(
            "takeover [{}]: event {} , SIGKILL to pid {}, {} connections through {}",
            self.phase,
            self.event_id,
            self.killed_pid,
            self.connections,
            self.urls.join(", ")
        );
        match (self.takeover, &self.first_success_via) {
            (Some(t), Some(via)) => println!(
                "  kill → first successful reserve sent after it: {:.3} s (through {via})",
                t.as_secs_f64()
            ),
            _ => println!("  NO successful reserve after the kill within --max-wait"),
        }
        println!("  calls sent before the kill: {}", self.before.line());
        println!("  calls in flight at the kill: {}", self.in_flight.line());
        println!(
            "  calls sent after the kill (until the run stopped): {}",
            self.after.line()
        );
        if self.reconnects > 0 {
            println!("  reconnects: {}", self.reconnects);
        }
        match &self.consistency {
            Some(c) => println!("{}", c.line()),
            None => println!("consistency: not checked (events.get failed)"),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tool": "loadgen takeover",
            "phase": self.phase,
            "urls": self.urls,
            "event_id": self.event_id,
            "killed_pid": self.killed_pid,
            "connections": self.connections,
            "takeover_ms": self.takeover.map(|t| t.as_secs_f64() * 1000.0),
            "first_success_via": self.first_success_via,
            "before": self.before.to_json(),
            "in_flight": self.in_flight.to_json(),
            "after": self.after.to_json(),
            "reconnects": self.reconnects,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "available_seen": self.available_seen,
            "consistency": self.consistency.as_ref().map(|c| json!({
                "ok": c.is_ok(),
                "available": c.available,
                "expected_available": c.expected_available,
                "unknown_tickets": c.unknown_tickets,
            })),
        })
    }

    /// A takeover was seen and nothing was oversold or lost.
    pub fn is_ok(&self) -> bool {
        self.takeover.is_some() && self.consistency.as_ref().is_some_and(Consistency::is_ok)
    }
}

fn proc_comm(pid: u32) -> Result<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|e| format!("--kill-pid {pid}: no such process here ({e})"))
}

pub async fn run(args: &TakeoverArgs) -> Result<TakeoverReport, SetupError> {
    let comm = proc_comm(args.kill_pid)?;
    if !is_server_comm(&comm) {
        return Err(format!(
            "--kill-pid {} is {:?}, not ticket-api: refused",
            args.kill_pid,
            comm.trim_end()
        ));
    }
    let run = run_id();
    let http = HttpRpc::new(args.urls[0].clone(), args.call_timeout);
    let check = HttpRpc::new(
        args.check_url
            .clone()
            .unwrap_or_else(|| args.urls[0].clone()),
        args.call_timeout,
    );
    let before =
        ticket_type_count(&check, &args.event_id, &args.ticket_type_id, "available").await?;
    eprintln!(
        "takeover: event {}, {before} available (through {}); registering {} customers…",
        args.event_id,
        check.target(),
        args.connections
    );
    let tokens =
        register_customers(&http, &run, args.connections, args.register_concurrency).await?;
    let urls: Vec<reqwest::Url> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| args.urls[i % args.urls.len()].ws(Some(t)))
        .collect();
    let connections = connect_all(&urls, args.call_timeout).await?;

    let shared = Arc::new(Shared {
        killed: Mutex::new(None),
        first_after: Mutex::new(None),
        ok: std::sync::atomic::AtomicU64::new(0),
        changed: Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    // However the measuring task goes, no connection runs past this.
    let hard_stop = started + args.warmup + args.call_timeout + args.max_wait + args.call_timeout;
    let params = json!({"items": [{"ticket_type_id": args.ticket_type_id, "quantity": 1}]});
    let workers: Vec<_> = connections
        .into_iter()
        .zip(urls)
        .enumerate()
        .map(|(index, (ws, url))| {
            let worker = Worker {
                index: index % args.urls.len(),
                url,
                params: params.clone(),
                call_timeout: args.call_timeout,
                retry_pause: args.retry_pause,
                hard_stop,
                shared: Arc::clone(&shared),
                stop: stop_rx.clone(),
            };
            tokio::spawn(worker.run(ws))
        })
        .collect();

    let measured = measure(args, &shared).await;
    let _ = stop_tx.send(true);
    let mut tally = Tally::default();
    for worker in workers {
        let t = worker
            .await
            .map_err(|e| format!("a reserving task failed: {e}"))?;
        tally.before.merge(&t.before);
        tally.in_flight.merge(&t.in_flight);
        tally.after.merge(&t.after);
        tally.reconnects += t.reconnects;
    }
    let elapsed = started.elapsed();
    let takeover = measured?;

    let acknowledged = tally.before.ok + tally.in_flight.ok + tally.after.ok;
    let unknown = tally.before.transport_failures
        + tally.in_flight.transport_failures
        + tally.after.transport_failures;
    let (consistency, available_seen) = settle_check(args, before, acknowledged, unknown).await;

    Ok(TakeoverReport {
        phase: args.phase.clone(),
        urls: args.urls.iter().map(Target::to_string).collect(),
        event_id: args.event_id.clone(),
        killed_pid: args.kill_pid,
        connections: args.connections,
        takeover: takeover.map(|(t, _)| t),
        first_success_via: takeover.map(|(_, i)| args.urls[i].to_string()),
        before: tally.before,
        in_flight: tally.in_flight,
        after: tally.after,
        reconnects: tally.reconnects,
        elapsed,
        consistency,
        available_seen,
    })
}

/// Warm-up, the kill, and the wait for the first success after it: `(kill → that answer,
/// the server it came through)`, `None` if none came within `--max-wait`.
async fn measure(
    args: &TakeoverArgs,
    shared: &Shared,
) -> Result<Option<(Duration, usize)>, SetupError> {
    use std::sync::atomic::Ordering;
    tokio::time::sleep(args.warmup).await;
    // Reservations must stream before the kill, or there is nothing to measure.
    let until = Instant::now() + args.call_timeout;
    while shared.ok.load(Ordering::SeqCst) == 0 {
        if Instant::now() >= until {
            return Err(format!(
                "no reservation succeeded within {:?} of warm-up: nothing to take over",
                args.warmup + args.call_timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "takeover: {} reservations so far; SIGKILL to pid {}",
        shared.ok.load(Ordering::SeqCst),
        args.kill_pid
    );
    let kill_started = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &args.kill_pid.to_string()])
        .status()
        .await
        .map_err(|e| format!("kill -KILL {}: {e}", args.kill_pid))?;
    if !status.success() {
        return Err(format!("kill -KILL {} failed: {status}", args.kill_pid));
    }
    // Once `kill` has returned the process runs no more: a call sent from now on cannot
    // be answered by it. The time is counted from before the kill was sent.
    *shared.killed.lock().expect("not poisoned") = Some(Instant::now());
    let deadline = kill_started + args.max_wait;
    loop {
        let notified = shared.changed.notified();
        if let Some((answered, via)) = *shared.first_after.lock().expect("not poisoned") {
            return Ok(Some((answered.duration_since(kill_started), via)));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let _ = timeout(left, notified).await;
    }
}

/// Polls `events.get` through every `--url` (at most 10 s) until each shows
/// `before − acknowledged` (short by at most `unknown`); the last readings otherwise.
async fn settle_check(
    args: &TakeoverArgs,
    before: u64,
    acknowledged: u64,
    unknown: u64,
) -> (Option<Consistency>, Vec<Option<u64>>) {
    let clients: Vec<HttpRpc> = args
        .urls
        .iter()
        .map(|u| HttpRpc::new(u.clone(), args.call_timeout))
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::with_capacity(clients.len());
        for http in &clients {
            seen.push(
                ticket_type_count(http, &args.event_id, &args.ticket_type_id, "available")
                    .await
                    .ok(),
            );
        }
        let checks: Option<Vec<Consistency>> = seen
            .iter()
            .map(|a| {
                a.map(|a| {
                    Consistency::one(before, acknowledged, a, unknown).against_available_before()
                })
            })
            .collect();
        let all_ok = checks
            .as_ref()
            .is_some_and(|c| c.iter().all(Consistency::is_ok));
        if all_ok || Instant::now() >= until {
            // The first server that is off, or the first one when all agree.
            let shown = checks.and_then(|c| {
                let first_bad = c.iter().position(|c| !c.is_ok()).unwrap_or(0);
                c.into_iter().nth(first_bad)
            });
            return (shown, seen);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One reserving connection.
struct Worker {
    /// Which `--url` it goes through.
    index: usize,
    url: reqwest::Url,
    params: Value,
    call_timeout: Duration,
    retry_pause: Duration,
    hard_stop: Instant,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self, ws: WsRpc) -> Tally {
        let mut tally = Tally::default();
        let mut conn = Some(ws);
        while !*self.stop.borrow() && Instant::now() < self.hard_stop {
            let ws = match conn.as_mut() {
                Some(ws) => ws,
                None => match timeout(self.call_timeout, WsRpc::connect(&self.url)).await {
                    Ok(Ok(ws)) => {
                        tally.reconnects += 1;
                        conn.insert(ws)
                    }
                    _ => {
                        self.pause().await;
                        continue;
                    }
                },
            };
            let sent = Instant::now();
            // Not cut short by the stop: an abandoned call might still commit, and the
            // check afterwards needs to know.
            let outcome =
                timeout(self.call_timeout, ws.call("tickets.reserve", &self.params)).await;
            let done = Instant::now();
            let killed = *self.shared.killed.lock().expect("not poisoned");
            let w = window(sent, done, killed);
            match outcome.unwrap_or_else(|_| Err(CallError::Transport("timed out".to_owned()))) {
                Ok(_) => {
                    tally.window_mut(w).ok += 1;
                    self.shared
                        .ok
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if w == Window::After {
                        let mut first = self.shared.first_after.lock().expect("not poisoned");
                        if first.is_none_or(|(at, _)| done < at) {
                            *first = Some((done, self.index));
                        }
                        drop(first);
                        self.shared.changed.notify_waiters();
                    }
                }
                Err(CallError::Rpc(e)) => {
                    *tally.window_mut(w).errors.entry(e.reason()).or_default() += 1;
                    self.pause().await;
                }
                Err(CallError::Transport(_)) => {
                    tally.window_mut(w).transport_failures += 1;
                    conn = None;
                    self.pause().await;
                }
            }
        }
        if let Some(ws) = conn {
            ws.close().await;
        }
        tally
    }

    async fn pause(&mut self) {
        tokio::select! {
            _ = self.stop.changed() => {}
            _ = tokio::time::sleep(self.retry_pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_server_may_be_killed() {
        assert!(is_server_comm("ticket-api\n"));
        assert!(!is_server_comm("postgres\n"));
        assert!(!is_server_comm("loadgen\n"));
        assert!(!is_server_comm("ticket-api-old\n"));
    }

    #[test]
    fn calls_are_counted_by_when_they_were_sent() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(window(ms(1), ms(2), None), Window::Before);
        assert_eq!(window(ms(1), ms(2), Some(ms(5))), Window::Before);
        assert_eq!(window(ms(4), ms(6), Some(ms(5))), Window::InFlight);
        assert_eq!(window(ms(5), ms(6), Some(ms(5))), Window::After);
        assert_eq!(window(ms(9), ms(9), Some(ms(5))), Window::After);
    }

    #[test]
    fn outcomes_merge_and_read() {
        let mut a = Outcomes {
            ok: 2,
            ..Outcomes::default()
        };
        let mut b = Outcomes {
            ok: 1,
            transport_failures: 1,
            ..Outcomes::default()
        };
        b.errors.insert("UNAVAILABLE".to_owned(), 3);
        a.merge(&b);
        a.merge(&b);
        assert_eq!(a.ok, 4);
        assert_eq!(a.errors["UNAVAILABLE"], 6);
        assert_eq!(a.line(), "4 ok, 6 UNAVAILABLE, 2 unanswered");
    }
}
