//! `loadgen cluster-summary`: the figures of one `cluster.sh` run against the goals of the
//! cluster benchmark, from the JSON lines its phases printed:
//!
//! - forwarding: `loadgen reserve` lines labelled `forward-direct` (straight to the event's
//!   owner) and `forward-forwarded` (through another server), and the same with
//!   `-keys` (an idempotency key on every call); the ratio forwarded ÷ direct, goal ≥ 0.5;
//! - fan-out: the `loadgen fanout` line; commit answer → the *last* subscriber holding the
//!   version, p99 goal ≤ 200 ms;
//! - takeover: every `loadgen takeover` line; kill → first success, goal ≤ 10 s each;
//!   min, p50 (nearest rank) and max, and every value;
//! - `{"note": "…"}` lines are shown as they are.
//!
//! `--markdown --label L` prints the same as a Markdown section for a results file.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

/// Forwarded reserves/s over reserves/s straight to the owner, at least.
pub const FORWARD_RATIO_GOAL: f64 = 0.5;
/// Commit answer → the last subscriber has the update, p99, at most (ms).
pub const FANOUT_P99_GOAL_MS: f64 = 200.0;
/// SIGKILL of the owner → first successful reserve, each time, at most (s).
pub const TAKEOVER_GOAL_S: f64 = 10.0;

/// Flags of `loadgen cluster-summary`.
#[derive(Debug, Clone, Args)]
pub struct ClusterSummaryArgs {
    /// A file of JSON lines (other lines are ignored).
    #[arg(long)]
    pub input: PathBuf,

    /// Print a Markdown section (for a results file) instead of the plain text.
    #[arg(long)]
    pub markdown: bool,

    /// The section's title (e.g. the date, QUICK, the commit).
    #[arg(long, default_value = "")]
    pub label: String,
}

/// One `loadgen reserve` window.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservePhase {
    pub phase: String,
    pub url: String,
    pub connections: u64,
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: u64,
    pub transport_failures: u64,
    pub consistent: Option<bool>,
}

/// The `loadgen fanout` run.
#[derive(Debug, Clone, PartialEq)]
pub struct Fanout {
    pub subscribers: u64,
    pub servers: usize,
    pub processes: u64,
    pub source_addresses: u64,
    pub ok: u64,
    pub achieved_rate: f64,
    /// Commit answer → the last subscriber has it (per version).
    pub last_p50_ms: f64,
    pub last_p99_ms: f64,
    pub last_max_ms: f64,
    pub last_count: u64,
    /// Commit answer → each subscriber (per subscriber × version).
    pub each_p50_ms: f64,
    pub each_p99_ms: f64,
    pub coalesced_fraction: f64,
    pub missing: u64,
    pub lost: u64,
}

/// Everything one run printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    pub reserve: Vec<ReservePhase>,
    pub fanout: Option<Fanout>,
    /// Kill → first success in seconds, `None` for a kill with no success within the bound.
    pub takeovers: Vec<Option<f64>>,
    /// Takeover runs whose consistency check failed (or did not run).
    pub takeover_inconsistent: usize,
    pub notes: Vec<String>,
}

fn f(v: &Value, p: &str) -> Option<f64> {
    v.pointer(p).and_then(Value::as_f64)
}

fn u(v: &Value, p: &str) -> Option<u64> {
    v.pointer(p).and_then(Value::as_u64)
}

