//! The open-model schedule: a fixed arrival rate over all connections, each connection
//! sending at its own evenly spaced instants, the connections staggered so the sends of all
//! of them are evenly spaced too.
//!
//! A call's latency is measured from its *intended* send instant, not from when it was
//! actually sent: when the server falls behind, a connection's next call starts late and
//! that wait is counted, so a slow answer is not hidden by the calls it delayed
//! (coordinated omission). With one call in flight per connection, a connection that is
//! late sends at once, and keeps sending at once until it catches up with its schedule.

use std::time::Duration;

/// Arrival rate in calls per second, from `2000`, `2000/s` or `1.5k/s`.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    let (digits, scale) = match number.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1000.0),
        None => (number, 1.0),
    };
    let rate: f64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a rate (e.g. 2000/s)"))?;
    let rate = rate * scale;
    if !(rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0) {
        return Err(format!("{text:?}: the rate must be in (0, 10M]/s"));
    }
    Ok(rate)
}

/// When one connection's calls are due, as offsets from the start of the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenSchedule {
    /// The connection's own first send.
    offset: Duration,
    /// Between two sends of the same connection: `connections / rate`.
    interval: Duration,
}

impl OpenSchedule {
    /// Connection `index` of `connections` sharing `rate` calls per second.
    pub fn for_connection(rate: f64, connections: u32, index: u32) -> Self {
        let connections = connections.max(1);
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        let offset = interval.mul_f64(f64::from(index % connections) / f64::from(connections));
        Self { offset, interval }
    }

    /// Intended send of the connection's call number `k` (from 0).
    pub fn intended(&self, k: u64) -> Duration {
        self.offset + self.interval.mul_f64(k as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_and_without_unit() {
        assert_eq!(parse_rate("2000"), Ok(2000.0));
        assert_eq!(parse_rate("2000/s"), Ok(2000.0));
        assert_eq!(parse_rate("1.5k/s"), Ok(1500.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("inf").is_err());
    }

    #[test]
    fn one_connection_sends_every_one_over_rate() {
        let s = OpenSchedule::for_connection(100.0, 1, 0);
        assert_eq!(s.intended(0), Duration::ZERO);
        assert_eq!(s.intended(1), Duration::from_millis(10));
        assert_eq!(s.intended(100), Duration::from_secs(1));
    }

    #[test]
    fn connections_are_staggered_so_all_sends_are_evenly_spaced() {
        // 4 connections at 1000/s: each sends every 4 ms, connection i at i ms + 4k ms.
        let mut sends: Vec<Duration> = (0..4)
            .flat_map(|i| {
                let s = OpenSchedule::for_connection(1000.0, 4, i);
                (0..250).map(move |k| s.intended(k))
            })
            .collect();
        sends.sort();
        assert_eq!(sends.len(), 1000);
        assert_eq!(sends[0], Duration::ZERO);
        for pair in sends.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap.abs_diff(Duration::from_millis(1)) < Duration::from_micros(1),
                "{gap:?}"
            );
        }
        // The rate over the first second is exactly the one asked for.
        assert_eq!(
            sends
                .iter()
                .filter(|&&t| t < Duration::from_secs(1))
                .count(),
            1000
        );
    }
}
