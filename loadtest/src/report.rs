//! Results of a run: counters, latency percentiles, the consistency check; printed for
//! people and as one JSON line for scripts.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::metrics::WriterBatches;

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        })
    }
}

/// The server's view after the run, compared with what the clients were told.
#[derive(Debug, Clone)]
pub struct Consistency {
    /// What the count started from: the capacity of a fresh ticket type, or the
    /// `available` read before the load (see `baseline`).
    pub capacity: u64,
    /// How the line names that figure: `capacity` or `available before`.
    pub baseline: &'static str,
    /// `capacity − Σ quantity` of the acknowledged reservations.
    pub expected_available: u64,
    /// `available` as `events.get` reports it.
    pub available: u64,
    /// Tickets that calls without an answer may have taken (they may or may not have
    /// been committed).
    pub unknown_tickets: u64,
    /// Ticket types checked (the figures above are their sums).
    pub ticket_types: usize,
    /// Ticket types whose own check failed.
    pub mismatched_types: usize,
}

impl Consistency {
    /// One ticket type of `capacity` of which `acknowledged` tickets were confirmed
    /// reserved, `unknown` more may have been, and the server reports `available`.
    pub fn one(capacity: u64, acknowledged: u64, available: u64, unknown: u64) -> Self {
        let mut c = Self {
            capacity,
            baseline: "capacity",
            expected_available: capacity.saturating_sub(acknowledged),
            available,
            unknown_tickets: unknown,
            ticket_types: 1,
            mismatched_types: 0,
        };
        // More acknowledged than exists is an oversell even when both counts read 0.
        c.mismatched_types = usize::from(!c.totals_ok() || acknowledged > capacity);
        c
    }

    /// Several ticket types: sums of their figures; a mismatch of any one is kept, so
    /// an oversold type cannot hide behind another type's shortfall.
    /// The same check started from the `available` read before the load (an existing
    /// ticket type that already had reservations).
    pub fn against_available_before(self) -> Self {
        Self {
            baseline: "available before",
            ..self
        }
    }

    pub fn combine(parts: &[Consistency]) -> Self {
        Self {
            capacity: parts.iter().map(|c| c.capacity).sum(),
            baseline: parts.first().map_or("capacity", |c| c.baseline),
            expected_available: parts.iter().map(|c| c.expected_available).sum(),
            available: parts.iter().map(|c| c.available).sum(),
            unknown_tickets: parts.iter().map(|c| c.unknown_tickets).sum(),
            ticket_types: parts.iter().map(|c| c.ticket_types).sum(),
            mismatched_types: parts.iter().map(|c| c.mismatched_types).sum(),
        }
    }

    fn totals_ok(&self) -> bool {
        self.available <= self.expected_available
            && self.expected_available - self.available <= self.unknown_tickets
    }

    /// Exact, or short by no more than what unanswered calls may have taken, for every
    /// ticket type.
    pub fn is_ok(&self) -> bool {
        self.mismatched_types == 0 && self.totals_ok()
    }

    pub fn line(&self) -> String {
        let types = if self.ticket_types > 1 {
            format!(" over {} ticket types", self.ticket_types)
        } else {
            String::new()
        };
        if self.mismatched_types > 0 && self.totals_ok() {
            return format!(
                "consistency: MISMATCH in {} of {} ticket types (totals: available {}, expected {})",
                self.mismatched_types, self.ticket_types, self.available, self.expected_available
            );
        }
        let line = if self.available == self.expected_available {
            format!(
                "consistency: ok (available {} = {} {} − {} reserved)",
                self.available,
                self.baseline,
                self.capacity,
                self.capacity - self.expected_available
            )
        } else if self.is_ok() {
            format!(
                "consistency: ok (available {}, expected {}; the difference is within the {} tickets of unanswered calls)",
                self.available, self.expected_available, self.unknown_tickets
            )
        } else {
            format!(
                "consistency: MISMATCH available {} but {} {} − {} reserved = {} (unanswered calls: up to {} tickets)",
                self.available,
                self.baseline,
                self.capacity,
                self.capacity - self.expected_available,
                self.expected_available,
                self.unknown_tickets
            )
        };
        line + &types
    }
}

/// The server's resident memory around a load window, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssWindow {
    pub before_kib: u64,
    pub after_kib: u64,
    /// The process's peak since it started (`VmHWM`), read with `after`.
    pub peak_kib: u64,
}

impl RssWindow {
    /// Bytes of RSS the window added per operation (negative when it shrank).
    pub fn bytes_per(&self, ops: u64) -> Option<f64> {
        (ops > 0).then(|| (self.after_kib as f64 - self.before_kib as f64) * 1024.0 / ops as f64)
    }
}

/// An existing ticket type a run reserved from (`loadgen reserve --event-id`).
#[derive(Debug, Clone)]
pub struct ExistingEvent {
    pub event_id: String,
    /// Its `available` before the load: the baseline of the consistency check.
    pub available_before: u64,
    /// The server the check read.
    pub check_url: String,
}

