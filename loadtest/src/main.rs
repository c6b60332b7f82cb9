//! `loadgen`: load generator for ticket-api.
//!
//! Sub-commands:
//! - `reserve`: the end-to-end reservation benchmark (JSON-RPC over WebSocket, closed loop,
//!   one hot ticket type), with a consistency check of the server's count afterwards.
//!
//! Every target must be a loopback address, and every load loop is bounded in count and
//! in time.
//!
//! Exit codes: 0 success, 1 a failed setup or a consistency mismatch, 2 bad flags
//! (including a non-loopback `--url`).

mod client;
mod metrics;
mod report;
mod reserve;

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
    }
}
