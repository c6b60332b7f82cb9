//! `loadgen idle`: opens N idle WebSocket connections or N long-poll sessions, holds them
//! for `--hold`, then closes them; for measuring the server's memory per idle connection
//! (read its RSS while this holds them).
//!
//! When everything is open, one line starting with `idle: holding` is printed on stdout
//! (and flushed), so a script knows when to measure. Nothing else runs during the hold:
//! the HTTP client that opened long-poll sessions is dropped first, so its pooled
//! keep-alive connections do not count.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures_util::stream::{self, StreamExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::client::{
    check_source_addresses, connect_ws_from, light_ws_config, pending_long_poll, source_address,
    HttpRpc, Target, WsStream, MAX_SOURCE_ADDRESSES,
};
use crate::limits;
use crate::reserve::parse_duration;
use crate::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// `GET /ws`, no login, nothing sent.
    Ws,
    /// `POST /lp` sessions (no login); with `--pending-get`, one pending `GET` each.
    Longpoll,
}

/// Flags of `loadgen idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Server base URL; must be a loopback address (127.0.0.0/8, localhost, [::1]).
    #[arg(long, default_value = "http://127.0.0.1:4000", value_parser = Target::parse)]
    pub url: Target,

    /// Connections (or long-poll sessions) to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// What to open.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,

    /// Long-poll only: keep one `GET /lp/{session}?cursor=0` pending per session (each on
    /// a connection of its own). The server's poll timeout must exceed `--hold`.
    #[arg(long)]
    pub pending_get: bool,

    /// How long to hold everything open (at most 10 min).
    #[arg(long, default_value = "5s", value_parser = parse_hold)]
    pub hold: Duration,

    /// Connections or sessions being opened (and closed) at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connect_concurrency: u32,

    /// Bound on one connection attempt or HTTP call.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// Spread the WebSocket connections (and the pending GETs' connections) over this many
    /// loopback source addresses, 127.0.0.1 … 127.0.0.N, round robin, each bound before it
    /// connects: each address has its own ephemeral ports (~28,000). 1: no bind.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_SOURCE_ADDRESSES as i64))]
    pub source_addresses: u32,
}

fn parse_hold(text: &str) -> Result<Duration, String> {
    let hold = parse_duration(text)?;
    if hold > Duration::from_secs(600) {
        return Err("at most 10m".to_owned());
    }
    Ok(hold)
}

/// What is being held.
enum Held {
    Ws(Vec<WsStream>),
    LongPoll {
        sessions: Vec<String>,
        pending: Vec<TcpStream>,
    },
}

