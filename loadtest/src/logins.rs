//! `loadgen logins`: a login rush. N `auth.login` calls over `POST /rpc`, all started at
//! once (one account: the cost is the password check, the same for every account), and the
//! server's resident memory before, at its peak, and `--settle` after the last answer.
//!
//! The server's auth rate limit must be raised (`--auth-rate-limit`, `--auth-rate-burst`),
//! or most calls are answered `RATE_LIMITED`, which the report counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::client::{CallError, HttpRpc, Target};
use crate::procfs::Rss;
use crate::reserve::parse_duration;

/// Flags of `loadgen logins`.
#[derive(Debug, Clone, Args)]
pub struct LoginsArgs {
    /// Server base URL; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:4000", value_parser = Target::parse)]
    pub url: Target,

    /// An existing account's email.
    #[arg(long)]
    pub email: String,

    /// Its password.
    #[arg(long)]
    pub password: String,

    /// Logins started at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub count: u32,

    /// The server's process id, for its memory (`/proc/<pid>/status`).
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// How long after the last answer the memory is read again.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Bound on one login.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub call_timeout: Duration,

    /// A label for this run in the JSON line.
    #[arg(long, default_value = "logins")]
    pub phase: String,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// The server's RSS over a login rush, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RushMemory {
    pub before_kib: u64,
    /// The highest of the samples taken during the rush and the process's `VmHWM`.
    pub peak_kib: u64,
    /// `--settle` after the last answer.
    pub after_kib: u64,
}

/// What `loadgen logins` measured.
#[derive(Debug, Clone)]
pub struct LoginsReport {
    pub phase: String,
    pub count: u32,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub memory: Option<RushMemory>,
}

impl LoginsReport {
    pub fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.ok as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    pub fn print_human(&self) {
        println!(
            "logins [{}]: {} concurrent auth.login, {} ok in {:.2} s = {:.0} logins/s",
            self.phase,
            self.count,
            self.ok,
            self.elapsed_s,
            self.rate()
        );
        for (reason, n) in &self.errors {
            println!("    {reason}: {n}");
        }
        if let Some(m) = self.memory {
            println!(
                "  server RSS: {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB), {:.1} MiB after settling",
                m.before_kib as f64 / 1024.0,
                m.peak_kib as f64 / 1024.0,
                m.peak_kib.saturating_sub(m.before_kib) as f64 / 1024.0,
                m.after_kib as f64 / 1024.0
            );
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tool": "loadgen logins",
            "phase": self.phase,
            "count": self.count,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": self.elapsed_s,
            "logins_per_s": self.rate(),
            "rss_kib": self.memory.map(|m| json!({
                "before": m.before_kib,
                "peak": m.peak_kib,
                "after": m.after_kib,
            })),
        })
    }
}

/// Runs the rush; `Err` only when nothing could be measured.
pub async fn run(args: &LoginsArgs) -> Result<LoginsReport, String> {
    crate::limits::ensure_fds_for(u64::from(args.count), "concurrent logins")?;
    let http = HttpRpc::new(args.url.clone(), args.call_timeout);
    let before = args.server_pid.and_then(Rss::read);
    if args.server_pid.is_some() && before.is_none() {
        return Err("cannot read the server's /proc/<pid>/status".to_owned());
    }

    // Samples the RSS while the rush runs: the peak may fall between two answers.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before.map_or(0, |b| b.current_kib)));
    let sampler = args.server_pid.map(|pid| {
        let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
        let bound = Instant::now() + args.call_timeout;
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) && Instant::now() < bound {
                if let Some(r) = Rss::read(pid) {
                    peak.fetch_max(r.current_kib, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });

    eprintln!("logins: {} concurrent auth.login…", args.count);
    let started = Instant::now();
    let params = json!({"email": args.email, "password": args.password});
    let outcomes =
        join_all((0..args.count).map(|_| http.call("auth.login", params.clone(), None))).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }

    let mut ok = 0;
    let mut errors = BTreeMap::new();
    for outcome in outcomes {
        match outcome {
            Ok(_) => ok += 1,
            Err(CallError::Rpc(e)) => *errors.entry(e.reason()).or_default() += 1,
            Err(CallError::Transport(e)) => {
                *errors.entry(format!("transport: {e}")).or_default() += 1
            }
        }
    }

    let memory = match (args.server_pid, before) {
        (Some(pid), Some(before)) => {
            // The high-water mark covers the whole process life: it speaks of the rush only
            // if it rose during it.
            let hwm = Rss::read(pid)
                .map_or(0, |r| r.peak_kib)
                .max(before.peak_kib);
            let rush_hwm = if hwm > before.peak_kib { hwm } else { 0 };
            tokio::time::sleep(args.settle).await;
            Rss::read(pid).map(|after| RushMemory {
                before_kib: before.current_kib,
                peak_kib: peak.load(Ordering::SeqCst).max(rush_hwm),
                after_kib: after.current_kib,
            })
        }
        _ => None,
    };
    Ok(LoginsReport {
        phase: args.phase.clone(),
        count: args.count,
        ok,
        errors,
        elapsed_s: elapsed.as_secs_f64(),
        memory,
    })
}
