//! What `/proc` says about the processes a benchmark involves: CPU time (`utime + stime`
//! from `/proc/<pid>/stat`, of one process or of a whole process tree such as a PostgreSQL
//! postmaster and its backends) and resident memory (`VmRSS`, `VmHWM` from
//! `/proc/<pid>/status`). Linux only; on other systems every reading is `None`.
//!
//! A tree's CPU time counts, for every process in it, its own time plus the time of its
//! children that already exited and were reaped (`cutime + cstime`): PostgreSQL backends that
//! end during a window are then still counted, in the postmaster's figures.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`): 100 on every
/// Linux architecture this runs on (the kernel converts to it whatever its `HZ`).
pub const TICKS_PER_SECOND: u64 = 100;

/// The fields of one `/proc/<pid>/stat` line that a CPU split needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub ppid: u32,
    /// `utime + stime`, in ticks.
    pub own_ticks: u64,
    /// `cutime + cstime`: reaped children, in ticks.
    pub children_ticks: u64,
}

impl Stat {
    /// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and
    /// may hold spaces and parentheses itself, so the fields are counted from the last `)`.
    pub fn parse(line: &str) -> Option<Self> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let pid = line[..open].trim().parse().ok()?;
        // After the name: state(3) ppid(4) … utime(14) stime(15) cutime(16) cstime(17).
        let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let signed = |n: usize| -> Option<u64> {
            let v: i64 = fields.get(n - 3)?.parse().ok()?;
            Some(v.max(0) as u64)
        };
        Some(Self {
            pid,
            ppid: u32::try_from(field(4)?).ok()?,
            own_ticks: field(14)? + field(15)?,
            children_ticks: signed(16)? + signed(17)?,
        })
    }
}

/// Which processes one figure of a CPU split covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One process (all its threads).
    Process(u32),
    /// A process and all its descendants, with their reaped children.
    Tree(u32),
}

/// A named figure of a CPU split, from a `NAME=PID` or `NAME=tree:PID` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuProbe {
    pub name: String,
    pub scope: Scope,
}

impl CpuProbe {
    /// `server=1234` (one process), `postgres=tree:2221` (the process and its descendants),
    /// `loadgen=self` (this process).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, target) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected NAME=PID, NAME=tree:PID or NAME=self"))?;
        if name.is_empty() {
            return Err(format!("{text:?}: empty name"));
        }
        let pid = |s: &str| -> Result<u32, String> {
            s.parse()
                .map_err(|_| format!("{text:?}: {s:?} is not a process id"))
        };
        let scope = if target == "self" {
            Scope::Process(std::process::id())
        } else if let Some(rest) = target.strip_prefix("tree:") {
            Scope::Tree(pid(rest)?)
        } else {
            Scope::Process(pid(target)?)
        };
        Ok(Self {
            name: name.to_owned(),
            scope,
        })
    }
}

/// CPU ticks of `scope` given every process's stat: a process's own time, or a tree's own
/// and reaped-children time. `None` when the root process is not there.
pub fn ticks_of(scope: Scope, stats: &HashMap<u32, Stat>) -> Option<u64> {
    match scope {
        Scope::Process(pid) => stats.get(&pid).map(|s| s.own_ticks),
        Scope::Tree(root) => {
            stats.get(&root)?;
            let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
            for s in stats.values() {
                children.entry(s.ppid).or_default().push(s.pid);
            }
            let mut total = 0;
            let mut todo = vec![root];
            // A pid appears once in a snapshot, so a walk from the root visits each once.
            while let Some(pid) = todo.pop() {
                if let Some(s) = stats.get(&pid) {
                    total += s.own_ticks + s.children_ticks;
                }
                if let Some(kids) = children.get(&pid) {
                    todo.extend(kids.iter().copied().filter(|&k| k != pid));
                }
            }
            Some(total)
        }
    }
}

/// Reads `/proc/<pid>/stat` for the processes `probes` need (every process, when a tree
/// is asked for).
fn snapshot(probes: &[CpuProbe]) -> HashMap<u32, Stat> {
    let mut stats = HashMap::new();
    let read = |pid: u32| -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    };
    if probes.iter().any(|p| matches!(p.scope, Scope::Tree(_))) {
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                    if let Some(stat) = read(pid) {
                        stats.insert(pid, stat);
                    }
                }
            }
        }
    } else {
        for probe in probes {
            if let Scope::Process(pid) = probe.scope {
                if let Some(stat) = read(pid) {
                    stats.insert(pid, stat);
                }
            }
        }
    }
    stats
}

/// CPU ticks per probe at one moment; a probe whose process is gone is left out.
pub fn sample(probes: &[CpuProbe]) -> BTreeMap<String, u64> {
    let stats = snapshot(probes);
    probes
        .iter()
        .filter_map(|p| Some((p.name.clone(), ticks_of(p.scope, &stats)?)))
        .collect()
}

