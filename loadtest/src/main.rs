//! `loadgen`: load generator for ticket-api.
//!
//! Sub-commands:
//! - `reserve`: the end-to-end reservation benchmark (JSON-RPC over WebSocket, closed loop,
//!   one hot ticket type), with a consistency check of the server's count afterwards.
//! - `fanout`: N subscribers of one event, one reserver at a paced rate; the latency from
//!   a reservation's answer to each subscriber's `pool.update`, and how much was coalesced.
//! - `idle`: N idle WebSocket connections or long-poll sessions held for a while, to
//!   measure the server's memory per connection.
//! - `echo-server` / `echo`: a plain axum WebSocket echo, and the reserve loop driving it
//!   with the same frames: the transport's ceiling.
//! - `pgbench`: the database-bound way (one PostgreSQL transaction per reservation) run by
//!   pgbench on a schema of its own.
//! - `logins`: N concurrent `auth.login` and the server's memory around them.
//! - `summary`: the side-by-side table and ratios of a `bench.sh` run.
//! - `takeover`: with reservations streaming on an event, SIGKILL its owner (cluster
//!   mode) and time the first success through another server.
//! - `cluster-summary`: the figures of a `cluster.sh` run against the cluster goals.
//! - `fanout-subscribers` (hidden): a helper process of `fanout`, holding a share of its
//!   subscribers.
//!
//! Every target must be a loopback address, and every load loop is bounded in count and
//! in time.
//!
//! Exit codes: 0 success, 1 a failed setup or a consistency mismatch, 2 bad flags
//! (including a non-loopback `--url`, or more connections than the open-file limit allows).

mod client;
mod cluster_summary;
mod echo;
mod fanout;
mod fanout_processes;
mod idle;
mod limits;
mod logins;
mod metrics;
mod pgbench;
mod procfs;
mod report;
mod reserve;
mod schedule;
mod summary;
mod takeover;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator for ticket-api (loopback targets only).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// End-to-end reservation benchmark: N WebSocket connections reserving one hot ticket
    /// type in a closed loop, then a consistency check.
    Reserve(reserve::ReserveArgs),
    /// Fan-out latency: N WebSocket subscribers of one event, M paced reservations; the
    /// time from each reservation's answer to each subscriber's `pool.update`.
    Fanout(fanout::FanoutArgs),
    /// Opens N idle WebSocket connections or long-poll sessions, holds them, closes them.
    Idle(idle::IdleArgs),
    /// A plain axum WebSocket echo server (the baseline for `echo`).
    EchoServer(echo::EchoServerArgs),
    /// The reserve loop against an echo server, with the same frames.
    Echo(echo::EchoArgs),
    /// The database-bound way: pgbench, one transaction per reservation.
    Pgbench(pgbench::PgbenchArgs),
    /// N concurrent logins and the server's memory before, at the peak and after.
    Logins(logins::LoginsArgs),
    /// The table and ratios of a `bench.sh` run, from its JSON lines.
    Summary(summary::SummaryArgs),
    /// Cluster mode: SIGKILL an event's owner while reservations stream through the other
    /// servers; the time until the first success after the kill.
    Takeover(takeover::TakeoverArgs),
    /// The figures of a `cluster.sh` run against the cluster goals, from its JSON lines.
    ClusterSummary(cluster_summary::ClusterSummaryArgs),
    /// A helper process of `fanout` holding some of its subscribers (started by `fanout`).
    #[command(hide = true)]
    FanoutSubscribers(fanout_processes::HelperArgs),
}

/// Why a run produced no report: bad flags (exit 2) or a failed setup (exit 1).
#[derive(Debug)]
pub enum Failure {
    Flags(String),
    Setup(String),
}

impl Failure {
    fn exit(&self, command: &str) -> ExitCode {
        match self {
            Self::Flags(e) => {
                eprintln!("loadgen {command}: {e}");
                ExitCode::from(2)
            }
            Self::Setup(e) => {
                eprintln!("loadgen {command}: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Reserve(args) => match reserve::run(&args).await {
            Ok(report) => {
                report.print_human();
                if args.json {
                    println!("{}", report.to_json());
                }
                match &report.consistency {
                    Some(c) if c.is_ok() => ExitCode::SUCCESS,
                    _ => ExitCode::FAILURE,
                }
            }
            Err(e) => {
                eprintln!("loadgen reserve: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Fanout(args) => match fanout::run(&args).await {
            Ok(report) => {
                report.print_human();
                if args.json {
                    println!("{}", report.to_json());
                }
                ExitCode::SUCCESS
            }
            Err(e) => e.exit("fanout"),
        },
        Command::Idle(args) => match idle::run(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.exit("idle"),
        },
        Command::EchoServer(args) => match echo::serve(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => Failure::Setup(e).exit("echo-server"),
        },
        Command::Echo(args) => match echo::run(&args).await {
            Ok(report) => {
                report.print_human();
                if args.json {
                    println!("{}", report.to_json());
                }
                if report.ok > 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => Failure::Setup(e).exit("echo"),
        },
        Command::Pgbench(args) => {
            match tokio::task::spawn_blocking(move || {
                pgbench::run(&args).map(|json| (json, args.json))
            })
            .await
            {
                Ok(Ok((json, print))) => {
                    if print {
                        println!("{json}");
                    }
                    if json.pointer("/consistency/ok") == Some(&serde_json::Value::Bool(true)) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Ok(Err(e)) => Failure::Setup(e).exit("pgbench"),
                Err(e) => Failure::Setup(e.to_string()).exit("pgbench"),
            }
        }
        Command::Logins(args) => match logins::run(&args).await {
            Ok(report) => {
                report.print_human();
                if args.json {
                    println!("{}", report.to_json());
                }
                if report.ok > 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => Failure::Setup(e).exit("logins"),
        },
        Command::Summary(args) => match summary::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => Failure::Setup(e).exit("summary"),
        },
        Command::Takeover(args) => match takeover::run(&args).await {
            Ok(report) => {
                report.print_human();
                if args.json {
                    println!("{}", report.to_json());
                }
                if report.is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => Failure::Setup(e).exit("takeover"),
        },
        Command::ClusterSummary(args) => match cluster_summary::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => Failure::Setup(e).exit("cluster-summary"),
        },
        Command::FanoutSubscribers(args) => match fanout_processes::serve(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.exit("fanout-subscribers"),
        },
    }
}
