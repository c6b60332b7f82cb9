//! The process's own open-file limit: every connection the load generator holds is a file
//! descriptor, so the soft limit is raised to the hard limit at start (as the server does),
//! and a run that would need more descriptors than that is refused up front.

/// Descriptors needed besides the measured connections: stdio, the runtime, the HTTP
/// client's pool, the reserver's connection, some slack.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
pub fn raise_nofile_limit() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("could not raise the open-file limit: {e}"))
}

/// Raises the limit and checks that `connections` (plus [`RESERVED_FDS`]) fit under it.
/// The error names the limit and what to do about it.
pub fn ensure_fds_for(connections: u64, what: &str) -> Result<u64, String> {
    let limit = raise_nofile_limit()?;
    check(connections, what, limit)
}

fn check(connections: u64, what: &str, limit: u64) -> Result<u64, String> {
    let needed = connections + RESERVED_FDS;
    if needed > limit {
        return Err(format!(
            "{connections} {what} need about {needed} open files, but this process may open only \
             {limit} (its hard RLIMIT_NOFILE, `ulimit -Hn`): use at most {} or raise the hard limit",
            limit.saturating_sub(RESERVED_FDS)
        ));
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_within_the_limit_pass() {
        assert_eq!(check(10_000, "subscribers", 20_000), Ok(20_000));
        assert!(check(20_000 - RESERVED_FDS, "x", 20_000).is_ok());
    }

    #[test]
    fn counts_over_the_limit_are_refused_with_the_figures() {
        let e = check(20_000, "subscribers", 20_000).unwrap_err();
        assert!(e.contains("20000 subscribers"), "{e}");
        assert!(e.contains("only 20000"), "{e}");
        assert!(e.contains("at most 19936"), "{e}");
    }

    #[test]
    fn raising_reports_a_usable_limit() {
        assert!(raise_nofile_limit().unwrap() > RESERVED_FDS);
    }
}
