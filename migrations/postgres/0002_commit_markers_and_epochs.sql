-- Settling commits whose outcome is unknown, and versions that never go back.

-- One row per batch the writer commits, inserted in the batch's own transaction: when the
-- connection is lost during COMMIT, the writer looks the batch id up on a fresh connection
-- to learn whether it committed. Only needed for minutes; the writer deletes old rows.
CREATE TABLE commit_markers (
    batch_id   TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE INDEX commit_markers_by_age ON commit_markers (created_at);

-- Bumped for every event each time a server takes the event over (every start, for a
-- single server). Pool versions are `epoch * 2^32 + changes since then`, so they never go
-- back across restarts.
ALTER TABLE events ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
