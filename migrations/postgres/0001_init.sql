-- The whole schema of the first version. Times are milliseconds since the Unix epoch (UTC)
-- and ids are canonical UUID strings, so the same queries run on PostgreSQL and SQLite.
-- Integers are BIGINT throughout for the same reason.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,          -- trimmed and lower-cased by the server
    password_hash TEXT NOT NULL,                 -- Argon2id PHC string
    role          TEXT NOT NULL CHECK (role IN ('customer', 'admin')),
    created_at    BIGINT NOT NULL
);

CREATE TABLE events (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    starts_at  BIGINT NOT NULL,
    venue      TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_by_start ON events (starts_at, id);

CREATE TABLE ticket_types (
    id           TEXT PRIMARY KEY,
    event_id     TEXT NOT NULL REFERENCES events (id),
    position     BIGINT NOT NULL,                -- order within the event
    name         TEXT NOT NULL,
    price_amount BIGINT NOT NULL CHECK (price_amount >= 0),
    currency     TEXT NOT NULL,
    capacity     BIGINT NOT NULL CHECK (capacity >= 1),
    rule_kind    TEXT NOT NULL CHECK (rule_kind IN ('any', 'multiple', 'altogether', 'avoid_one')),
    rule_of      BIGINT,                         -- the N of `multiple`, else NULL
    UNIQUE (event_id, name),
    UNIQUE (event_id, position)
);

-- Availability is not stored: it is capacity minus the quantities of pending and paid
-- reservations, recomputed at start.
CREATE TABLE reservations (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id),
    event_id     TEXT NOT NULL REFERENCES events (id),
    status       TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'cancelled', 'expired')),
    total_amount BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX reservations_by_user ON reservations (user_id, created_at DESC, id DESC);
CREATE INDEX reservations_pending ON reservations (expires_at) WHERE status = 'pending';

CREATE TABLE reservation_items (
    reservation_id TEXT NOT NULL REFERENCES reservations (id),
    ticket_type_id TEXT NOT NULL REFERENCES ticket_types (id),
    position       BIGINT NOT NULL,
    quantity       BIGINT NOT NULL CHECK (quantity >= 1),
    unit_price     BIGINT NOT NULL,
    PRIMARY KEY (reservation_id, ticket_type_id)
);
CREATE INDEX reservation_items_by_type ON reservation_items (ticket_type_id);

CREATE TABLE payments (
    id             TEXT PRIMARY KEY,
    reservation_id TEXT NOT NULL UNIQUE REFERENCES reservations (id),  -- at most one success
    amount         BIGINT NOT NULL,
    currency       TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status = 'succeeded'),
    created_at     BIGINT NOT NULL
);

-- A retried call with the same key returns the stored response; kept 24 hours.
CREATE TABLE idempotency_keys (
    user_id     TEXT NOT NULL REFERENCES users (id),
    method      TEXT NOT NULL,
    key         TEXT NOT NULL,
    params_hash TEXT NOT NULL,                   -- SHA-256 of the canonical params
    response    TEXT NOT NULL,                   -- the JSON result first returned
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, method, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
