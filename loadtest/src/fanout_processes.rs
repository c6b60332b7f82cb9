//! Subscribers of `loadgen fanout` held by helper processes, for counts one process cannot
//! hold (every connection is an open file, and the hard `RLIMIT_NOFILE` bounds each
//! process). The parent starts `loadgen fanout-subscribers` once per range of slots (see
//! [`crate::fanout::process_plan`]); each helper connects and subscribes its range exactly
//! as the parent would ([`Subscribe::open`]) and speaks JSON lines:
//!
//! - helper → parent: `{"ready": N, "connect_s": S}` once all N are subscribed, or
//!   `{"error": "…"}` (and exit code 1);
//! - parent → helper (stdin): `{"final_version": V}` after the last reservation; the helper
//!   waits (at most `--settle`) for its subscribers to hold V, then prints one line per
//!   subscriber, `{"slot", "initial", "received": [[version, unix µs], …], "stale", "lost"}`,
//!   and `{"done": N}`. End of input without that line: the helper closes everything and
//!   exits without a report.
//!
//! Arrival times cross the process boundary as wall-clock microseconds: each process
//! converts its monotonic instants through one (instant, wall clock) pair read at start
//! ([`WallClock`]), so on one machine they compare to within microseconds (barring a step
//! of the wall clock during the run). A helper ends by itself after `--max-lifetime`.

use std::io::Write;
use std::ops::Range;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

use crate::client::{check_source_addresses, Target, MAX_SOURCE_ADDRESSES};
use crate::fanout::{FanoutArgs, Receipts, Subscribe};
use crate::limits;
use crate::reserve::parse_duration;
use crate::Failure;

/// Flags of `loadgen fanout-subscribers` (started by `loadgen fanout`, not by hand).
#[derive(Debug, Clone, Args)]
pub struct HelperArgs {
    /// Servers the subscribers connect to, round robin by slot (repeatable).
    #[arg(long = "subscriber-url", required = true, value_parser = Target::parse)]
    pub subscriber_urls: Vec<Target>,

    #[arg(long)]
    pub event_id: String,

    #[arg(long)]
    pub ticket_type_id: String,

    /// The first slot (subscriber index over all processes) this process holds.
    #[arg(long, default_value_t = 0)]
    pub first_slot: usize,

    /// Subscribers this process holds: slots `first_slot ..< first_slot + subscribers`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub subscribers: u32,

    /// As `loadgen fanout --source-addresses` (by slot, so the spread is the same).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_SOURCE_ADDRESSES as i64))]
    pub source_addresses: u32,

    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connect_concurrency: u32,

    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// After the final version is announced, how long to wait for every subscriber here
    /// to hold it.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Bound on this process's life: it closes everything and exits by then, whatever the
    /// parent does.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub max_lifetime: Duration,
}

/// A monotonic instant paired with the wall clock read at the same moment.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    unix_us: u64,
}

impl WallClock {
    pub fn now() -> Self {
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        Self {
            instant: Instant::now(),
            unix_us,
        }
    }

    /// `at` in wall-clock microseconds since the Unix epoch.
    pub fn unix_us(&self, at: Instant) -> u64 {
        if at >= self.instant {
            self.unix_us + at.duration_since(self.instant).as_micros() as u64
        } else {
            self.unix_us
                .saturating_sub(self.instant.duration_since(at).as_micros() as u64)
        }
    }

    /// The instant of this process at wall-clock `unix_us` (the anchor itself when it
    /// would lie before the process's clock can go).
    pub fn instant(&self, unix_us: u64) -> Instant {
        if unix_us >= self.unix_us {
            self.instant + Duration::from_micros(unix_us - self.unix_us)
        } else {
            self.instant
                .checked_sub(Duration::from_micros(self.unix_us - unix_us))
                .unwrap_or(self.instant)
        }
    }
}

/// One subscriber's [`Receipts`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireReceipts {
    pub slot: usize,
    pub initial: u64,
    /// `(version, arrival in wall-clock µs)`.
    pub received: Vec<(u64, u64)>,
    pub stale: u64,
    pub lost: Option<String>,
}

impl WireReceipts {
    fn from_receipts(slot: usize, r: &Receipts, clock: &WallClock) -> Self {
        Self {
            slot,
            initial: r.initial,
            received: r
                .received
                .iter()
                .map(|&(v, at)| (v, clock.unix_us(at)))
                .collect(),
            stale: r.stale,
            lost: r.lost.clone(),
        }
    }

