//! The `ticket-api` binary: parse the settings, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

/// An allocator made for many threads allocating small, short-lived buffers: a request's
/// JSON, its frames and its batch rows. See `loadtest/RESULTS.md` for what it bought.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ticket_api::config::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return settings_error(error),
    };
    init_tracing(cli.settings.log_format);
    raise_file_limit();
    let node = cli.settings.resolve_node_id().to_owned();
    // Every log line names this server (PROTOCOL §9): a span entered for good on every
    // thread that runs its tasks, beneath whatever spans the tasks enter themselves.
    let enter_node = move || {
        let span = tracing::info_span!("node", id = %node);
        std::mem::forget(span.entered());
    };
    enter_node();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(enter_node)
        .build()
        .expect("tokio runtime");
    let command = cli.command.unwrap_or(Command::Serve);
    match runtime.block_on(ticket_api::cli::run(command, cli.settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<ticket_api::cli::Refusal>() => {
            eprintln!("ticket-api: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("ticket-api: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with success; a bad setting is one line and exit code 2.
fn settings_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let rendered = error.render().to_string();
    let line = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid settings");
    eprintln!("ticket-api: {}", line.trim_start_matches("error: "));
    ExitCode::from(2)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    use std::io::IsTerminal;
    let colour = ticket_api::config::colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Each connection is a file descriptor: use all the system allows.
fn raise_file_limit() {
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "could not raise the open-file limit");
    }
}
