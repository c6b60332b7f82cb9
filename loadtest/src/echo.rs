//! The transport's own ceiling, for comparison with `loadgen reserve`: `loadgen echo-server`
//! is a plain axum WebSocket echo at `GET /ws` (every text frame sent back unchanged), and
//! `loadgen echo` drives it with the reserve loop itself ([`crate::reserve::drive`]), sending
//! the very frames `tickets.reserve` sends, so message sizes and framing match.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use clap::Args;
use serde_json::json;

use crate::client::Target;
use crate::procfs::CpuProbe;
use crate::report::{Latency, ReserveReport};
use crate::reserve::{connect_all, drive, parse_duration, CallKind, Load, SetupError};
use crate::schedule::parse_rate;

/// The size of a real ticket type id, so the echoed frame is as long as a reserve call.
const SAMPLE_TICKET_TYPE_ID: &str = "01890a5d-ac96-774b-bcce-b302099a8057";

/// Flags of `loadgen echo-server`.
#[derive(Debug, Clone, Args)]
pub struct EchoServerArgs {
    /// Address to listen on; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:4100")]
    pub listen: SocketAddr,

    /// The server stops by itself after this long (it also stops on SIGINT/SIGTERM).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub max_lifetime: Duration,
}

/// Serves the echo until a signal or `--max-lifetime`.
pub async fn serve(args: &EchoServerArgs) -> Result<(), String> {
    if !args.listen.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", args.listen));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    let app = Router::new().route("/ws", get(upgrade));
    eprintln!("echo-server: listening on {}", args.listen);
    let lifetime = args.max_lifetime;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = tokio::time::sleep(lifetime) => eprintln!("echo-server: max lifetime reached"),
            }
        })
        .await
        .map_err(|e| format!("serve: {e}"))
}

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(echo)
}

/// Sends every text or binary frame back as it came, until the peer closes.
async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            // Pings are answered by axum; pongs need nothing.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// Flags of `loadgen echo`.
#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    /// Echo server base URL; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:4100", value_parser = Target::parse)]
    pub url: Target,

    /// WebSocket connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// How long the load runs.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Total bound on round trips over all connections.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_requests: u64,

    /// Open model: round trips per second over all connections; without it, a closed loop.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// CPU time to report, as for `loadgen reserve --cpu`.
    #[arg(long, value_parser = CpuProbe::parse)]
    pub cpu: Vec<CpuProbe>,

    /// A label for this run in the JSON line.
    #[arg(long, default_value = "echo")]
    pub phase: String,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,

    /// Bound on one round trip.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,
}

/// Drives the echo server with reserve frames.
pub async fn run(args: &EchoArgs) -> Result<ReserveReport, SetupError> {
    crate::limits::ensure_fds_for(u64::from(args.connections), "connections")?;
    let urls: Vec<reqwest::Url> = (0..args.connections).map(|_| args.url.ws(None)).collect();
    eprintln!("connecting {} WebSockets…", args.connections);
    let connections = connect_all(&urls, args.call_timeout).await?;
    let params = json!({"items": [{"ticket_type_id": SAMPLE_TICKET_TYPE_ID, "quantity": 1}]});
    let outcome = drive(Load {
        connections,
        urls,
        params: Arc::new(vec![params]),
        call: CallKind::Echo,
        quantity: 1,
        max_requests: args.max_requests,
        call_timeout: args.call_timeout,
        duration: args.duration,
        rate: args.rate,
        cpu: args.cpu.clone(),
        idempotency_keys: None,
    })
    .await?;
    let t = &outcome.tally;
    Ok(ReserveReport {
        tool: "loadgen echo".to_owned(),
        phase: args.phase.clone(),
        url: args.url.to_string(),
        connections: args.connections as usize,
        quantity: 1,
        capacity: 0,
        ticket_types: 1,
        existing_event: None,
        idempotency_keys: false,
        offered_rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        max_requests: args.max_requests,
        requests: t.requests,
        ok: t.ok,
        tickets: 0,
        errors: t.errors.clone(),
        transport_failures: t.transport_failures,
        reconnects: t.reconnects,
        late_sends: t.late_sends,
        elapsed_s: outcome.elapsed.as_secs_f64(),
        stopped_by: outcome.stopped_by.to_owned(),
        latency: Latency::from_histogram(&t.latency),
        latency_ok: Latency::from_histogram(&t.latency_ok),
        writer_batches: None,
        cpu_seconds: outcome.cpu_seconds,
        rss: None,
        consistency: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::WsRpc;

    #[tokio::test]
    async fn the_echo_server_sends_reserve_frames_back_unchanged() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, Router::new().route("/ws", get(upgrade)))
                .await
                .unwrap();
        });
        let target = Target::parse(&format!("http://{addr}")).unwrap();
        let mut ws = WsRpc::connect(&target.ws(None)).await.unwrap();
        let params = json!({"items": [{"ticket_type_id": SAMPLE_TICKET_TYPE_ID, "quantity": 1}]});
        for _ in 0..3 {
            ws.echo("tickets.reserve", &params).await.unwrap();
        }
        ws.close().await;
        server.abort();
    }
}