pub async fn run(args: &IdleArgs) -> Result<(), Failure> {
    if args.pending_get && args.transport != Transport::Longpoll {
        return Err(Failure::Flags(
            "--pending-get applies to --transport longpoll only".to_owned(),
        ));
    }
    let descriptors = match args.transport {
        Transport::Ws => u64::from(args.connections),
        Transport::Longpoll if args.pending_get => u64::from(args.connections),
        Transport::Longpoll => u64::from(args.connect_concurrency),
    };
    limits::ensure_fds_for(descriptors, "connections").map_err(Failure::Flags)?;
    check_source_addresses(args.source_addresses, &[&args.url]).map_err(Failure::Flags)?;

    let n = args.connections as usize;
    let what = match (args.transport, args.pending_get) {
        (Transport::Ws, _) => "idle WebSocket connections",
        (Transport::Longpoll, false) => "long-poll sessions (no GET pending)",
        (Transport::Longpoll, true) => "long-poll sessions, one GET pending each",
    };
    eprintln!(
        "idle: opening {n} {what}, {} at a time…",
        args.connect_concurrency
    );
    let started = Instant::now();
    let held = match args.transport {
        Transport::Ws => open_ws(args).await.map(Held::Ws),
        Transport::Longpoll => open_long_polls(args).await,
    }
    .map_err(Failure::Setup)?;
    let opened_s = started.elapsed().as_secs_f64();
    // Let the server finish what the last openings started (spawned tasks, pending GETs
    // reaching their wait) before anyone measures.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "idle: holding {n} {what} (opened in {opened_s:.2} s) for {:?}",
        args.hold
    );
    let _ = std::io::stdout().flush();
    tokio::time::sleep(args.hold).await;

    let released = Instant::now();
    let concurrency = args.connect_concurrency as usize;
    match held {
        Held::Ws(streams) => {
            stream::iter(streams)
                .for_each_concurrent(concurrency, |mut ws| async move {
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                })
                .await;
        }
        Held::LongPoll { sessions, pending } => {
            drop(pending);
            let http = HttpRpc::new(args.url.clone(), args.call_timeout);
            let failed = stream::iter(sessions)
                .map(|id| {
                    let http = http.clone();
                    async move { http.close_long_poll(&id).await.is_err() }
                })
                .buffer_unordered(concurrency)
                .filter(|failed| std::future::ready(*failed))
                .count()
                .await;
            if failed > 0 {
                eprintln!(
                    "idle: {failed} sessions could not be closed (they expire by themselves)"
                );
            }
        }
    }
    println!(
        "idle: released {n} {what} in {:.2} s",
        released.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn open_ws(args: &IdleArgs) -> Result<Vec<WsStream>, String> {
    let url = args.url.ws(None);
    let call_timeout = args.call_timeout;
    let results: Vec<Result<WsStream, String>> = stream::iter(0..args.connections as usize)
        .map(|i| {
            let url = url.clone();
            let source = source_address(i, args.source_addresses);
            async move {
                timeout(
                    call_timeout,
                    connect_ws_from(&args.url, &url, source, Some(light_ws_config())),
                )
                .await
                .unwrap_or_else(|_| Err("connect timed out".to_owned()))
            }
        })
        .buffer_unordered(args.connect_concurrency as usize)
        .collect()
        .await;
    let mut streams = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(ws) => streams.push(ws),
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.first() {
        let count = failures.len();
        drop(streams);
        return Err(format!(
            "{count} of {} WebSocket connections failed; first: {first}",
            args.connections
        ));
    }
    Ok(streams)
}

async fn open_long_polls(args: &IdleArgs) -> Result<Held, String> {
    let concurrency = args.connect_concurrency as usize;
    // A client of its own, dropped (with its pooled connections) before the hold.
    let opener = HttpRpc::new(args.url.clone(), args.call_timeout);
    let results: Vec<Result<String, String>> = stream::iter(0..args.connections)
        .map(|_| {
            let opener = opener.clone();
            async move { opener.open_long_poll().await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    drop(opener);
    let mut sessions = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(id) => sessions.push(id),
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.first() {
        let count = failures.len();
        close_all(args, sessions).await;
        return Err(format!(
            "{count} of {} long-poll sessions failed to open; first: {first}",
            args.connections
        ));
    }
    let mut pending = Vec::new();
    if args.pending_get {
        let call_timeout = args.call_timeout;
        let results: Vec<Result<TcpStream, String>> = stream::iter(sessions.iter().enumerate())
            .map(|(i, id)| async move {
                let source = source_address(i, args.source_addresses);
                timeout(call_timeout, pending_long_poll(&args.url, id, source))
                    .await
                    .unwrap_or_else(|_| Err("GET /lp/… timed out".to_owned()))
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut failures = Vec::new();
        for result in results {
            match result {
                Ok(stream) => pending.push(stream),
                Err(e) => failures.push(e),
            }
        }
        if let Some(first) = failures.first() {
            let count = failures.len();
            drop(pending);
            close_all(args, sessions).await;
            return Err(format!(
                "{count} of {} pending GETs failed; first: {first}",
                args.connections
            ));
        }
    }
    Ok(Held::LongPoll { sessions, pending })
}

async fn close_all(args: &IdleArgs, sessions: Vec<String>) {
    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
    stream::iter(sessions)
        .for_each_concurrent(args.connect_concurrency as usize, |id| {
            let http = http.clone();
            async move {
                let _ = http.close_long_poll(&id).await;
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_is_bounded() {
        assert_eq!(parse_hold("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_hold("11m").is_err());
        assert!(parse_hold("0s").is_err());
    }
}
