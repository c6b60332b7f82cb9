//! Prometheus metrics served at `GET /metrics`: open connections, calls by method and
//! outcome, call latency, calls in flight, waiting long-poll GETs, the writer's batches, and
//! WebSocket closes by code and reason.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    code: u16,
    reason: &'static str,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// All metrics of the process. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    connections: Family<TransportLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    latency: LatencyFamily,
    batch_size: Histogram,
    in_flight: Family<MethodLabels, Gauge>,
    gets_waiting: Gauge,
    ws_closes: Family<CloseLabels, Counter>,
    owned_events: Gauge,
    forwarded: Family<CallLabels, Counter>,
    forward_latency: Histogram,
    takeovers: Counter,
}

/// Counts something in progress until dropped (a call running, a GET waiting).
pub struct InProgress(Gauge);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl InProgress {
    fn start(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ticket_api");
        let connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Open WebSocket connections and long-poll sessions",
            connections.clone(),
        );
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "JSON-RPC calls by method and outcome",
            calls.clone(),
        );
        let latency: LatencyFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20)));
        registry.register(
            "call_duration_seconds",
            "Time from a call's parse to its result",
            latency.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "writer_batch_size",
            "Changes committed per write-behind transaction",
            batch_size.clone(),
        );
        let in_flight = Family::<MethodLabels, Gauge>::default();
        registry.register(
            "calls_in_flight",
            "JSON-RPC calls begun and not yet finished (a call goes on when its client leaves)",
            in_flight.clone(),
        );
        let gets_waiting = Gauge::default();
        registry.register(
            "long_poll_gets_waiting",
            "Long-poll GETs waiting for notifications",
            gets_waiting.clone(),
        );
        let ws_closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "websocket_closes",
            "WebSocket connections ended, by close code and reason (1006: lost without a close)",
            ws_closes.clone(),
        );
        let owned_events = Gauge::default();
        registry.register(
            "cluster_owned_events",
            "Events this server owns (sells) in cluster mode",
            owned_events.clone(),
        );
        let forwarded = Family::<CallLabels, Counter>::default();
        registry.register(
            "cluster_forwarded",
            "Calls forwarded to the server owning their event, by method and outcome",
            forwarded.clone(),
        );
        // Present from the start (at 0), so every server shows the series.
        for method in ["tickets.reserve", "reservations.cancel", "payments.create"] {
            drop(forwarded.get_or_create(&CallLabels {
                method,
                outcome: "ok",
            }));
        }
        let forward_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "cluster_forward_duration_seconds",
            "Time from forwarding a call to the owner's answer",
            forward_latency.clone(),
        );
        let takeovers = Counter::default();
        registry.register(
            "cluster_takeovers",
            "Events this server has taken over",
            takeovers.clone(),
        );
        Self {
            registry,
            connections,
            calls,
            latency,
            batch_size,
            in_flight,
            gets_waiting,
            ws_closes,
            owned_events,
            forwarded,
            forward_latency,
            takeovers,
        }
    }

    /// How many events this server owns now.
    pub fn set_owned_events(&self, count: usize) {
        self.owned_events
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// One forwarded call: its method, outcome (`ok`; `error`, the owner's refusal passed
    /// on; `unavailable`, no answer from an owner in time) and how long it took.
    pub fn record_forward(&self, method: &'static str, outcome: &'static str, took: Duration) {
        self.forwarded
            .get_or_create(&CallLabels { method, outcome })
            .inc();
        self.forward_latency.observe(took.as_secs_f64());
    }

    pub fn record_takeover(&self) {
        self.takeovers.inc();
    }

    /// Counts one call; `method` must come from the method table (or be a fixed label),
    /// so a client cannot grow the label set.
    pub fn record_call(
        &self,
        method: &'static str,
        outcome: &'static str,
        elapsed: Option<Duration>,
    ) {
        self.calls
            .get_or_create(&CallLabels { method, outcome })
            .inc();
        if let Some(elapsed) = elapsed {
            self.latency
                .get_or_create(&MethodLabels { method })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Counts a call of `method` (from the method table) as running until the guard drops.
    pub fn call_started(&self, method: &'static str) -> InProgress {
        InProgress::start(
            self.in_flight
                .get_or_create(&MethodLabels { method })
                .clone(),
        )
    }

    /// Calls of `method` running now.
    pub fn calls_in_flight(&self, method: &'static str) -> i64 {
        self.in_flight.get_or_create(&MethodLabels { method }).get()
    }

    /// Counts a long-poll GET as waiting until the guard drops.
    pub fn get_waiting(&self) -> InProgress {
        InProgress::start(self.gets_waiting.clone())
    }

    /// Long-poll GETs waiting now.
    pub fn gets_waiting(&self) -> i64 {
        self.gets_waiting.get()
    }

    pub fn connection_opened(&self, transport: &'static str) {
        self.connections
            .get_or_create(&TransportLabels { transport })
            .inc();
    }

    /// Open connections (or long-poll sessions) of `transport` now.
    pub fn open_connections(&self, transport: &'static str) -> i64 {
        self.connections
            .get_or_create(&TransportLabels { transport })
            .get()
    }

    pub fn connection_closed(&self, transport: &'static str) {
        self.connections
            .get_or_create(&TransportLabels { transport })
            .dec();
    }

    /// Counts a WebSocket that ended with `code`; `reason` is one of the server's fixed
    /// reasons, so a client cannot grow the label set.
    pub fn websocket_closed(&self, code: u16, reason: &'static str) {
        self.ws_closes
            .get_or_create(&CloseLabels { code, reason })
            .inc();
    }

    /// WebSocket connections ended so far with `code` and `reason`.
    pub fn websocket_closes(&self, code: u16, reason: &'static str) -> u64 {
        self.ws_closes
            .get_or_create(&CloseLabels { code, reason })
            .get()
    }

    pub fn record_batch(&self, changes: usize) {
        self.batch_size.observe(changes as f64);
    }

    /// The Prometheus text exposition.
    /// Metrics that name this server (`ticket_api_node_info{node="…"} 1`).
    pub fn for_node(node: &str) -> Self {
        let mut metrics = Self::new();
        metrics.registry.register(
            "node",
            "The name of this server (--node-id)",
            prometheus_client::metrics::info::Info::new(vec![("node".to_owned(), node.to_owned())]),
        );
        metrics
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
