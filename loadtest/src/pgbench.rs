//! `loadgen pgbench`: the database-bound way to sell tickets, for comparison with the
//! server. One PostgreSQL transaction per reservation, run by `pgbench` at a given client
//! count:
//!
//! ```sql
//! BEGIN;
//! UPDATE ticket_types SET available = available - 1 WHERE id = :tt AND available >= 1;
//! INSERT INTO reservations (id, ticket_type_id, customer_id, quantity, status, expires_at)
//!     VALUES (gen_random_uuid(), :tt, :client_id, 1, 'pending', now() + interval '15 minutes');
//! COMMIT;
//! ```
//!
//! on minimal tables of its own in the `loadgen_pgbench` schema (`ticket_types`,
//! `reservations` with a foreign key), created afresh in the given database (which the caller creates and drops): `:tt` is 1
//! (one hot row) or uniform over `--rows` rows. Prepared statements (`-M prepared`), as a
//! server would use. Reported: transactions/s (pgbench's `tps`, without connection time),
//! latency percentiles from pgbench's per-transaction log, the CPU time of the probes
//! (`--cpu`, e.g. the postmaster's tree) and of pgbench itself, and a check afterwards that
//! no row was oversold: for every ticket type, `capacity − available` equals its number of
//! reservations and `available ≥ 0`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::procfs::{self, CpuProbe, Stat};
use crate::report::{new_histogram, Latency};
use crate::reserve::{parse_duration, run_id};

/// Flags of `loadgen pgbench`.
#[derive(Debug, Clone, Args)]
pub struct PgbenchArgs {
    /// The pgbench binary.
    #[arg(long, default_value = "pgbench")]
    pub pgbench: PathBuf,

    /// The psql binary (schema and the check afterwards).
    #[arg(long, default_value = "psql")]
    pub psql: PathBuf,

    /// PostgreSQL host; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 5432)]
    pub port: u16,

    #[arg(long, default_value = "postgres")]
    pub user: String,

    /// A database of the caller's (the tables are dropped and created in it).
    #[arg(long)]
    pub dbname: String,

    /// pgbench clients (connections), one transaction in flight each.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clients: u32,

    /// pgbench threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,

    /// Length of the run, in whole seconds (rounded up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Ticket type rows: 1 is one hot row; more spreads the reservations uniformly.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rows: u32,

    /// CPU time to report, as for `loadgen reserve --cpu` (e.g. `postgres=tree:PID`).
    #[arg(long, value_parser = CpuProbe::parse)]
    pub cpu: Vec<CpuProbe>,

    /// A label for this run in the JSON line.
    #[arg(long, default_value = "pgbench")]
    pub phase: String,

    /// Also print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
}

/// Capacity of every row: more than any bounded run can sell.
const CAPACITY: i64 = 1_000_000_000;

/// The transaction pgbench runs, per reservation.
pub fn script(rows: u32) -> String {
    let pick = if rows == 1 {
        "\\set tt 1".to_owned()
    } else {
        format!("\\set tt random(1, {rows})")
    };
    format!(
        "{pick}\n\
         BEGIN;\n\
         UPDATE ticket_types SET available = available - 1 WHERE id = :tt AND available >= 1;\n\
         INSERT INTO reservations (id, ticket_type_id, customer_id, quantity, status, expires_at) \
         VALUES (gen_random_uuid(), :tt, :client_id, 1, 'pending', now() + interval '15 minutes');\n\
         COMMIT;\n"
    )
}

/// The PostgreSQL schema the tables live in, so that whatever database `--dbname` names, only
/// tables of our own are dropped and created. psql and pgbench get it as their search path.
const SCHEMA: &str = "loadgen_pgbench";
const SEARCH_PATH: &str = "-c search_path=loadgen_pgbench";

/// The schema, created afresh (one `psql -c`: one transaction, hence `ANALYZE` without
/// `VACUUM`).
pub fn schema(rows: u32) -> String {
    format!(
        "SET client_min_messages TO warning;\n\
         CREATE SCHEMA IF NOT EXISTS {SCHEMA};\n\
         DROP TABLE IF EXISTS {SCHEMA}.reservations, {SCHEMA}.ticket_types;\n\
         CREATE TABLE ticket_types (id integer PRIMARY KEY, capacity bigint NOT NULL, \
         available bigint NOT NULL CHECK (available >= 0));\n\
         CREATE TABLE reservations (id uuid PRIMARY KEY, \
         ticket_type_id integer NOT NULL REFERENCES ticket_types (id), customer_id integer NOT NULL, \
         quantity integer NOT NULL, status text NOT NULL, expires_at timestamptz NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now());\n\
         INSERT INTO ticket_types SELECT g, {CAPACITY}, {CAPACITY} FROM generate_series(1, {rows}) g;\n\
         ANALYZE ticket_types;\n"
    )
}