    fn into_receipts(self, clock: &WallClock) -> Receipts {
        Receipts {
            initial: self.initial,
            received: self
                .received
                .into_iter()
                .map(|(v, us)| (v, clock.instant(us)))
                .collect(),
            stale: self.stale,
            lost: self.lost,
        }
    }
}

/// A line a helper prints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum HelperLine {
    Ready { ready: usize },
    Failed { error: String },
    Subscriber(WireReceipts),
    Done { done: usize },
}

impl HelperLine {
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line)
            .map_err(|e| format!("unexpected line from a helper: {e}: {line}"))
    }
}

/// The line the parent sends when the reservations are over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Final {
    pub final_version: u64,
}

fn print_line(line: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `loadgen fanout-subscribers`: holds its subscribers until the parent announces the
/// final version (or its input ends, or `--max-lifetime` passes).
pub async fn serve(args: &HelperArgs) -> Result<(), Failure> {
    let died = Instant::now() + args.max_lifetime;
    let fail = |e: String| {
        print_line(&serde_json::json!({ "error": e }));
        e
    };
    limits::ensure_fds_for(u64::from(args.subscribers), "subscriber connections")
        .map_err(|e| Failure::Flags(fail(e)))?;
    check_source_addresses(
        args.source_addresses,
        &args.subscriber_urls.iter().collect::<Vec<_>>(),
    )
    .map_err(|e| Failure::Flags(fail(e)))?;
    let plan = Subscribe {
        urls: Arc::new(args.subscriber_urls.clone()),
        event_id: Arc::from(args.event_id.as_str()),
        ticket_type: Arc::from(args.ticket_type_id.as_str()),
        source_addresses: args.source_addresses,
        connect_concurrency: args.connect_concurrency as usize,
        call_timeout: args.call_timeout,
    };
    let slots = args.first_slot..args.first_slot + args.subscribers as usize;
    let started = Instant::now();
    let held = plan
        .open(slots.clone())
        .await
        .map_err(|e| Failure::Setup(fail(e)))?;
    print_line(&serde_json::json!({
        "ready": slots.len(),
        "connect_s": started.elapsed().as_secs_f64(),
    }));

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let left = died.saturating_duration_since(Instant::now());
    let announced = match timeout(left, stdin.next_line()).await {
        Ok(Ok(Some(line))) => serde_json::from_str::<Final>(&line).ok(),
        _ => None,
    };
    let Some(Final { final_version }) = announced else {
        let _ = held.stop().await;
        return Err(Failure::Setup(
            "no final version from the parent: stopped without a report".to_owned(),
        ));
    };
    let until = (Instant::now() + args.settle).min(died);
    held.wait_for(final_version, until).await;
    let receipts = held.stop().await.map_err(|e| Failure::Setup(fail(e)))?;
    let clock = WallClock::now();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, r) in receipts.iter().enumerate() {
        let wire = WireReceipts::from_receipts(slots.start + i, r, &clock);
        let _ = serde_json::to_writer(&mut out, &wire);
        let _ = out.write_all(b"\n");
    }
    let _ = writeln!(out, "{}", serde_json::json!({ "done": receipts.len() }));
    let _ = out.flush();
    Ok(())
}