/// CPU seconds per probe between two samples (probes missing from either are left out).
pub fn cpu_seconds(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, f64> {
    before
        .iter()
        .filter_map(|(name, &b)| {
            let a = *after.get(name)?;
            Some((
                name.clone(),
                a.saturating_sub(b) as f64 / TICKS_PER_SECOND as f64,
            ))
        })
        .collect()
}

/// µs of CPU per operation, or `None` without operations.
pub fn micros_per_op(cpu_seconds: f64, ops: u64) -> Option<f64> {
    (ops > 0).then(|| cpu_seconds * 1e6 / ops as f64)
}

/// Cores kept busy on average over `elapsed`.
pub fn cores(cpu_seconds: f64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        cpu_seconds / elapsed.as_secs_f64()
    }
}

/// Resident memory of one process, in KiB: now (`VmRSS`) and its peak so far (`VmHWM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    pub current_kib: u64,
    pub peak_kib: u64,
}

impl Rss {
    /// Parses `/proc/<pid>/status`.
    pub fn parse(status: &str) -> Option<Self> {
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Self {
            current_kib: kib("VmRSS:")?,
            peak_kib: kib("VmHWM:")?,
        })
    }

    /// The process's memory now; `None` when it is gone (or not on Linux).
    pub fn read(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, ppid: u32, own: u64, children: u64) -> Stat {
        Stat {
            pid,
            ppid,
            own_ticks: own,
            children_ticks: children,
        }
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "2221 (postgres: x (y) z) S 1 2221 2221 0 -1 4194560 3003 1234 0 0 \
                    150 25 7 3 20 0 1 0 1000 227000000 5000 18446744073709551615";
        assert_eq!(Stat::parse(line), Some(stat(2221, 1, 175, 10)));
    }

    #[test]
    fn a_truncated_stat_line_is_refused() {
        assert_eq!(Stat::parse("12 (x) S 1 2 3"), None);
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn a_tree_counts_descendants_and_reaped_children_but_not_others() {
        let stats: HashMap<u32, Stat> = [
            stat(1, 0, 1000, 0),
            stat(10, 1, 5, 40), // the postmaster: 40 ticks of backends that exited
            stat(11, 10, 7, 0),
            stat(12, 10, 3, 0),
            stat(13, 12, 2, 0), // a grandchild
            stat(20, 1, 500, 0),
        ]
        .into_iter()
        .map(|s| (s.pid, s))
        .collect();
        assert_eq!(ticks_of(Scope::Tree(10), &stats), Some(5 + 40 + 7 + 3 + 2));
        assert_eq!(ticks_of(Scope::Process(10), &stats), Some(5));
        assert_eq!(ticks_of(Scope::Tree(99), &stats), None);
    }

    #[test]
    fn probes_parse_process_tree_and_self() {
        assert_eq!(
            CpuProbe::parse("server=42").unwrap(),
            CpuProbe {
                name: "server".into(),
                scope: Scope::Process(42)
            }
        );
        assert_eq!(
            CpuProbe::parse("postgres=tree:7").unwrap().scope,
            Scope::Tree(7)
        );
        assert_eq!(
            CpuProbe::parse("loadgen=self").unwrap().scope,
            Scope::Process(std::process::id())
        );
        assert!(CpuProbe::parse("server").is_err());
        assert!(CpuProbe::parse("=1").is_err());
        assert!(CpuProbe::parse("server=abc").is_err());
    }

    #[test]
    fn cpu_seconds_and_micros_per_op() {
        let before = BTreeMap::from([("server".to_owned(), 100), ("gone".to_owned(), 5)]);
        let after = BTreeMap::from([("server".to_owned(), 350)]);
        let seconds = cpu_seconds(&before, &after);
        assert_eq!(seconds, BTreeMap::from([("server".to_owned(), 2.5)]));
        assert_eq!(micros_per_op(2.5, 100_000), Some(25.0));
        assert_eq!(micros_per_op(2.5, 0), None);
        assert_eq!(cores(2.5, Duration::from_secs(5)), 0.5);
    }

    #[test]
    fn rss_reads_current_and_peak() {
        let status = "Name:\tticket-api\nVmHWM:\t  791234 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n";
        assert_eq!(
            Rss::parse(status),
            Some(Rss {
                current_kib: 12345,
                peak_kib: 791234
            })
        );
        assert_eq!(Rss::parse("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let probes = [CpuProbe::parse("me=self").unwrap()];
        assert!(sample(&probes).contains_key("me"));
        assert!(Rss::read(std::process::id()).is_some_and(|r| r.current_kib > 0));
    }
}