/// Rows that break the invariant, and the reservations in all.
const CHECK: &str = "SELECT count(*) FILTER (WHERE t.available < 0 \
     OR t.capacity - t.available <> coalesce(r.n, 0)), coalesce(sum(r.n), 0) \
     FROM ticket_types t LEFT JOIN (SELECT ticket_type_id, count(*) AS n FROM reservations \
     GROUP BY ticket_type_id) r ON r.ticket_type_id = t.id";

/// What pgbench's summary says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub processed: u64,
    pub failed: u64,
    pub tps: f64,
}

impl Summary {
    /// Reads `number of transactions actually processed`, `number of failed transactions`
    /// (pgbench 15+) and `tps = … (without initial connection time)`.
    pub fn parse(stdout: &str) -> Option<Self> {
        let mut processed = None;
        let mut failed = 0;
        let mut tps = None;
        for line in stdout.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
                processed = rest.split('/').next()?.trim().parse().ok();
            } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
                failed = rest.split_whitespace().next()?.parse().ok()?;
            } else if let Some(rest) = line.strip_prefix("tps = ") {
                // pgbench 14+ prints one line; older ones two, the second without the
                // connections' time, which is the one wanted.
                let preferred = rest.contains("without initial connection time")
                    || rest.contains("excluding connections");
                if preferred || tps.is_none() {
                    tps = rest.split_whitespace().next()?.parse().ok();
                }
            }
        }
        Some(Self {
            processed: processed?,
            failed,
            tps: tps?,
        })
    }
}

/// The latency (µs) of one line of pgbench's per-transaction log:
/// `client_id transaction_no time script_no time_epoch time_us [schedule_lag]`.
pub fn log_latency_us(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    let _client = fields.next()?;
    let _transaction = fields.next()?;
    fields.next()?.parse().ok()
}