/// Reads a run from JSON lines; a later line of a reserve phase replaces an earlier one.
pub fn parse_lines(text: &str) -> Run {
    let mut run = Run::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        if let Some(note) = v.get("note").and_then(Value::as_str) {
            run.notes.push(note.to_owned());
            continue;
        }
        match v.get("tool").and_then(Value::as_str) {
            Some("loadgen reserve") => {
                let Some(phase) = v.get("phase").and_then(Value::as_str) else {
                    continue;
                };
                let p = ReservePhase {
                    phase: phase.to_owned(),
                    url: v["url"].as_str().unwrap_or_default().to_owned(),
                    connections: u(&v, "/connections").unwrap_or(0),
                    rate: f(&v, "/reservations_per_s").unwrap_or(0.0),
                    p50_ms: f(&v, "/latency_ok_ms/p50_ms"),
                    p99_ms: f(&v, "/latency_ok_ms/p99_ms"),
                    errors: u(&v, "/error_total").unwrap_or(0),
                    transport_failures: u(&v, "/transport_failures").unwrap_or(0),
                    consistent: v.pointer("/consistency/ok").and_then(Value::as_bool),
                };
                run.reserve.retain(|q| q.phase != p.phase);
                run.reserve.push(p);
            }
            Some("loadgen fanout") => {
                run.fanout = Some(Fanout {
                    subscribers: u(&v, "/subscribers").unwrap_or(0),
                    servers: v
                        .get("subscriber_urls")
                        .and_then(Value::as_array)
                        .map_or(1, Vec::len),
                    processes: u(&v, "/processes").unwrap_or(1),
                    source_addresses: u(&v, "/source_addresses").unwrap_or(1),
                    ok: u(&v, "/ok").unwrap_or(0),
                    achieved_rate: f(&v, "/achieved_rate_per_s").unwrap_or(0.0),
                    last_p50_ms: f(&v, "/latency_all_ms/p50_ms").unwrap_or(0.0),
                    last_p99_ms: f(&v, "/latency_all_ms/p99_ms").unwrap_or(0.0),
                    last_max_ms: f(&v, "/latency_all_ms/max_ms").unwrap_or(0.0),
                    last_count: u(&v, "/latency_all_ms/count").unwrap_or(0),
                    each_p50_ms: f(&v, "/latency_ms/p50_ms").unwrap_or(0.0),
                    each_p99_ms: f(&v, "/latency_ms/p99_ms").unwrap_or(0.0),
                    coalesced_fraction: f(&v, "/coalesced_fraction").unwrap_or(0.0),
                    missing: u(&v, "/missing").unwrap_or(0),
                    lost: u(&v, "/lost_subscribers").unwrap_or(0),
                });
            }
            Some("loadgen takeover") => {
                run.takeovers
                    .push(f(&v, "/takeover_ms").map(|ms| ms / 1000.0));
                if v.pointer("/consistency/ok").and_then(Value::as_bool) != Some(true) {
                    run.takeover_inconsistent += 1;
                }
            }
            _ => {}
        }
    }
    run
}

/// The value at quantile `q` of `sorted` by nearest rank (the smallest value with at least
/// `q` of the values at or below it): of 10 values, p50 is the 5th, p90 the 9th.
pub fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Min, p50 and max of the takeovers that succeeded, and how many did not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TakeoverStats {
    pub min: f64,
    pub p50: f64,
    pub max: f64,
    pub measured: usize,
    pub failed: usize,
}

pub fn takeover_stats(values: &[Option<f64>]) -> Option<TakeoverStats> {
    let mut sorted: Vec<f64> = values.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    Some(TakeoverStats {
        min: *sorted.first()?,
        p50: nearest_rank(&sorted, 0.5)?,
        max: *sorted.last()?,
        measured: sorted.len(),
        failed: values.len() - sorted.len(),
    })
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn phase<'a>(run: &'a Run, name: &str) -> Option<&'a ReservePhase> {
    run.reserve.iter().find(|p| p.phase == name)
}

/// Forwarded ÷ direct reserves/s, for the plain pair or the `-keys` pair.
pub fn forward_ratio(run: &Run, suffix: &str) -> Option<f64> {
    let direct = phase(run, &format!("forward-direct{suffix}"))?.rate;
    let forwarded = phase(run, &format!("forward-forwarded{suffix}"))?.rate;
    (direct > 0.0).then(|| forwarded / direct)
}

/// Rate with keys ÷ rate without, straight to the owner and forwarded.
pub fn key_costs(run: &Run) -> [(&'static str, Option<f64>); 2] {
    let ratio = |with: &str, without: &str| {
        let with = phase(run, with)?.rate;
        let without = phase(run, without)?.rate;
        (without > 0.0).then(|| with / without)
    };
    [
        (
            "straight to the owner",
            ratio("forward-direct-keys", "forward-direct"),
        ),
        (
            "forwarded",
            ratio("forward-forwarded-keys", "forward-forwarded"),
        ),
    ]
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
}

fn label_of(phase: &str) -> &'static str {
    match phase {
        "forward-direct" => "straight to the owner",
        "forward-forwarded" => "forwarded to the owner",
        "forward-direct-keys" => "straight, idempotency keys",
        "forward-forwarded-keys" => "forwarded, idempotency keys",
        _ => "other",
    }
}

