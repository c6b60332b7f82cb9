//! A scrape of the server's `GET /metrics` (Prometheus text format): the few figures a
//! benchmark reports.

/// The write-behind writer's batch-size histogram, cumulative since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriterBatches {
    /// Changes committed (`ticket_api_writer_batch_size_sum`).
    pub changes: f64,
    /// Transactions (`ticket_api_writer_batch_size_count`).
    pub batches: f64,
}

impl WriterBatches {
    /// Reads the two series from a scrape; `None` when either is missing.
    pub fn parse(text: &str) -> Option<Self> {
        let mut changes = None;
        let mut batches = None;
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match name {
                "ticket_api_writer_batch_size_sum" => changes = Some(value),
                "ticket_api_writer_batch_size_count" => batches = Some(value),
                _ => {}
            }
        }
        Some(Self {
            changes: changes?,
            batches: batches?,
        })
    }

    /// What happened between two scrapes.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            changes: self.changes - earlier.changes,
            batches: self.batches - earlier.batches,
        }
    }

    /// Average changes per transaction.
    pub fn average(self) -> Option<f64> {
        (self.batches > 0.0).then(|| self.changes / self.batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sum_and_count() {
        let text = "# HELP ticket_api_writer_batch_size Changes committed\n\
                    # TYPE ticket_api_writer_batch_size histogram\n\
                    ticket_api_writer_batch_size_sum 300.0\n\
                    ticket_api_writer_batch_size_count 4\n\
                    ticket_api_writer_batch_size_bucket{le=\"1.0\"} 0\n";
        let w = WriterBatches::parse(text).unwrap();
        assert_eq!(w.changes, 300.0);
        assert_eq!(w.batches, 4.0);
        assert_eq!(w.average(), Some(75.0));
        let later = WriterBatches {
            changes: 500.0,
            batches: 6.0,
        };
        assert_eq!(later.since(w).average(), Some(100.0));
    }

    #[test]
    fn missing_series_is_none() {
        assert_eq!(WriterBatches::parse("other_metric 1\n"), None);
    }
}
