//! `loadgen summary`: the side-by-side view of one `bench.sh` run. Reads the JSON lines
//! the phases printed (`loadgen reserve`, `echo`, `pgbench`, `logins`), each labelled with
//! `phase`, and prints one table (throughput, latency, CPU per operation from `/proc`, the
//! writer's batch size, consistency), the ratios the benchmark is about, and one Markdown
//! row for `RESULTS.md`.
//!
//! The phase labels `bench.sh` uses, and what the ratios take from them:
//! `a-hot-64` (reserve, PostgreSQL, one hot ticket type, 64 connections) over `b-hot-64`
//! (pgbench, one hot row) and over `c-echo-64` (the echo); `a-spread-64` (1,000 ticket types)
//! over `b-spread-64` (pgbench over 1,000 rows); `sqlite-hot-64`; `logins`; `pending`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

/// Flags of `loadgen summary`.
#[derive(Debug, Clone, Args)]
pub struct SummaryArgs {
    /// A file of JSON lines, one per phase (other lines are ignored).
    #[arg(long, default_value = "/dev/null")]
    pub input: PathBuf,

    /// A label for the Markdown row (e.g. the date and `QUICK`).
    #[arg(long, default_value = "")]
    pub label: String,

    /// Print only the Markdown row.
    #[arg(long)]
    pub markdown_row: bool,

    /// Print only the header of the Markdown table (the input is not read).
    #[arg(long)]
    pub markdown_header: bool,
}

/// The processes whose CPU time is shown, in this order.
pub const CPU_COLUMNS: [&str; 5] = ["server", "postgres", "redis", "loadgen", "pgbench"];

/// One phase's figures, as far as its JSON line has them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Phase {
    pub phase: String,
    pub tool: String,
    pub mode: String,
    pub connections: u64,
    pub ticket_types: u64,
    pub ok: u64,
    pub rate: f64,
    pub offered_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// µs of CPU per operation, per process name.
    pub cpu_us: BTreeMap<String, f64>,
    pub batch: Option<f64>,
    /// `None`: not checked.
    pub consistent: Option<bool>,
    pub errors: u64,
    /// Bytes of server RSS per operation (the pending-reservation phase).
    pub rss_bytes_per_op: Option<f64>,
    /// Login rush: RSS before, peak, after (KiB).
    pub rush_kib: Option<(u64, u64, u64)>,
}

impl Phase {
    /// Reads one JSON line; `None` for anything that is not a phase.
    pub fn from_json(v: &Value) -> Option<Self> {
        let f = |p: &str| v.pointer(p).and_then(Value::as_f64);
        let u = |p: &str| v.pointer(p).and_then(Value::as_u64);
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let phase = s("/phase")?;
        let tool = s("/tool")?;
        let cpu_us = v
            .get("cpu")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, c)| Some((k.clone(), c.get("us_per_op")?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let errors = v
            .get("errors")
            .and_then(Value::as_object)
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        let rush_kib = if tool == "loadgen logins" {
            Some((
                u("/rss_kib/before")?,
                u("/rss_kib/peak")?,
                u("/rss_kib/after")?,
            ))
        } else {
            None
        };
        Some(Self {
            mode: s("/mode").unwrap_or_default(),
            connections: u("/connections").or(u("/count")).unwrap_or(0),
            ticket_types: u("/ticket_types").unwrap_or(1),
            ok: u("/ok").unwrap_or(0),
            rate: f("/reservations_per_s")
                .or(f("/logins_per_s"))
                .unwrap_or(0.0),
            offered_rate: f("/offered_rate"),
            p50_ms: f("/latency_ok_ms/p50_ms"),
            p99_ms: f("/latency_ok_ms/p99_ms"),
            cpu_us,
            batch: f("/writer_batches/average"),
            consistent: v.pointer("/consistency/ok").and_then(Value::as_bool),
            errors,
            rss_bytes_per_op: f("/rss_kib/bytes_per_op"),
            rush_kib,
            phase,
            tool,
        })
    }
}

/// Reads every phase from JSON lines; the last line of a phase wins.
pub fn parse_lines(text: &str) -> Vec<Phase> {
    let mut phases: Vec<Phase> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Some(p) = serde_json::from_str(line)
            .ok()
            .as_ref()
            .and_then(Phase::from_json)
        else {
            continue;
        };
        match phases.iter_mut().find(|q| q.phase == p.phase) {
            Some(q) => *q = p,
            None => phases.push(p),
        }
    }
    phases
}

/// `a / b` when both are measured and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

fn rate_of(phases: &[Phase], name: &str) -> Option<f64> {
    phases
        .iter()
        .find(|p| p.phase == name)
        .map(|p| p.rate)
        .filter(|r| *r > 0.0)
}