/// The plain-text summary (`markdown`: the same as a Markdown section).
pub fn render(run: &Run, markdown: bool, label: &str) -> String {
    let mut out = String::new();
    let (h, bullet) = if markdown { ("### ", "- ") } else { ("", "  ") };
    if markdown {
        let _ = writeln!(out, "## cluster.sh run {label}\n");
    }
    for note in &run.notes {
        let _ = writeln!(out, "{bullet}{note}");
    }
    if !run.notes.is_empty() {
        out.push('\n');
    }
    if !run.reserve.is_empty() {
        let connections = run.reserve[0].connections;
        let _ = writeln!(
            out,
            "{h}forwarding: reserves/s through the event's owner and through another server ({connections} WebSocket connections, closed loop, one hot ticket type)\n"
        );
        if markdown {
            let _ = writeln!(
                out,
                "| phase | server | reserves/s | p50 ms | p99 ms | errors | unanswered | consistency |\n|---|---|---|---|---|---|---|---|"
            );
        } else {
            let _ = writeln!(
                out,
                "  {:<28} {:<24} {:>10} {:>8} {:>8} {:>7} {:>10} {:>11}",
                "phase",
                "server",
                "res/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "unanswered",
                "consistency"
            );
        }
        for p in &run.reserve {
            let consistency = match p.consistent {
                Some(true) => "ok",
                Some(false) => "MISMATCH",
                None => "—",
            };
            if markdown {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {} | {} | {} | {} | {consistency} |",
                    label_of(&p.phase),
                    p.url,
                    p.rate,
                    ms(p.p50_ms),
                    ms(p.p99_ms),
                    p.errors,
                    p.transport_failures
                );
            } else {
                let _ = writeln!(
                    out,
                    "  {:<28} {:<24} {:>10.0} {:>8} {:>8} {:>7} {:>10} {:>11}",
                    label_of(&p.phase),
                    p.url,
                    p.rate,
                    ms(p.p50_ms),
                    ms(p.p99_ms),
                    p.errors,
                    p.transport_failures,
                    consistency
                );
            }
        }
        out.push('\n');
        for (suffix, what) in [("", ""), ("-keys", ", with idempotency keys")] {
            if let Some(r) = forward_ratio(run, suffix) {
                let _ = writeln!(
                    out,
                    "{bullet}forwarded ÷ straight{what}: {r:.2} (goal ≥ {FORWARD_RATIO_GOAL}: {})",
                    verdict(r >= FORWARD_RATIO_GOAL)
                );
            }
        }
        for (what, cost) in key_costs(run) {
            if let Some(c) = cost {
                let _ = writeln!(out, "{bullet}with keys ÷ without, {what}: {c:.2}");
            }
        }
        out.push('\n');
    }
    if let Some(fan) = &run.fanout {
        let _ = writeln!(
            out,
            "{h}fan-out: {} idle WebSocket subscribers over {} server(s) ({} client process(es), {} source address(es)), {} reservations at {:.1}/s through one server\n",
            fan.subscribers, fan.servers, fan.processes, fan.source_addresses, fan.ok, fan.achieved_rate
        );
        let _ = writeln!(
            out,
            "{bullet}reserve answer → pool.update at the last subscriber ({} versions): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal p99 ≤ {FANOUT_P99_GOAL_MS} ms: {})",
            fan.last_count,
            fan.last_p50_ms,
            fan.last_p99_ms,
            fan.last_max_ms,
            verdict(fan.last_count > 0 && fan.last_p99_ms <= FANOUT_P99_GOAL_MS)
        );
        let _ = writeln!(
            out,
            "{bullet}at each subscriber: p50 {:.2} ms, p99 {:.2} ms; {:.1} % of versions coalesced; {} missing at the end; {} subscribers lost",
            fan.each_p50_ms,
            fan.each_p99_ms,
            fan.coalesced_fraction * 100.0,
            fan.missing,
            fan.lost
        );
        out.push('\n');
    }
    if !run.takeovers.is_empty() {
        let _ = writeln!(
            out,
            "{h}takeover: SIGKILL of the event's owner → first successful reserve through another server ({} kills)\n",
            run.takeovers.len()
        );
        match takeover_stats(&run.takeovers) {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "{bullet}min {:.2} s, p50 {:.2} s, max {:.2} s (goal ≤ {TAKEOVER_GOAL_S} s each: {})",
                    s.min,
                    s.p50,
                    s.max,
                    verdict(s.failed == 0 && s.max <= TAKEOVER_GOAL_S)
                );
            }
            None => {
                let _ = writeln!(out, "{bullet}no takeover measured");
            }
        }
        let values: Vec<String> = run
            .takeovers
            .iter()
            .map(|t| t.map_or_else(|| "none".to_owned(), |t| format!("{t:.2}")))
            .collect();
        let _ = writeln!(out, "{bullet}every value (s): {}", values.join(", "));
        if run.takeover_inconsistent > 0 {
            let _ = writeln!(
                out,
                "{bullet}consistency check failed (or not run) after {} of the kills",
                run.takeover_inconsistent
            );
        }
    }
    out
}