/// A running helper, as the parent sees it.
pub struct Helper {
    slots: Range<usize>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

/// How long a helper may take to connect and subscribe its share.
fn ready_within(subscribers: usize, concurrency: usize, call_timeout: Duration) -> Duration {
    // Rounds of `concurrency` connections, each bounded by the call timeout, would be the
    // worst case; a healthy server does them in milliseconds. Bounded by 2 minutes.
    let rounds = subscribers.div_ceil(concurrency.max(1)) as u32;
    (call_timeout * 2 + Duration::from_millis(50) * rounds).min(Duration::from_secs(120))
}

/// Starts one helper per range of `processes` and waits until all are ready; on any
/// failure every helper is stopped (they are killed when dropped).
pub async fn spawn(
    args: &FanoutArgs,
    plan: &Subscribe,
    processes: &[Range<usize>],
) -> Result<Vec<Helper>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let concurrency = (args.connect_concurrency as usize / processes.len()).max(1);
    let lifetime = args.max_duration + args.settle * 2 + Duration::from_secs(180);
    let mut helpers = Vec::with_capacity(processes.len());
    for slots in processes {
        let mut command = Command::new(&exe);
        command.arg("fanout-subscribers");
        for url in plan.urls.iter() {
            command.arg("--subscriber-url").arg(url.to_string());
        }
        command
            .args(["--event-id", &plan.event_id])
            .args(["--ticket-type-id", &plan.ticket_type])
            .args(["--first-slot", &slots.start.to_string()])
            .args(["--subscribers", &slots.len().to_string()])
            .args(["--source-addresses", &plan.source_addresses.to_string()])
            .args(["--connect-concurrency", &concurrency.to_string()])
            .args([
                "--call-timeout",
                &format!("{}ms", plan.call_timeout.as_millis()),
            ])
            .args(["--settle", &format!("{}ms", args.settle.as_millis())])
            .args(["--max-lifetime", &format!("{}s", lifetime.as_secs())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting a helper process: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("a helper without stdout")?;
        helpers.push(Helper {
            slots: slots.clone(),
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
    }
    let within = ready_within(
        processes.iter().map(Range::len).max().unwrap_or(0),
        concurrency,
        plan.call_timeout,
    );
    let ready = join_all(helpers.iter_mut().map(|h| async move {
        let slots = h.slots.clone();
        match timeout(within, h.lines.next_line()).await {
            Ok(Ok(Some(line))) => match HelperLine::parse(&line)? {
                HelperLine::Ready { ready } if ready == slots.len() => Ok(()),
                HelperLine::Failed { error } => Err(format!("helper for slots {slots:?}: {error}")),
                other => Err(format!("helper for slots {slots:?}: unexpected {other:?}")),
            },
            Ok(Ok(None)) => Err(format!(
                "helper for slots {slots:?} ended before it was ready"
            )),
            Ok(Err(e)) => Err(format!("helper for slots {slots:?}: {e}")),
            Err(_) => Err(format!(
                "helper for slots {slots:?} not ready within {within:?}"
            )),
        }
    }))
    .await;
    if let Some(Err(e)) = ready.into_iter().find(Result::is_err) {
        stop_all(&mut helpers).await;
        return Err(e);
    }
    Ok(helpers)
}

/// Kills what is still running.
async fn stop_all(helpers: &mut [Helper]) {
    for h in helpers.iter_mut() {
        h.stdin = None;
        let _ = h.child.start_kill();
        let _ = timeout(Duration::from_secs(5), h.child.wait()).await;
    }
}

/// Announces the final version to every helper and collects what their subscribers
/// received, in slot order, with arrival times as instants of this process.
pub async fn collect(
    helpers: &mut [Helper],
    final_version: u64,
    settle: Duration,
) -> Result<Vec<Receipts>, String> {
    let announcement = format!("{}\n", serde_json::json!(Final { final_version }));
    for h in helpers.iter_mut() {
        if let Some(mut stdin) = h.stdin.take() {
            // A helper that died shows below as a report that never comes.
            let _ = stdin.write_all(announcement.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }
    let clock = WallClock::now();
    // Its settle, then the time to print thousands of lines.
    let within = settle + Duration::from_secs(60);
    let reports = join_all(helpers.iter_mut().map(|h| async move {
        let slots = h.slots.clone();
        let read = async {
            let mut receipts = Vec::with_capacity(slots.len());
            loop {
                let line = h
                    .lines
                    .next_line()
                    .await
                    .map_err(|e| format!("reading a helper: {e}"))?
                    .ok_or_else(|| {
                        format!("helper for slots {slots:?} ended without its report")
                    })?;
                match HelperLine::parse(&line)? {
                    HelperLine::Subscriber(wire) => receipts.push(wire),
                    HelperLine::Done { done } => {
                        return check_report(&slots, receipts, done);
                    }
                    HelperLine::Failed { error } => {
                        return Err(format!("helper for slots {slots:?}: {error}"))
                    }
                    HelperLine::Ready { .. } => {}
                }
            }
        };
        let report = timeout(within, read).await.unwrap_or_else(|_| {
            Err(format!(
                "helper for slots {slots:?}: no report within {within:?}"
            ))
        });
        let _ = timeout(Duration::from_secs(5), h.child.wait()).await;
        report
    }))
    .await;
    let mut all = Vec::new();
    for report in reports {
        match report {
            Ok(wires) => all.extend(wires.into_iter().map(|w| w.into_receipts(&clock))),
            Err(e) => {
                stop_all(helpers).await;
                return Err(e);
            }
        }
    }
    Ok(all)
}

/// A helper's report is whole: one line per slot of its range, in order, and the count
/// it announced.
fn check_report(
    slots: &Range<usize>,
    receipts: Vec<WireReceipts>,
    done: usize,
) -> Result<Vec<WireReceipts>, String> {
    let in_order = receipts.iter().map(|w| w.slot).eq(slots.clone());
    if done != slots.len() || !in_order {
        return Err(format!(
            "helper for slots {slots:?}: an incomplete report ({} lines, {done} announced)",
            receipts.len()
        ));
    }
    Ok(receipts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_conversions_round_trip() {
        let clock = WallClock::now();
        let later = clock.instant + Duration::from_millis(1500);
        let us = clock.unix_us(later);
        assert_eq!(us, clock.unix_us + 1_500_000);
        assert_eq!(clock.instant(us), later);
        // Another process's anchor, read 2 ms later on the same clocks, maps the same
        // wall-clock time to the same instant.
        let other = WallClock {
            instant: clock.instant + Duration::from_millis(2),
            unix_us: clock.unix_us + 2_000,
        };
        assert_eq!(other.instant(us), later);
        assert_eq!(other.unix_us(later), us);
    }

    #[test]
    fn times_before_the_anchor_are_converted_too() {
        let clock = WallClock {
            instant: Instant::now() + Duration::from_secs(10),
            unix_us: 50_000_000,
        };
        let earlier = clock.instant - Duration::from_millis(3);
        assert_eq!(clock.unix_us(earlier), 49_997_000);
        assert_eq!(clock.instant(49_997_000), earlier);
    }

    #[test]
    fn helper_lines_parse() {
        assert_eq!(
            HelperLine::parse(r#"{"ready": 1000, "connect_s": 0.8}"#),
            Ok(HelperLine::Ready { ready: 1000 })
        );
        assert_eq!(
            HelperLine::parse(r#"{"error": "3 of 10 subscribers could not connect"}"#),
            Ok(HelperLine::Failed {
                error: "3 of 10 subscribers could not connect".to_owned()
            })
        );
        assert_eq!(
            HelperLine::parse(
                r#"{"slot": 7, "initial": 3, "received": [[4, 1000], [6, 2500]], "stale": 1, "lost": null}"#
            ),
            Ok(HelperLine::Subscriber(WireReceipts {
                slot: 7,
                initial: 3,
                received: vec![(4, 1000), (6, 2500)],
                stale: 1,
                lost: None,
            }))
        );
        assert_eq!(
            HelperLine::parse(r#"{"done": 2}"#),
            Ok(HelperLine::Done { done: 2 })
        );
        assert!(HelperLine::parse("connecting…").is_err());
        assert!(HelperLine::parse(r#"{"something": 1}"#).is_err());
    }

    #[test]
    fn receipts_survive_the_wire() {
        let clock = WallClock::now();
        let r = Receipts {
            initial: 5,
            received: vec![(6, clock.instant + Duration::from_millis(10))],
            stale: 2,
            lost: Some("closed by the server: 1008".to_owned()),
        };
        let wire = WireReceipts::from_receipts(42, &r, &clock);
        let text = serde_json::to_string(&wire).unwrap();
        let HelperLine::Subscriber(back) = HelperLine::parse(&text).unwrap() else {
            panic!("{text}");
        };
        assert_eq!(back.slot, 42);
        assert_eq!(back.into_receipts(&clock), r);
    }

    fn wire(slot: usize) -> WireReceipts {
        WireReceipts {
            slot,
            initial: 0,
            received: Vec::new(),
            stale: 0,
            lost: None,
        }
    }

    #[test]
    fn a_report_must_cover_its_slots_in_order() {
        let slots = 10..13;
        assert!(check_report(&slots, vec![wire(10), wire(11), wire(12)], 3).is_ok());
        assert!(check_report(&slots, vec![wire(10), wire(11)], 2).is_err());
        assert!(check_report(&slots, vec![wire(10), wire(12), wire(11)], 3).is_err());
        assert!(check_report(&slots, vec![wire(10), wire(11), wire(12)], 4).is_err());
    }

    #[test]
    fn readiness_is_bounded() {
        let t = Duration::from_secs(10);
        assert_eq!(ready_within(1000, 200, t), Duration::from_millis(20_250));
        assert_eq!(ready_within(1_000_000, 1, t), Duration::from_secs(120));
    }
}