/// Everything `loadgen reserve` measured.
#[derive(Debug, Clone)]
pub struct ReserveReport {
    /// `loadgen reserve` or `loadgen echo`.
    pub tool: String,
    /// The label given with `--phase`.
    pub phase: String,
    pub url: String,
    pub connections: usize,
    pub quantity: u64,
    /// Of each ticket type.
    pub capacity: u64,
    pub ticket_types: usize,
    /// Set when an existing event was used instead of a created one.
    pub existing_event: Option<ExistingEvent>,
    /// Whether every call carried an idempotency key.
    pub idempotency_keys: bool,
    /// Open model: the arrival rate asked for; `None` for a closed loop.
    pub offered_rate: Option<f64>,
    pub duration_s: f64,
    pub max_requests: u64,
    /// Calls sent (answered or not).
    pub requests: u64,
    pub ok: u64,
    pub tickets: u64,
    pub errors: BTreeMap<String, u64>,
    /// Calls without an answer (lost connection, timeout, malformed response).
    pub transport_failures: u64,
    pub reconnects: u64,
    /// Open model: calls sent more than 1 ms after their intended instant.
    pub late_sends: u64,
    pub elapsed_s: f64,
    /// `duration`, `max-requests` or `pool exhausted`.
    pub stopped_by: String,
    /// Latency of every answered call (successes and errors).
    pub latency: Latency,
    /// Latency of the successful reservations only.
    pub latency_ok: Latency,
    /// The server's write-behind batches during the load, from `/metrics`.
    pub writer_batches: Option<WriterBatches>,
    /// CPU seconds per `--cpu` probe over the load window.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// The server's RSS around the load (with `--server-pid`).
    pub rss: Option<RssWindow>,
    pub consistency: Option<Consistency>,
}