pub fn run(args: &ClusterSummaryArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    print!(
        "{}",
        render(&parse_lines(&text), args.markdown, &args.label)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_a_measured_value() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(nearest_rank(&ten, 0.5), Some(5.0));
        assert_eq!(nearest_rank(&ten, 0.9), Some(9.0));
        assert_eq!(nearest_rank(&ten, 0.99), Some(10.0));
        assert_eq!(nearest_rank(&ten, 0.0), Some(1.0));
        assert_eq!(nearest_rank(&[7.0, 8.0, 9.0], 0.5), Some(8.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn takeover_stats_leave_failures_out_and_count_them() {
        let s = takeover_stats(&[Some(6.5), None, Some(5.9), Some(7.2)]).unwrap();
        assert_eq!((s.min, s.p50, s.max), (5.9, 6.5, 7.2));
        assert_eq!((s.measured, s.failed), (3, 1));
        assert_eq!(takeover_stats(&[None]), None);
    }

    fn reserve(phase: &str, rate: f64) -> String {
        serde_json::json!({"tool": "loadgen reserve", "phase": phase, "url": "http://127.0.0.1:1",
            "connections": 64, "reservations_per_s": rate,
            "latency_ok_ms": {"p50_ms": 3.0, "p99_ms": 9.0}, "error_total": 0,
            "transport_failures": 0, "consistency": {"ok": true}})
        .to_string()
    }

    #[test]
    fn ratios_come_from_the_named_phases() {
        let text = [
            reserve("forward-direct", 8000.0),
            reserve("forward-forwarded", 2000.0),
            reserve("forward-forwarded", 4000.0),
            reserve("forward-direct-keys", 6000.0),
            reserve("forward-forwarded-keys", 3600.0),
        ]
        .join("\n");
        let run = parse_lines(&text);
        assert_eq!(
            run.reserve.len(),
            4,
            "a later line of a phase replaces the earlier"
        );
        assert_eq!(forward_ratio(&run, ""), Some(0.5));
        assert_eq!(forward_ratio(&run, "-keys"), Some(0.6));
        assert_eq!(key_costs(&run)[0].1, Some(0.75));
        assert_eq!(key_costs(&run)[1].1, Some(0.9));
        let text = render(&run, false, "");
        assert!(
            text.contains("forwarded ÷ straight: 0.50 (goal ≥ 0.5: met)"),
            "{text}"
        );
    }

    #[test]
    fn fanout_takeovers_and_notes_are_read() {
        let text = [
            r#"{"note": "reservations through node-b; owner node-a"}"#,
            r#"{"tool": "loadgen fanout", "subscribers": 3000, "subscriber_urls": ["a", "b", "c"], "processes": 3, "source_addresses": 4, "ok": 50, "achieved_rate_per_s": 19.8, "latency_all_ms": {"count": 50, "p50_ms": 40.0, "p99_ms": 250.0, "max_ms": 260.0}, "latency_ms": {"p50_ms": 20.0, "p99_ms": 90.0}, "coalesced_fraction": 0.1, "missing": 0, "lost_subscribers": 0}"#,
            r#"{"tool": "loadgen takeover", "takeover_ms": 6400.0, "consistency": {"ok": true}}"#,
            r#"{"tool": "loadgen takeover", "takeover_ms": null, "consistency": {"ok": false}}"#,
            "not json",
        ]
        .join("\n");
        let run = parse_lines(&text);
        let fan = run.fanout.clone().unwrap();
        assert_eq!((fan.subscribers, fan.servers, fan.processes), (3000, 3, 3));
        assert_eq!(run.takeovers, vec![Some(6.4), None]);
        assert_eq!(run.takeover_inconsistent, 1);
        let out = render(&run, true, "2026-01-01 QUICK");
        assert!(
            out.starts_with("## cluster.sh run 2026-01-01 QUICK"),
            "{out}"
        );
        assert!(
            out.contains("- reservations through node-b; owner node-a"),
            "{out}"
        );
        assert!(
            out.contains("p99 250.00 ms, max 260.00 ms (goal p99 ≤ 200 ms: NOT met)"),
            "{out}"
        );
        assert!(
            out.contains("min 6.40 s, p50 6.40 s, max 6.40 s (goal ≤ 10 s each: NOT met)"),
            "{out}"
        );
        assert!(out.contains("every value (s): 6.40, none"), "{out}");
    }
}
