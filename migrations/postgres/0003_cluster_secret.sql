-- Cluster mode: servers that share this database must sign and check the same JWTs. When no
-- secret is configured, the first cluster server stores a generated one here and every
-- other server reads it.
CREATE TABLE cluster_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
