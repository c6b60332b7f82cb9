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
    pub capacity: u64,
    /// `capacity − Σ quantity` of the acknowledged reservations.
    pub expected_available: u64,
    /// `available` as `events.get` reports it.
    pub available: u64,
    /// Tickets that calls without an answer may have taken (they may or may not have
    /// been committed).
    pub unknown_tickets: u64,
}

impl Consistency {
    /// Exact, or short by no more than what unanswered calls may have taken.
    pub fn is_ok(&self) -> bool {
        self.available <= self.expected_available
            && self.expected_available - self.available <= self.unknown_tickets
    }

    pub fn line(&self) -> String {
        if self.available == self.expected_available {
            format!(
                "consistency: ok (available {} = capacity {} − {} reserved)",
                self.available,
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
                "consistency: MISMATCH available {} but capacity {} − {} reserved = {} (unanswered calls: up to {} tickets)",
                self.available,
                self.capacity,
                self.capacity - self.expected_available,
                self.expected_available,
                self.unknown_tickets
            )
        }
    }
}

/// Everything `loadgen reserve` measured.
#[derive(Debug, Clone)]
pub struct ReserveReport {
    pub url: String,
    pub connections: usize,
    pub quantity: u64,
    pub capacity: u64,
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
    pub elapsed_s: f64,
    /// `duration`, `max-requests` or `pool exhausted`.
    pub stopped_by: String,
    /// Latency of every answered call (successes and errors).
    pub latency: Latency,
    /// Latency of the successful reservations only.
    pub latency_ok: Latency,
    /// The server's write-behind batches during the load, from `/metrics`.
    pub writer_batches: Option<WriterBatches>,
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
        println!(
            "reserve: {} connections against {}, quantity {}, capacity {}",
            self.connections, self.url, self.quantity, self.capacity
        );
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
        println!("  throughput: {:.0} reservations/s", self.rate());
        let l = self.latency_ok;
        println!(
            "  latency (ok reservations): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
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
        match &self.consistency {
            Some(c) => println!("{}", c.line()),
            None => println!("consistency: not checked (events.get failed)"),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tool": "loadgen reserve",
            "url": self.url,
            "connections": self.connections,
            "quantity": self.quantity,
            "capacity": self.capacity,
            "duration_s": self.duration_s,
            "max_requests": self.max_requests,
            "requests": self.requests,
            "ok": self.ok,
            "tickets": self.tickets,
            "errors": self.errors,
            "error_total": self.error_total(),
            "transport_failures": self.transport_failures,
            "reconnects": self.reconnects,
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
            "consistency": self.consistency.as_ref().map(|c| json!({
                "ok": c.is_ok(),
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
        Consistency {
            capacity: 100,
            expected_available: expected,
            available,
            unknown_tickets: unknown,
        }
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