impl ReserveReport {
    pub fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.ok as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn print_human(&self) {
        let mode = match self.offered_rate {
            Some(rate) => format!("open model at {rate:.0}/s"),
            None => "closed loop".to_owned(),
        };
        println!(
            "{} [{}]: {} connections against {}, {mode}, quantity {}, {} ticket type(s) of capacity {}",
            self.tool,
            self.phase,
            self.connections,
            self.url,
            self.quantity,
            self.ticket_types,
            self.capacity
        );
        if let Some(e) = &self.existing_event {
            println!(
                "  existing event {}: {} available before the load (read through {})",
                e.event_id, e.available_before, e.check_url
            );
        }
        if self.idempotency_keys {
            println!("  every call carried an idempotency key");
        }
        println!(
            "  stopped by: {} after {:.2} s (limits: {:.1} s, {} requests)",
            self.stopped_by, self.elapsed_s, self.duration_s, self.max_requests
        );
        println!(
            "  requests: {}   reservations ok: {} ({} tickets)   errors: {}   transport failures: {}   reconnects: {}",
            self.requests,
            self.ok,
            self.tickets,
            self.error_total(),
            self.transport_failures,
            self.reconnects
        );
        for (reason, count) in &self.errors {
            println!("    {reason}: {count}");
        }
        println!("  throughput: {:.0} calls/s answered ok", self.rate());
        if self.offered_rate.is_some() {
            println!(
                "  sent more than 1 ms after the intended instant: {} (latency counts from the intended instant)",
                self.late_sends
            );
        }
        let l = self.latency_ok;
        println!(
            "  latency (ok calls): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        if self.latency.count != self.latency_ok.count {
            let l = self.latency;
            println!(
                "  latency (all {} answers): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
                l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            );
        }
        if let Some(w) = self.writer_batches {
            match w.average() {
                Some(avg) => println!(
                    "  writer: {} transactions, {} changes, {:.1} changes per transaction",
                    w.batches, w.changes, avg
                ),
                None => println!("  writer: no transactions during the load"),
            }
        }
        for (name, seconds) in &self.cpu_seconds {
            println!(
                "  cpu {name}: {seconds:.2} s = {:.2} cores, {:.1} µs per ok call",
                crate::procfs::cores(*seconds, std::time::Duration::from_secs_f64(self.elapsed_s)),
                crate::procfs::micros_per_op(*seconds, self.ok).unwrap_or(0.0)
            );
        }
        if let Some(r) = self.rss {
            println!(
                "  server RSS: {} KiB before, {} KiB after (peak {} KiB): {:.0} bytes per ok call",
                r.before_kib,
                r.after_kib,
                r.peak_kib,
                r.bytes_per(self.ok).unwrap_or(0.0)
            );
        }
        if self.tool == "loadgen reserve" {
            match &self.consistency {
                Some(c) => println!("{}", c.line()),
                None => println!("consistency: not checked (events.get failed)"),
            }
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tool": self.tool,
            "phase": self.phase,
            "mode": if self.offered_rate.is_some() { "open" } else { "closed" },
            "offered_rate": self.offered_rate,
            "url": self.url,
            "connections": self.connections,
            "quantity": self.quantity,
            "capacity": self.capacity,
            "ticket_types": self.ticket_types,
            "event_id": self.existing_event.as_ref().map(|e| e.event_id.clone()),
            "available_before": self.existing_event.as_ref().map(|e| e.available_before),
            "check_url": self.existing_event.as_ref().map(|e| e.check_url.clone()),
            "idempotency_keys": self.idempotency_keys,
            "duration_s": self.duration_s,
            "max_requests": self.max_requests,
            "requests": self.requests,
            "ok": self.ok,
            "tickets": self.tickets,
            "errors": self.errors,
            "error_total": self.error_total(),
            "transport_failures": self.transport_failures,
            "reconnects": self.reconnects,
            "late_sends": self.late_sends,
            "elapsed_s": self.elapsed_s,
            "reservations_per_s": self.rate(),
            "stopped_by": self.stopped_by,
            "latency_ms": self.latency.to_json(),
            "latency_ok_ms": self.latency_ok.to_json(),
            "writer_batches": self.writer_batches.map(|w| json!({
                "transactions": w.batches,
                "changes": w.changes,
                "average": w.average(),
            })),
            "cpu": self.cpu_seconds.iter().map(|(name, &seconds)| (name.clone(), json!({
                "seconds": seconds,
                "us_per_op": crate::procfs::micros_per_op(seconds, self.ok),
            }))).collect::<serde_json::Map<String, Value>>(),
            "rss_kib": self.rss.map(|r| json!({
                "before": r.before_kib,
                "after": r.after_kib,
                "peak": r.peak_kib,
                "bytes_per_op": r.bytes_per(self.ok),
            })),
            "consistency": self.consistency.as_ref().map(|c| json!({
                "ok": c.is_ok(),
                "ticket_types": c.ticket_types,
                "mismatched_types": c.mismatched_types,
                "available": c.available,
                "expected_available": c.expected_available,
                "unknown_tickets": c.unknown_tickets,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consistency(expected: u64, available: u64, unknown: u64) -> Consistency {
        Consistency::one(100, 100 - expected, available, unknown)
    }

    #[test]
    fn an_oversold_type_is_not_hidden_by_another_types_shortfall() {
        // Type 1 oversold by 2 (available 88 where 90 is expected, nothing unanswered),
        // type 2 has 2 more available than expected: the sums match exactly.
        let c = Consistency::combine(&[consistency(90, 88, 0), consistency(90, 92, 4)]);
        assert_eq!(c.available, c.expected_available);
        assert!(!c.is_ok());
        assert_eq!(c.mismatched_types, 2);
        assert!(
            c.line().starts_with("consistency: MISMATCH in 2 of 2"),
            "{}",
            c.line()
        );
        let fine = Consistency::combine(&[consistency(90, 90, 0), consistency(50, 49, 1)]);
        assert!(fine.is_ok());
        assert!(
            fine.line().ends_with("over 2 ticket types"),
            "{}",
            fine.line()
        );
    }

    #[test]
    fn more_acknowledged_than_exists_is_oversold_even_at_zero_available() {
        let c = Consistency::one(100, 101, 0, 0);
        assert_eq!((c.available, c.expected_available), (0, 0));
        assert!(!c.is_ok());
    }

    #[test]
    fn rss_per_operation_in_bytes() {
        let r = RssWindow {
            before_kib: 10_000,
            after_kib: 10_500,
            peak_kib: 11_000,
        };
        assert_eq!(r.bytes_per(1024), Some(500.0));
        assert_eq!(r.bytes_per(0), None);
    }

    #[test]
    fn a_check_from_the_count_before_says_so() {
        let c = Consistency::one(1000, 10, 990, 0).against_available_before();
        assert_eq!(
            c.line(),
            "consistency: ok (available 990 = available before 1000 − 10 reserved)"
        );
        let c = Consistency::one(1000, 10, 985, 0).against_available_before();
        assert!(
            c.line()
                .contains("but available before 1000 − 10 reserved = 990"),
            "{}",
            c.line()
        );
    }

    #[test]
    fn exact_is_ok() {
        let c = consistency(90, 90, 0);
        assert!(c.is_ok());
        assert!(c.line().starts_with("consistency: ok"));
    }

    #[test]
    fn unanswered_calls_may_explain_a_shortfall() {
        assert!(consistency(90, 88, 2).is_ok());
        assert!(!consistency(90, 87, 2).is_ok());
    }

    #[test]
    fn more_available_than_expected_is_a_mismatch() {
        let c = consistency(90, 91, 5);
        assert!(!c.is_ok());
        assert!(c.line().starts_with("consistency: MISMATCH"));
    }

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut h = new_histogram();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 0.5).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 1.0).abs() < 0.01, "{l:?}");
    }
}