/// The three ratios the benchmark is about: a/b, a/c, spread a/b.
pub fn ratios(phases: &[Phase]) -> [(&'static str, Option<f64>, f64); 3] {
    [
        (
            "a/b  reserve ÷ database-bound (hot, 64)",
            ratio(rate_of(phases, "a-hot-64"), rate_of(phases, "b-hot-64")),
            40.0,
        ),
        (
            "a/c  reserve ÷ echo (64)",
            ratio(rate_of(phases, "a-hot-64"), rate_of(phases, "c-echo-64")),
            0.5,
        ),
        (
            "spread: reserve ÷ database-bound (1,000 types/rows, 64)",
            ratio(
                rate_of(phases, "a-spread-64"),
                rate_of(phases, "b-spread-64"),
            ),
            6.0,
        ),
    ]
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

/// The table for people.
pub fn render(phases: &[Phase]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>6} {:>6} {:>10} {:>8} {:>8}  {}  {:>6}  consistency",
        "phase",
        "conns",
        "types",
        "ops/s",
        "p50 ms",
        "p99 ms",
        CPU_COLUMNS
            .iter()
            .map(|c| format!("{:>9}", format!("{c} µs")))
            .collect::<Vec<_>>()
            .join(" "),
        "batch"
    );
    for p in phases.iter().filter(|p| p.rush_kib.is_none()) {
        let cpu = CPU_COLUMNS
            .iter()
            .map(|c| format!("{:>9}", opt(p.cpu_us.get(*c).copied(), 1)))
            .collect::<Vec<_>>()
            .join(" ");
        let consistency = match p.consistent {
            Some(true) => "ok",
            Some(false) => "MISMATCH",
            None => "—",
        };
        let mut name = p.phase.clone();
        if let Some(r) = p.offered_rate {
            name = format!("{name} @{r:.0}/s");
        }
        let _ = writeln!(
            out,
            "{:<22} {:>6} {:>6} {:>10.0} {:>8} {:>8}  {}  {:>6}  {}{}",
            name,
            p.connections,
            p.ticket_types,
            p.rate,
            opt(p.p50_ms, 2),
            opt(p.p99_ms, 2),
            cpu,
            opt(p.batch, 1),
            consistency,
            if p.errors > 0 {
                format!(" ({} errors)", p.errors)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(out);
    for (name, value, target) in ratios(phases) {
        let _ = writeln!(
            out,
            "{name}: {} (target ≥ {target})",
            opt(value, 2).replace('—', "not measured")
        );
    }
    for p in phases {
        if let Some((before, peak, after)) = p.rush_kib {
            let _ = writeln!(
                out,
                "{} concurrent logins: {:.0} logins/s; server RSS {:.1} MiB before, peak +{:.1} MiB, {:.1} MiB after settling (target: ≤ +64 MiB, falls back)",
                p.connections,
                p.rate,
                before as f64 / 1024.0,
                peak.saturating_sub(before) as f64 / 1024.0,
                after as f64 / 1024.0
            );
        }
        if let (Some(bytes), "pending") = (p.rss_bytes_per_op, p.phase.as_str()) {
            let _ = writeln!(
                out,
                "server RSS per pending reservation: {bytes:.0} bytes over {} pending (target ≤ 512)",
                p.ok
            );
        }
    }
    out
}

/// One row for the table in `RESULTS.md` ([`MARKDOWN_HEADER`]).
pub fn markdown_row(label: &str, phases: &[Phase]) -> String {
    let get = |name: &str| phases.iter().find(|p| p.phase == name);
    let rate = |name: &str| opt(get(name).map(|p| p.rate), 0);
    let lat = |name: &str| {
        get(name).map_or_else(
            || "—".to_owned(),
            |p| format!("{}/{}", opt(p.p50_ms, 1), opt(p.p99_ms, 1)),
        )
    };
    let cpu = |name: &str, who: &str| opt(get(name).and_then(|p| p.cpu_us.get(who).copied()), 0);
    let [ab, ac, spread] = ratios(phases).map(|(_, v, _)| opt(v, 2));
    let logins = phases
        .iter()
        .find_map(|p| p.rush_kib.map(|r| (p, r)))
        .map_or_else(
            || "—".to_owned(),
            |(p, (before, peak, after))| {
                format!(
                    "{:.0}/s, +{:.0}/+{:.0} MiB",
                    p.rate,
                    peak.saturating_sub(before) as f64 / 1024.0,
                    after.saturating_sub(before) as f64 / 1024.0
                )
            },
        );
    let open = get("a-open-64").map_or_else(
        || "—".to_owned(),
        |p| {
            format!(
                "{}/s: {}/{}",
                opt(p.offered_rate, 0),
                opt(p.p50_ms, 1),
                opt(p.p99_ms, 1)
            )
        },
    );
    let consistent = if phases.iter().any(|p| p.consistent == Some(false)) {
        "MISMATCH"
    } else if phases.iter().any(|p| p.consistent == Some(true)) {
        "ok"
    } else {
        "—"
    };
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} vs {} | {} | {} / {} | {} | {} | {} | {} | {} |",
        rate("a-hot-64"),
        lat("a-hot-64"),
        lat("a-hot-256"),
        lat("a-hot-1024"),
        open,
        rate("b-hot-64"),
        rate("c-echo-64"),
        ab,
        ac,
        rate("a-spread-64"),
        rate("b-spread-64"),
        spread,
        cpu("a-hot-64", "server"),
        cpu("a-hot-64", "postgres"),
        rate("sqlite-hot-64"),
        logins,
        opt(get("pending").and_then(|p| p.rss_bytes_per_op), 0),
        get("pending").map_or_else(|| "—".to_owned(), |p| p.ok.to_string()),
        consistent
    )
}

/// The header of the table [`markdown_row`] fills.
pub const MARKDOWN_HEADER: &str = "| run | (a) res/s, PG, hot, 64 | p50/p99 ms 64 | 256 | 1,024 | open model 64: rate: p50/p99 ms | (b) pgbench tps | (c) echo msg/s | a/b | a/c | spread 1,000: a vs b | spread a/b | CPU µs/res server / PG | SQLite res/s 64 | login rush: logins/s, RSS +peak/+after | B/pending | pending | oversold |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

/// Prints the summary of a run.
pub fn run(args: &SummaryArgs) -> Result<(), String> {
    if args.markdown_header {
        println!("{MARKDOWN_HEADER}");
        return Ok(());
    }
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let phases = parse_lines(&text);
    if args.markdown_row {
        println!("{}", markdown_row(&args.label, &phases));
    } else {
        print!("{}", render(&phases));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reserve(phase: &str, rate: f64) -> String {
        json!({
            "tool": "loadgen reserve", "phase": phase, "mode": "closed", "connections": 64,
            "ticket_types": 1, "ok": 1000, "reservations_per_s": rate,
            "latency_ok_ms": {"p50_ms": 5.8, "p99_ms": 9.7},
            "cpu": {"server": {"seconds": 0.05, "us_per_op": 50.0}, "postgres": {"seconds": 0.047, "us_per_op": 47.0}},
            "writer_batches": {"average": 32.0},
            "errors": {}, "consistency": {"ok": true},
        })
        .to_string()
    }

    #[test]
    fn ratio_needs_both_figures_and_a_non_zero_divisor() {
        assert_eq!(ratio(Some(10.0), Some(4.0)), Some(2.5));
        assert_eq!(ratio(Some(10.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(4.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(4.0)), None);
    }

    #[test]
    fn ratios_are_taken_from_the_named_phases() {
        let text = [
            reserve("a-hot-64", 11_500.0),
            reserve("b-hot-64", 1_000.0),
            reserve("c-echo-64", 92_000.0),
            "not json".to_owned(),
            reserve("a-spread-64", 12_000.0),
        ]
        .join("\n");
        let phases = parse_lines(&text);
        assert_eq!(phases.len(), 4);
        let [ab, ac, spread] = ratios(&phases);
        assert_eq!(ab.1, Some(11.5));
        assert_eq!(ac.1, Some(0.125));
        assert_eq!(spread.1, None, "b-spread-64 is missing");
        let table = render(&phases);
        assert!(
            table.contains("a/b  reserve ÷ database-bound (hot, 64): 11.50 (target ≥ 40)"),
            "{table}"
        );
        assert!(table.contains("not measured"), "{table}");
    }

    #[test]
    fn a_later_line_of_a_phase_replaces_an_earlier_one() {
        let text = [reserve("a-hot-64", 1.0), reserve("a-hot-64", 2.0)].join("\n");
        let phases = parse_lines(&text);
        assert_eq!(phases.len(), 1);
        assert_eq!(phases[0].rate, 2.0);
    }

    #[test]
    fn phases_carry_cpu_batch_and_consistency() {
        let phases = parse_lines(&reserve("a-hot-64", 11_500.0));
        let p = &phases[0];
        assert_eq!(p.cpu_us.get("server"), Some(&50.0));
        assert_eq!(p.batch, Some(32.0));
        assert_eq!(p.consistent, Some(true));
        assert_eq!(p.p99_ms, Some(9.7));
    }

    #[test]
    fn the_markdown_row_has_a_cell_per_header_column() {
        let login = json!({"tool": "loadgen logins", "phase": "logins", "count": 1000, "ok": 1000,
            "logins_per_s": 80.0, "rss_kib": {"before": 12_288, "peak": 90_112, "after": 20_480}, "errors": {}})
        .to_string();
        let phases = parse_lines(&[reserve("a-hot-64", 11_500.0), login].join("\n"));
        let row = markdown_row("2026-12-03 QUICK", &phases);
        let columns = MARKDOWN_HEADER.lines().next().unwrap().matches('|').count();
        assert_eq!(row.matches('|').count(), columns, "{row}");
        assert!(row.contains("| 11500 | 5.8/9.7 |"), "{row}");
        assert!(row.contains("80/s, +76/+8 MiB"), "{row}");
        assert!(row.ends_with("| — | ok |"), "{row}");
        let unchecked = markdown_row(
            "x",
            &parse_lines(&reserve("c-echo-64", 1.0).replace("true", "null")),
        );
        assert!(unchecked.ends_with("| — | — |"), "{unchecked}");
    }
}