fn psql(args: &PgbenchArgs, sql: &str) -> Result<String, String> {
    let output = Command::new(&args.psql)
        .env("PGOPTIONS", SEARCH_PATH)
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            &args.host,
            "-p",
            &args.port.to_string(),
            "-U",
            &args.user,
        ])
        .args(["-d", &args.dbname, "-c", sql])
        .output()
        .map_err(|e| format!("{}: {e}", args.psql.display()))?;
    if !output.status.success() {
        return Err(format!(
            "psql: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Ticks of this process's reaped children (pgbench, once it has been waited for).
fn reaped_children_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| Stat::parse(&s))
        .map_or(0, |s| s.children_ticks)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Runs pgbench once; the JSON line has the keys `loadgen reserve` uses.
pub fn run(args: &PgbenchArgs) -> Result<Value, String> {
    if !is_loopback(&args.host) {
        return Err(format!("host {} is not a loopback address", args.host));
    }
    let dir = std::env::temp_dir().join(format!("loadgen-pgbench-{}", run_id()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(args: &PgbenchArgs, dir: &Path) -> Result<Value, String> {
    eprintln!(
        "pgbench: schema with {} ticket type row(s) in {}",
        args.rows, args.dbname
    );
    psql(args, &schema(args.rows))?;
    let script_path = dir.join("reserve.sql");
    std::fs::write(&script_path, script(args.rows)).map_err(|e| format!("script: {e}"))?;
    let seconds = args.duration.as_secs_f64().ceil().max(1.0) as u64;

    eprintln!(
        "pgbench: {} clients, {} threads, {seconds} s…",
        args.clients, args.threads
    );
    let cpu_before = procfs::sample(&args.cpu);
    let children_before = reaped_children_ticks();
    let started = Instant::now();
    let output = Command::new(&args.pgbench)
        .env("PGOPTIONS", SEARCH_PATH)
        .args(["-n", "-M", "prepared", "--log"])
        .arg(format!("--log-prefix={}", dir.join("tx").display()))
        .args([
            "-c",
            &args.clients.to_string(),
            "-j",
            &args.threads.to_string(),
        ])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(&script_path)
        .args([
            "-h",
            &args.host,
            "-p",
            &args.port.to_string(),
            "-U",
            &args.user,
        ])
        .arg(&args.dbname)
        .output()
        .map_err(|e| format!("{}: {e}", args.pgbench.display()))?;
    let elapsed = started.elapsed();
    let mut cpu_seconds = procfs::cpu_seconds(&cpu_before, &procfs::sample(&args.cpu));
    cpu_seconds.insert(
        "pgbench".to_owned(),
        reaped_children_ticks().saturating_sub(children_before) as f64
            / procfs::TICKS_PER_SECOND as f64,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let summary = Summary::parse(&stdout)
        .ok_or_else(|| format!("pgbench: no summary in its output:\n{stdout}"))?;

    let mut histogram = new_histogram();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("tx"))
        {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for us in text.lines().filter_map(log_latency_us) {
            histogram.saturating_record(us.max(1));
        }
    }
    let latency = Latency::from_histogram(&histogram);

    let check = psql(args, CHECK)?;
    let (mismatched, reservations) = check
        .split_once('|')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("unexpected check answer {check:?}"))?;
    let consistent = mismatched == 0;

    let per_op = |s: f64| procfs::micros_per_op(s, summary.processed);
    let cpu: serde_json::Map<String, Value> = cpu_seconds
        .iter()
        .map(|(name, &s)| (name.clone(), json!({"seconds": s, "us_per_op": per_op(s)})))
        .collect();

    println!(
        "pgbench [{}]: {} clients, {} row(s): {} transactions ({} failed) in {:.1} s = {:.0} tps",
        args.phase,
        args.clients,
        args.rows,
        summary.processed,
        summary.failed,
        elapsed.as_secs_f64(),
        summary.tps
    );
    println!(
        "  latency: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        latency.p50_ms, latency.p90_ms, latency.p99_ms, latency.max_ms
    );
    for (name, s) in &cpu_seconds {
        println!(
            "  cpu {name}: {s:.2} s, {:.1} µs per transaction",
            per_op(*s).unwrap_or(0.0)
        );
    }
    println!(
        "consistency: {} ({reservations} reservations, {mismatched} row(s) where capacity − available ≠ reservations or available < 0)",
        if consistent { "ok" } else { "MISMATCH" }
    );
    let errors: BTreeMap<&str, u64> = if summary.failed > 0 {
        BTreeMap::from([("failed", summary.failed)])
    } else {
        BTreeMap::new()
    };
    Ok(json!({
        "tool": "pgbench",
        "phase": args.phase,
        "mode": "closed",
        "connections": args.clients,
        "ticket_types": args.rows,
        "ok": summary.processed,
        "errors": errors,
        "elapsed_s": elapsed.as_secs_f64(),
        "reservations_per_s": summary.tps,
        "latency_ok_ms": {
            "count": latency.count,
            "p50_ms": latency.p50_ms,
            "p90_ms": latency.p90_ms,
            "p99_ms": latency.p99_ms,
            "max_ms": latency.max_ms,
        },
        "cpu": cpu,
        "consistency": {
            "ok": consistent,
            "mismatched_types": mismatched,
            "reservations": reservations,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH_15: &str = "pgbench (15.20 (Debian 15.20-0+deb12u1))\n\
        transaction type: /tmp/x/reserve.sql\n\
        scaling factor: 1\n\
        query mode: prepared\n\
        number of clients: 64\n\
        number of threads: 2\n\
        maximum number of tries: 1\n\
        duration: 10 s\n\
        number of transactions actually processed: 10131\n\
        number of failed transactions: 3 (0.030%)\n\
        latency average = 63.155 ms\n\
        initial connection time = 120.441 ms\n\
        tps = 1013.387468 (without initial connection time)\n";

    #[test]
    fn the_summary_of_pgbench_15_is_read() {
        assert_eq!(
            Summary::parse(PGBENCH_15),
            Some(Summary {
                processed: 10131,
                failed: 3,
                tps: 1013.387468
            })
        );
    }

    #[test]
    fn older_summaries_with_two_tps_lines_take_the_one_without_connections() {
        let text = "number of transactions actually processed: 500/500\n\
                    tps = 49.9 (including connections establishing)\n\
                    tps = 50.2 (excluding connections establishing)\n";
        let s = Summary::parse(text).unwrap();
        assert_eq!(s.processed, 500);
        assert_eq!(s.failed, 0);
        assert_eq!(s.tps, 50.2);
        let s = Summary::parse(
            "number of transactions actually processed: 7\ntps = 3.5 (without initial connection time)\n",
        )
        .unwrap();
        assert_eq!(s.tps, 3.5);
        assert_eq!(Summary::parse("garbage"), None);
    }

    #[test]
    fn log_lines_give_the_latency_in_microseconds() {
        assert_eq!(
            log_latency_us("12 345 6789 0 1733240000 123456"),
            Some(6789)
        );
        assert_eq!(log_latency_us("12 345"), None);
    }

    #[test]
    fn the_script_is_one_transaction_per_reservation_on_one_or_many_rows() {
        let hot = script(1);
        assert!(hot.starts_with("\\set tt 1\n"));
        assert!(hot.contains(
            "UPDATE ticket_types SET available = available - 1 WHERE id = :tt AND available >= 1;"
        ));
        assert!(hot.contains("BEGIN;") && hot.contains("COMMIT;"));
        assert!(script(1000).starts_with("\\set tt random(1, 1000)\n"));
        assert!(schema(1000).contains("generate_series(1, 1000)"));
    }

    #[test]
    fn only_loopback_hosts_are_targets() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("::1"));
        assert!(!is_loopback("10.0.0.5"));
        assert!(!is_loopback("db.example.com"));
    }
}
