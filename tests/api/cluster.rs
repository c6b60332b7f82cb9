//! Several servers in cluster mode (PROTOCOL §10), black-box: real `ticket-api --cluster`
//! processes on one fresh PostgreSQL database and one Redis key prefix, killed (SIGKILL)
//! and frozen (SIGSTOP/SIGCONT) while clients talk to them. Every answer a client got is
//! then held against the database, read with a connection of the test's own.
//!
//! The contract these tests rely on, beyond PROTOCOL: each event is owned by one live
//! server, whose node id is in Redis at `<prefix>owner:<event_id>` (a lease of 5 s); calls
//! for an event owned elsewhere are forwarded to its owner; `/health` carries `"cluster"`
//! and `"node"`; `/metrics` has the `ticket_api_cluster_*` series.
//!
//! Needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379; without them the tests
//! are skipped loudly, or fail under `TICKET_API_REQUIRE_SERVICES=1`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{Builder, Client as Redis, ClientLike, Config, KeysInterface};
use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::{FutureExt, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use ticket_api::auth::Tokens;
use ticket_api::core::{Clock, Role, SystemClock, UserId};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{
    assert_error, event_with_types, fresh_postgres_database, poll_until, reason, redis_available,
    remove_postgres_database, LongPollClient, WsClient, JWT_SECRET, REDIS_URL,
};

/// The node ids of the servers a test starts, in order; none is a prefix of another.
const NODE_IDS: [&str; 3] = ["node-a", "node-b", "node-c"];
const ADMIN_EMAIL: &str = "boss@example.com";
const ADMIN_PASSWORD: &str = "boss-password";

/// PROTOCOL §10: a dead server's work is carried by the others within 10 s.
const TAKEOVER: Duration = Duration::from_secs(10);
/// The owner lease: a frozen owner has lost its events once this has passed.
const LEASE: Duration = Duration::from_secs(5);
/// PROTOCOL §10: until then, calls that need it answer UNAVAILABLE within 5 s.
const UNAVAILABLE_WITHIN: Duration = Duration::from_secs(5);
/// What the test's own clock may add to a measured time on a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(500);
/// Events created on one server are visible on every server within 3 s.
const VISIBLE_WITHIN: Duration = Duration::from_secs(3);
/// The longest a call to a running server may take before the test fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Long-poll GETs answer `[]` after this, so a test can see that nothing more is coming.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Between two attempts of a call that answered UNAVAILABLE, as a polite client waits.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// The cluster: processes, Redis, the database
// ---------------------------------------------------------------------------------------

/// One `ticket-api --cluster` process.
struct Node {
    id: &'static str,
    addr: SocketAddr,
    /// `None` once killed.
    child: Option<Child>,
}

/// Servers sharing one fresh database and one Redis prefix, and what the test needs to
/// reach and inspect them.
struct Cluster {
    dir: tempfile::TempDir,
    db_name: String,
    db_url: String,
    /// Unique to the test, ending in ':', so tests never see each other's keys.
    prefix: String,
    redis: Redis,
    http: reqwest::Client,
    ttl: Duration,
    nodes: Vec<Node>,
    /// The admin's token, from `auth.login` once a server runs.
    admin: Option<String>,
}

/// Runs `test` on a cluster of `nodes` servers (reservation TTL `ttl`); afterwards, passed
/// or failed, kills every server, deletes the prefix's keys and drops the database. On
/// failure the servers' logs are printed.
async fn with_cluster<F>(nodes: usize, ttl: Duration, test: F)
where
    F: for<'c> FnOnce(&'c mut Cluster) -> LocalBoxFuture<'c, ()>,
{
    let Some(mut cluster) = Cluster::prepare(ttl).await else {
        return;
    };
    let outcome = AssertUnwindSafe(async {
        cluster.start_nodes(nodes).await;
        test(&mut cluster).await;
    })
    .catch_unwind()
    .await;
    cluster.tear_down(outcome.is_err()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

impl Cluster {
    /// A fresh database with an admin in it (`ticket-api user add --admin`, which also
    /// migrates it) and a Redis prefix of its own; no server yet. `None` (skipped loudly)
    /// without PostgreSQL or Redis.
    async fn prepare(ttl: Duration) -> Option<Cluster> {
        if !redis_available().await {
            return None;
        }
        let (db_name, db_url) = fresh_postgres_database().await?;
        let redis = Builder::from_config(Config::from_url(REDIS_URL).unwrap())
            .build()
            .unwrap();
        redis.init().await.expect("the test connects to Redis");
        let cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            db_name,
            db_url,
            prefix: format!("ticket-api-cluster-test-{}:", uuid::Uuid::new_v4()),
            redis,
            http: reqwest::Client::new(),
            ttl,
            nodes: Vec::new(),
            admin: None,
        };
        let output = cluster
            .command()
            .args(["user", "add", "--email", ADMIN_EMAIL])
            .args(["--password", ADMIN_PASSWORD, "--admin"])
            .args(cluster.common_args("admin"))
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(cluster)
    }

    /// The binary with a clean environment: only the settings given on the command line
    /// count.
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ticket-api"));
        for (name, _) in std::env::vars() {
            if name.starts_with("TICKET_API_") || name == "DATABASE_URL" || name == "REDIS_URL" {
                command.env_remove(name);
            }
        }
        command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// The settings every process on this database gets: its own data folder (`name`),
    /// the shared secret, and limits high enough for the load the tests make.
    fn common_args(&self, name: &str) -> Vec<String> {
        let data_dir = self.dir.path().join(format!("data-{name}"));
        [
            "--database-url",
            &self.db_url,
            "--jwt-secret",
            JWT_SECRET,
            "--data-dir",
            &data_dir.display().to_string(),
            "--reservation-ttl",
            &format!("{}s", self.ttl.as_secs()),
            "--poll-timeout",
            &format!("{}s", POLL_TIMEOUT.as_secs()),
            "--rate-limit",
            "1000000",
            "--rate-burst",
            "1000000",
            "--auth-rate-limit",
            "100000",
            "--auth-rate-burst",
            "100000",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The cluster settings of node `id`.
    fn cluster_args(&self, id: &str) -> Vec<String> {
        let args = ["--cluster", "--node-id", id, "--redis-url", REDIS_URL];
        let mut args: Vec<String> = args.map(str::to_owned).to_vec();
        args.extend(["--redis-prefix".to_owned(), self.prefix.clone()]);
        args
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts a server with `args` on 127.0.0.1:0, its stderr in `<name>.log`; returns once
    /// it prints where it listens.
    async fn spawn_server(&self, name: &str, args: Vec<String>) -> (Child, SocketAddr) {
        let log = std::fs::File::create(self.log(name)).unwrap();
        let mut child = self
            .command()
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start ticket-api");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(addr) = line.strip_prefix("ticket-api listening on ") {
                    return addr.trim().parse::<SocketAddr>().unwrap();
                }
            }
            panic!(
                "{name} ended before listening: {}",
                std::fs::read_to_string(self.log(name)).unwrap_or_default()
            );
        })
        .await
        .unwrap_or_else(|_| panic!("{name} listening within 60 s"));
        // Keep reading stdout, so the server never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, addr)
    }

    /// Starts node `id` and waits until its `/health` says it takes part in the cluster.
    async fn spawn_node(&self, id: &'static str) -> Node {
        let mut args = self.common_args(id);
        args.extend(self.cluster_args(id));
        let (child, addr) = self.spawn_server(id, args).await;
        let node = Endpoint {
            http: self.http.clone(),
            addr,
        };
        poll_until(
            Duration::from_secs(20),
            &format!("{id} to report itself healthy in the cluster"),
            || async {
                let (status, body) = node.health().await.ok()?;
                let ready = status == 200 && body["cluster"] == "ok";
                ready.then_some(body)
            },
        )
        .await;
        let (_, body) = node.health().await.unwrap();
        assert_eq!(body["node"], id, "/health names the node: {body}");
        assert_eq!(body["status"], "ok", "{body}");
        Node {
            id,
            addr,
            child: Some(child),
        }
    }

    /// Starts the first `count` of [`NODE_IDS`] at once, and logs the admin in.
    async fn start_nodes(&mut self, count: usize) {
        let started = join_all(NODE_IDS[..count].iter().map(|&id| self.spawn_node(id))).await;
        self.nodes.extend(started);
        if count > 0 {
            let login = self
                .node(0)
                .ok(
                    None,
                    "auth.login",
                    json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
                )
                .await;
            self.admin = Some(login["token"].as_str().unwrap().to_owned());
        }
    }

    /// A client of node `index`.
    fn node(&self, index: usize) -> Endpoint {
        Endpoint {
            http: self.http.clone(),
            addr: self.nodes[index].addr,
        }
    }

    fn pid(&self, index: usize) -> String {
        let child = self.nodes[index].child.as_ref().expect("a running node");
        child.id().expect("not yet reaped").to_string()
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(&mut self, index: usize) {
        let mut child = self.nodes[index].child.take().expect("a running node");
        child.kill().await.expect("SIGKILL ticket-api");
    }

    /// `kill -STOP` (`CONT`): the process freezes (resumes) with its sockets open.
    async fn signal(&self, index: usize, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid(index)])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.nodes[index].id);
    }

    /// `count` customers stored straight in the database, each with a token signed with
    /// the shared secret: hashing hundreds of passwords through `auth.register` would take
    /// minutes on two cores.
    async fn customers(&self, count: usize) -> Vec<String> {
        let tokens = Tokens::new(JWT_SECRET.as_bytes(), Duration::from_secs(24 * 3600));
        let now = SystemClock.now();
        let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
        let mut issued = Vec::with_capacity(count);
        for _ in 0..count {
            let id = UserId::new();
            sqlx::query(
                "INSERT INTO users (id, email, password_hash, role, created_at) \
                 VALUES ($1, $2, 'not-a-password-hash', 'customer', $3)",
            )
            .bind(id.to_string())
            .bind(format!("buyer-{id}@example.com"))
            .bind(now.as_millis())
            .execute(&mut conn)
            .await
            .unwrap();
            issued.push(tokens.issue(id, Role::Customer, now).0);
        }
        conn.close().await.unwrap();
        issued
    }

    /// Creates an event with one ticket type per `(capacity, rule)` through node `via`,
    /// and waits until every running node shows it (within 3 s). Returns its id and its
    /// ticket type ids.
    async fn create_event(&self, via: usize, types: &[(u32, Value)]) -> (Value, Vec<Value>) {
        let admin = self.admin.as_deref().expect("the admin is logged in");
        let event = self
            .node(via)
            .ok(
                Some(admin),
                "admin.events.create",
                event_with_types("Cluster", types),
            )
            .await;
        let event_id = event["id"].clone();
        for index in self.running() {
            let node = self.node(index);
            poll_until(
                VISIBLE_WITHIN,
                &format!("the event to be visible on {}", self.nodes[index].id),
                || async {
                    let response = node
                        .call(None, "events.get", json!({"event_id": event_id}))
                        .await;
                    response["error"].is_null().then_some(())
                },
            )
            .await;
        }
        let ids = event["ticket_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tt| tt["id"].clone())
            .collect();
        (event_id, ids)
    }

    /// Nodes whose process has not been killed (a frozen one counts).
    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect()
    }

    /// The node named by the event's owner key right now, if any.
    async fn owner_now(&self, event_id: &Value) -> Option<usize> {
        let key = format!("{}owner:{}", self.prefix, event_id.as_str().unwrap());
        let value: Option<String> = self.redis.get(key).await.unwrap();
        let value = value?;
        let index = self.nodes.iter().position(|node| names(&value, node.id));
        assert!(
            index.is_some(),
            "the owner key of {event_id} names {value:?}, not one of this cluster's nodes"
        );
        index
    }

    /// The event's owner, waiting for the key to appear. An `events.get` nudges it on
    /// each round, in case ownership is claimed only when the event is first used.
    async fn owner(&self, event_id: &Value) -> usize {
        poll_until(TAKEOVER, "the event's owner key in Redis", || async {
            if let Some(index) = self.owner_now(event_id).await {
                return Some(index);
            }
            let nudge = self.running()[0];
            self.node(nudge)
                .call(None, "events.get", json!({"event_id": event_id}))
                .await;
            None
        })
        .await
    }

    /// Waits until the event's owner key names another node than `old`.
    async fn new_owner(&self, event_id: &Value, old: usize) -> usize {
        poll_until(
            LEASE + TAKEOVER,
            "another node to take the event over",
            || async { self.owner_now(event_id).await.filter(|&index| index != old) },
        )
        .await
    }

    /// The sum of a metric over `nodes`.
    async fn metric_sum(&self, nodes: &[usize], name: &str) -> f64 {
        let mut sum = 0.0;
        for &index in nodes {
            let text = self.node(index).metrics().await;
            sum += sample(&text, name)
                .unwrap_or_else(|| panic!("{name} missing from the /metrics of node {index}"));
        }
        sum
    }

    /// The event's reservations and payments in the database.
    async fn stored(&self, event_id: &Value) -> Stored {
        let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
        let rows = sqlx::query(
            "SELECT r.id AS id, r.status AS status, CAST(SUM(i.quantity) AS BIGINT) AS quantity \
             FROM reservations r JOIN reservation_items i ON i.reservation_id = r.id \
             WHERE r.event_id = $1 GROUP BY r.id, r.status",
        )
        .bind(event_id.as_str().unwrap())
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let reservations = rows
            .iter()
            .map(|row| {
                let quantity: i64 = row.get("quantity");
                (row.get("id"), (row.get("status"), quantity as u64))
            })
            .collect();
        let payments = sqlx::query(
            "SELECT p.reservation_id AS id FROM payments p \
             JOIN reservations r ON r.id = p.reservation_id WHERE r.event_id = $1",
        )
        .bind(event_id.as_str().unwrap())
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get("id"))
        .collect();
        conn.close().await.unwrap();
        Stored {
            reservations,
            payments,
        }
    }

    /// Holds what clients were told against the database: every acknowledged reservation
    /// is there with its status (a pending one may have expired since), nothing is there
    /// that no call acknowledged, every paid one has its payment, nothing is oversold; and
    /// at a moment the database stands still, every one of `nodes` shows `available` =
    /// capacity − pending − paid (the single ticket type of the event).
    async fn audit(&self, event_id: &Value, ledger: &Ledger, capacity: u64, nodes: &[usize]) {
        let stored = self.stored(event_id).await;
        for (id, (told, quantity)) in &ledger.told {
            let Some((status, stored_quantity)) = stored.reservations.get(id) else {
                panic!("acknowledged reservation {id} ({told}) is not in the database");
            };
            assert_eq!(stored_quantity, quantity, "reservation {id}");
            let expired_since = *told == "pending" && status == "expired";
            assert!(
                status == told || expired_since,
                "reservation {id} is {status} in the database; a call said {told}"
            );
            if *told == "paid" {
                assert!(
                    stored.payments.contains(id),
                    "paid reservation {id} has no payment"
                );
            }
        }
        for id in stored.reservations.keys() {
            assert!(
                ledger.told.contains_key(id),
                "reservation {id} is in the database but no call acknowledged it: \
                 a refused call, or a stale owner, committed it"
            );
        }
        let paid = stored.with_status("paid");
        assert_eq!(
            paid,
            stored.payments.len(),
            "one payment per paid reservation"
        );
        let held = stored.held();
        assert!(
            held <= capacity,
            "oversold: {held} tickets held of {capacity}"
        );
        self.settled(event_id, capacity, nodes).await;
    }

    /// Every one of `nodes` shows `available` = capacity − pending − paid in the database,
    /// compared at a moment the database stood still (expiries may commit meanwhile).
    async fn settled(&self, event_id: &Value, capacity: u64, nodes: &[usize]) {
        let mut last = None;
        for _ in 0..50 {
            let before = self.stored(event_id).await.held();
            let shown: Vec<u64> = join_all(
                nodes
                    .iter()
                    .map(|&i| async move { self.node(i).pool(event_id).await.0 }),
            )
            .await;
            let after = self.stored(event_id).await.held();
            if before == after && shown.iter().all(|&a| a + after == capacity) {
                return;
            }
            last = Some((shown, capacity - after));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("available on nodes {nodes:?} never matched capacity − pending − paid: {last:?}");
    }

    /// Kills every server (a frozen one too), deletes the prefix's keys, drops the
    /// database; prints the logs when the test failed.
    async fn tear_down(mut self, failed: bool) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].child.is_some() {
                self.kill(index).await;
            }
        }
        let keys: Vec<_> = self
            .redis
            .scan_buffered(format!("{}*", self.prefix), Some(1000), None)
            .filter_map(|key| async move { key.ok() })
            .collect()
            .await;
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = self.redis.del(chunk.to_vec()).await;
        }
        let _ = self.redis.quit().await;
        remove_postgres_database(&self.db_name).await;
        if failed {
            let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(150)..].join("\n");
                eprintln!("--- {} (last 150 lines) ---\n{tail}", log.display());
            }
        }
    }
}

/// Whether an owner key's value names node `id`: the id itself, or the id followed by
/// something no node id contains (a `:` and a fencing token, say), should the lease carry
/// more than the id.
fn names(value: &str, id: &str) -> bool {
    value.strip_prefix(id).is_some_and(|rest| {
        rest.chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    })
}

/// The reservations of one event in the database: `(status, quantity)` by id, and the ids
/// of those with a payment.
struct Stored {
    reservations: HashMap<String, (String, u64)>,
    payments: HashSet<String>,
}

impl Stored {
    /// Tickets held: the quantities of pending and paid reservations.
    fn held(&self) -> u64 {
        self.reservations
            .values()
            .filter(|(status, _)| status == "pending" || status == "paid")
            .map(|(_, quantity)| quantity)
            .sum()
    }

    fn with_status(&self, wanted: &str) -> usize {
        self.reservations
            .values()
            .filter(|(status, _)| status == wanted)
            .count()
    }
}

/// The sum of a metric's samples in Prometheus text (any labels), `None` when absent.
fn sample(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let metric = line.split(['{', ' ']).next().unwrap_or("");
        if metric == name {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// Talking to one node
// ---------------------------------------------------------------------------------------

/// A client of one node, cheap to clone into a task.
#[derive(Clone)]
struct Endpoint {
    http: reqwest::Client,
    addr: SocketAddr,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One call over `/rpc`; `Err` when no JSON-RPC answer came back within `within`.
    async fn try_call(
        &self,
        token: Option<&str>,
        method: &str,
        params: Value,
        within: Duration,
    ) -> Result<Value, String> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let mut request = self.http.post(self.url("/rpc")).json(&body).timeout(within);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let failed = |e: reqwest::Error| format!("{method} through {}: {e}", self.addr);
        let response = request.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(failed)?;
        if status != 200 {
            return Err(format!(
                "{method} through {}: HTTP {status}: {text}",
                self.addr
            ));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method}: {e}: {text}"))
    }

    /// One call that must be answered; the whole response.
    async fn call(&self, token: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(token, method, params, CALL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// One call that must succeed; its result.
    async fn ok(&self, token: Option<&str>, method: &str, params: Value) -> Value {
        let response = self.call(token, method, params).await;
        assert!(
            response["error"].is_null(),
            "{method} through {}: {response}",
            self.addr
        );
        response["result"].clone()
    }

    /// One call that must be answered, and how long the answer took.
    async fn timed(&self, token: &str, method: &str, params: Value) -> (Value, Duration) {
        let started = Instant::now();
        let response = self.call(Some(token), method, params).await;
        (response, started.elapsed())
    }

    /// `(available, version)` of the event's first ticket type, per `events.get`.
    async fn pool(&self, event_id: &Value) -> (u64, u64) {
        let event = self
            .ok(None, "events.get", json!({"event_id": event_id}))
            .await;
        let tt = &event["ticket_types"][0];
        (
            tt["available"].as_u64().unwrap(),
            tt["version"].as_u64().unwrap(),
        )
    }

    async fn health(&self) -> Result<(u16, Value), reqwest::Error> {
        let response = self
            .http
            .get(self.url("/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// A WebSocket, bound to the token's user at connect when one is given.
    async fn ws(&self, token: Option<&str>) -> WsClient {
        let url = match token {
            Some(token) => format!("ws://{}/ws?token={token}", self.addr),
            None => format!("ws://{}/ws", self.addr),
        };
        WsClient::connect(&url).await.unwrap()
    }

    /// Opens a long-poll session here (`POST /lp`, 201); its id.
    async fn lp_open(&self, token: Option<&str>) -> String {
        let base = format!("http://{}", self.addr);
        LongPollClient::open(&self.http, &base, token).await.session
    }

    /// `POST /lp/{session}` here with one message: the status and body.
    async fn lp_post(&self, session: &str, message: Value) -> Option<(u16, Value)> {
        let response = self
            .http
            .post(self.url(&format!("/lp/{session}")))
            .json(&message)
            .timeout(UNAVAILABLE_WITHIN + SLACK)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let text = response.text().await.ok()?;
        Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// `GET /lp/{session}?cursor=N` here: the status and body; `None` when no answer came
    /// within the poll timeout and a margin.
    async fn lp_get(&self, session: &str, cursor: u64) -> Option<(u16, Value)> {
        let response = self
            .http
            .get(self.url(&format!("/lp/{session}?cursor={cursor}")))
            .timeout(POLL_TIMEOUT + UNAVAILABLE_WITHIN)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let text = response.text().await.ok()?;
        Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Polls the session here from `*cursor` until a message matching `wanted` arrives
    /// (within 10 s); every message taken is appended to `seen` and the cursor moved.
    async fn lp_until(
        &self,
        session: &str,
        cursor: &mut u64,
        seen: &mut Vec<Value>,
        what: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no {what} within 10 s: {seen:?}");
            let Some((status, body)) = self.lp_get(session, *cursor).await else {
                continue;
            };
            assert_eq!(
                status, 200,
                "GET /lp/{session} through {}: {body}",
                self.addr
            );
            let (next, messages) = LongPollClient::check_poll(*cursor, &body);
            *cursor = next;
            let found = messages.iter().find(|m| wanted(m)).cloned();
            seen.extend(messages);
            if let Some(message) = found {
                return message;
            }
        }
    }
}

/// A JSON-RPC call as a long-poll session posts it.
fn message(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// `tickets.reserve` params for `quantity` of one ticket type.
fn reserve(tt: &Value, quantity: u64) -> Value {
    json!({"items": [{"ticket_type_id": tt, "quantity": quantity}]})
}

/// The `available` of the first pool in a `pool.update` or `pool.subscribe` answer.
fn available_in(pools: &Value) -> Option<u64> {
    pools["pools"][0]["available"].as_u64()
}

/// The next notification of `method` on the WebSocket that matches `wanted`, skipping
/// at most 50 others.
async fn ws_until(ws: &mut WsClient, method: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..50 {
        let notification = ws.notification(method).await;
        if wanted(&notification) {
            return notification;
        }
    }
    panic!("50 {method} notifications, none the one awaited");
}

// ---------------------------------------------------------------------------------------
// What clients were told
// ---------------------------------------------------------------------------------------

/// What the clients were told, to hold against the database afterwards.
#[derive(Default)]
struct Ledger {
    /// Acknowledged reservations: the status their last acknowledged change gave them,
    /// and their quantity.
    told: HashMap<String, (&'static str, u64)>,
    /// Calls answered UNAVAILABLE, and the slowest such answer among the timed ones.
    unavailable: u64,
    slowest_unavailable: Duration,
}

impl Ledger {
    fn merge(&mut self, other: Ledger) {
        self.told.extend(other.told);
        self.unavailable += other.unavailable;
        self.slowest_unavailable = self.slowest_unavailable.max(other.slowest_unavailable);
    }

    /// An error answer: UNAVAILABLE (within 5 s when `elapsed` is measured) or one of
    /// `also`; anything else fails the test.
    #[track_caller]
    fn refused(
        &mut self,
        method: &str,
        response: &Value,
        elapsed: Option<Duration>,
        also: &[&str],
    ) {
        let why = reason(response);
        if why == "UNAVAILABLE" {
            assert_error(response, 4002, "UNAVAILABLE");
            self.unavailable += 1;
            if let Some(elapsed) = elapsed {
                assert!(
                    elapsed <= UNAVAILABLE_WITHIN + SLACK,
                    "{method} answered UNAVAILABLE after {elapsed:?}, later than 5 s: {response}"
                );
                self.slowest_unavailable = self.slowest_unavailable.max(elapsed);
            }
        } else {
            assert!(
                also.contains(&why),
                "{method}: neither a success nor UNAVAILABLE nor one of {also:?}: {response}"
            );
        }
    }

    /// A `tickets.reserve` answer for `quantity`: the reservation id when it succeeded.
    #[track_caller]
    fn reserved(
        &mut self,
        response: &Value,
        quantity: u64,
        elapsed: Option<Duration>,
        also: &[&str],
    ) -> Option<String> {
        if !response["error"].is_null() {
            self.refused("tickets.reserve", response, elapsed, also);
            return None;
        }
        let reservation = &response["result"];
        assert_eq!(reservation["status"], "pending", "{response}");
        let id = reservation["id"].as_str().unwrap().to_owned();
        let fresh = self
            .told
            .insert(id.clone(), ("pending", quantity))
            .is_none();
        assert!(fresh, "two reserves answered with one id: {response}");
        Some(id)
    }

    /// A `payments.create` answer for reservation `id`: whether it succeeded.
    #[track_caller]
    fn paid(
        &mut self,
        id: &str,
        response: &Value,
        elapsed: Option<Duration>,
        also: &[&str],
    ) -> bool {
        if !response["error"].is_null() {
            self.refused("payments.create", response, elapsed, also);
            return false;
        }
        assert_eq!(
            response["result"]["reservation"]["status"], "paid",
            "{response}"
        );
        assert_eq!(
            response["result"]["payment"]["status"], "succeeded",
            "{response}"
        );
        self.told
            .get_mut(id)
            .expect("a reservation acknowledged first")
            .0 = "paid";
        true
    }

    /// A `reservations.cancel` answer for reservation `id`: whether it succeeded.
    #[track_caller]
    fn cancelled(&mut self, id: &str, response: &Value, elapsed: Option<Duration>) -> bool {
        if !response["error"].is_null() {
            self.refused("reservations.cancel", response, elapsed, &[]);
            return false;
        }
        assert_eq!(response["result"]["status"], "cancelled", "{response}");
        self.told
            .get_mut(id)
            .expect("a reservation acknowledged first")
            .0 = "cancelled";
        true
    }
}

/// Sends a call through `node` until it gets an answer other than UNAVAILABLE (each
/// UNAVAILABLE recorded, and answered within 5 s), for at most `within`; that answer.
async fn until_not_unavailable(
    node: &Endpoint,
    token: &str,
    method: &str,
    params: Value,
    within: Duration,
    ledger: &mut Ledger,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (response, elapsed) = node.timed(token, method, params.clone()).await;
        if response["error"].is_null() || reason(&response) != "UNAVAILABLE" {
            return (response, elapsed);
        }
        ledger.refused(method, &response, Some(elapsed), &[]);
        assert!(
            started.elapsed() < within,
            "{method} through {} still answered UNAVAILABLE after {within:?}",
            node.addr
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

// ---------------------------------------------------------------------------------------
// 1. Races across servers
// ---------------------------------------------------------------------------------------

const POOL: u64 = 100;
const BUYERS: usize = 300;

/// `BUYERS` buyers, spread over every node, reserve `quantity` of a fresh pool of `POOL`
/// (created through node `via`) under `rule` at the same moment: exactly the pool is
/// sold, every refusal is INSUFFICIENT_TICKETS, and every node and the database agree.
async fn race(cluster: &Cluster, via: usize, tokens: &[String], rule: Value, quantity: u64) {
    let nodes = cluster.nodes.len();
    let (event_id, tts) = cluster
        .create_event(via, &[(POOL as u32, rule.clone())])
        .await;
    // Once owned, the pool's version only moves with sales.
    cluster.owner(&event_id).await;
    let (_, version) = cluster.node(0).pool(&event_id).await;
    let params = reserve(&tts[0], quantity);
    let start = Arc::new(tokio::sync::Barrier::new(tokens.len()));
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(n, token)| {
            let (node, token) = (cluster.node(n % nodes), token.clone());
            let (params, start) = (params.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                node.call(Some(&token), "tickets.reserve", params).await
            })
        })
        .collect();
    let mut reserved = HashSet::new();
    let mut refused = 0;
    for response in join_all(tasks).await {
        let response = response.unwrap();
        if response["error"].is_null() {
            let id = response["result"]["id"].as_str().unwrap().to_owned();
            assert!(reserved.insert(id), "one id for two reserves: {response}");
        } else {
            assert_error(&response, 2001, "INSUFFICIENT_TICKETS");
            let left = response["error"]["data"]["available"].as_u64().unwrap();
            assert!(
                left < quantity,
                "{rule}: refused with {left} left: {response}"
            );
            refused += 1;
        }
    }
    let winners = (POOL / quantity) as usize;
    assert_eq!(reserved.len(), winners, "{rule}: successes");
    assert_eq!(refused, BUYERS - winners, "{rule}: refusals");

    for index in 0..nodes {
        let node = cluster.node(index);
        let expected = (0, version + winners as u64);
        poll_until(
            VISIBLE_WITHIN,
            &format!("{rule}: node {index} to show {expected:?} (available, version)"),
            || async { (node.pool(&event_id).await == expected).then_some(()) },
        )
        .await;
    }
    let stored = cluster.stored(&event_id).await;
    let ids: HashSet<String> = stored.reservations.keys().cloned().collect();
    assert_eq!(
        ids, reserved,
        "{rule}: the database holds exactly the successes"
    );
    assert_eq!(stored.with_status("pending"), winners, "{rule}");
    assert_eq!(stored.held(), POOL, "{rule}: tickets held in the database");
}

async fn buyers_on_three_servers_get_exactly_the_pool(cluster: &mut Cluster) {
    let tokens = cluster.customers(BUYERS).await;
    race(cluster, 0, &tokens, json!({"kind": "any"}), 1).await;
    // Pairs from 100: availability steps 100, 98, …, 0, never leaving one, so every
    // refusal is for want of tickets, never the rule.
    race(cluster, 1, &tokens, json!({"kind": "avoid_one"}), 2).await;
    race(cluster, 2, &tokens, json!({"kind": "multiple", "of": 2}), 2).await;
}

/// 300 buyers, a third on each server, race for a pool of 100 under `any` (singles),
/// `avoid_one` (pairs) and `multiple` of 2 (pairs): exactly 100 tickets are sold each time,
/// the rest are INSUFFICIENT_TICKETS, and every server and the database agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_buyers_on_three_servers_get_exactly_the_pool_under_each_rule() {
    with_cluster(3, Duration::from_secs(600), |c| {
        Box::pin(buyers_on_three_servers_get_exactly_the_pool(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Notifications across servers
// ---------------------------------------------------------------------------------------

async fn notifications_cross_servers(cluster: &mut Cluster) {
    let (event_id, tts) = cluster
        .create_event(0, &[(20, json!({"kind": "any"}))])
        .await;
    let tt = &tts[0];
    // B owns the event; the buyer reserves and pays through A, and a watcher sits on C.
    let b = cluster.owner(&event_id).await;
    let (a, c) = ((b + 1) % 3, (b + 2) % 3);
    let (node_a, node_b, node_c) = (cluster.node(a), cluster.node(b), cluster.node(c));

    // One database of users, one secret: registered on A, logged in on B, A's token
    // accepted on C.
    let account = json!({"email": "traveller@example.com", "password": "traveller-password"});
    let registered = node_a.ok(None, "auth.register", account.clone()).await;
    let logged_in = node_b.ok(None, "auth.login", account).await;
    assert_eq!(logged_in["user"], registered["user"]);
    let token_a = registered["token"].as_str().unwrap().to_owned();
    let token_b = logged_in["token"].as_str().unwrap().to_owned();
    let mine = node_c
        .ok(Some(&token_a), "reservations.list", json!({}))
        .await;
    assert_eq!(mine, json!({"reservations": []}));
    // The route of forwarded calls takes only the tokens servers sign for them, and only
    // the calls servers forward; those tokens are good nowhere else.
    let forwarded_token = Tokens::new(JWT_SECRET.as_bytes(), Duration::from_secs(60))
        .issue_forwarded(
            registered["user"]["id"].as_str().unwrap().parse().unwrap(),
            Role::Customer,
            SystemClock.now(),
            Duration::from_secs(60),
            None,
        );
    let cancel = json!({"jsonrpc": "2.0", "id": 1, "method": "reservations.cancel",
        "params": {"reservation_id": uuid::Uuid::new_v4().to_string()}});
    let login = json!({"jsonrpc": "2.0", "id": 1, "method": "auth.login",
        "params": {"email": "traveller@example.com", "password": "traveller-password"}});
    for (token, body, status) in [
        (None, cancel.clone(), 401),
        (Some(&token_a), cancel.clone(), 401),
        (Some(&forwarded_token), login.clone(), 404),
        (Some(&forwarded_token), json!([cancel.clone()]), 404),
        (Some(&forwarded_token), cancel.clone(), 200),
    ] {
        let mut request = node_b.http.post(node_b.url("/cluster/rpc")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        if status == 200 {
            let answer: Value = response.json().await.unwrap();
            assert_error(&answer, 1004, "NOT_FOUND");
        }
    }
    let refused = node_c
        .call(Some(&forwarded_token), "reservations.list", json!({}))
        .await;
    assert_error(&refused, 1001, "UNAUTHENTICATED");

    // Watchers: a WebSocket on C, a long-poll session on B.
    let mut watcher = node_c.ws(None).await;
    let snapshot = watcher
        .ok("pool.subscribe", json!({"event_id": event_id}))
        .await;
    assert_eq!(available_in(&snapshot), Some(20), "{snapshot}");
    let version = snapshot["pools"][0]["version"].as_u64().unwrap();
    let lp_watcher = node_b.lp_open(None).await;
    let (status, subscribed) = node_b
        .lp_post(
            &lp_watcher,
            message(1, "pool.subscribe", json!({"event_id": event_id})),
        )
        .await
        .expect("POST /lp answered");
    assert_eq!(status, 200, "{subscribed}");
    assert_eq!(
        available_in(&subscribed["result"]),
        Some(20),
        "{subscribed}"
    );
    // The buyer: a WebSocket on A and one on B, and a long-poll session on C.
    let mut buyer_a = node_a.ws(Some(&token_a)).await;
    let mut buyer_b = node_b.ws(Some(&token_b)).await;
    let buyer_lp = node_c.lp_open(Some(&token_a)).await;

    let forwarded = "ticket_api_cluster_forwarded_total";
    let forwarded_before = cluster.metric_sum(&[0, 1, 2], forwarded).await;
    let reservation = buyer_a.ok("tickets.reserve", reserve(tt, 3)).await;
    assert_eq!(reservation["status"], "pending");
    let id = reservation["id"].clone();

    let update = ws_until(&mut watcher, "pool.update", |n| {
        available_in(&n["params"]) == Some(17)
    })
    .await;
    assert_eq!(update["params"]["subscription"], snapshot["subscription"]);
    assert_eq!(update["params"]["event_id"], event_id);
    assert!(
        update["params"]["pools"][0]["version"].as_u64().unwrap() > version,
        "{update}"
    );
    let (mut cursor, mut seen) = (0, Vec::new());
    node_b
        .lp_until(
            &lp_watcher,
            &mut cursor,
            &mut seen,
            "pool.update to 17",
            |m| m["method"] == "pool.update" && available_in(&m["params"]) == Some(17),
        )
        .await;

    // Paid through A: every connection and session of the buyer hears of it, wherever it is.
    let paid = buyer_a
        .ok(
            "payments.create",
            json!({"reservation_id": id, "payment_token": "tok_ok"}),
        )
        .await;
    assert_eq!(paid["reservation"]["status"], "paid");
    // The first reservation.updated B's connection gets is this one: none for the
    // pending reservation (PROTOCOL §6).
    let on_b = buyer_b.notification("reservation.updated").await;
    assert_eq!(on_b["params"]["reservation"]["id"], id, "{on_b}");
    assert_eq!(on_b["params"]["reservation"]["status"], "paid", "{on_b}");
    let on_a = buyer_a.notification("reservation.updated").await;
    assert_eq!(on_a["params"]["reservation"], on_b["params"]["reservation"]);
    let (mut cursor, mut seen) = (0, Vec::new());
    let on_c = node_c
        .lp_until(
            &buyer_lp,
            &mut cursor,
            &mut seen,
            "reservation.updated",
            |m| m["method"] == "reservation.updated",
        )
        .await;
    assert_eq!(on_c["params"]["reservation"], on_b["params"]["reservation"]);

    // Each node reports on the cluster; the owner owns something; the reserve through A
    // was forwarded.
    for index in 0..3 {
        let text = cluster.node(index).metrics().await;
        for name in [
            "ticket_api_cluster_owned_events",
            "ticket_api_cluster_forwarded_total",
            "ticket_api_cluster_takeovers_total",
        ] {
            assert!(sample(&text, name).is_some(), "{name} on node {index}");
        }
    }
    let owned = cluster
        .metric_sum(&[b], "ticket_api_cluster_owned_events")
        .await;
    assert!(owned >= 1.0, "the owner owns {owned} events");
    let forwarded_after = cluster.metric_sum(&[0, 1, 2], forwarded).await;
    assert!(
        forwarded_after > forwarded_before,
        "{forwarded}: {forwarded_before} before a reserve through a non-owner, {forwarded_after} after"
    );
}

/// A buyer registered on A and logged in on B reserves through A an event owned by B: a
/// watcher on C (WebSocket) and one on B (long-poll) see the pool change; the payment
/// through A reaches the buyer's connections on A and B and its long-poll session on C;
/// the servers' metrics report ownership and forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_updates_and_reservation_updates_reach_every_server_over_websocket_and_long_poll() {
    with_cluster(3, Duration::from_secs(600), |c| {
        Box::pin(notifications_cross_servers(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. The owner SIGKILLed under load
// ---------------------------------------------------------------------------------------

/// Reserves one ticket after another through `node`, paying every other one, until
/// `stop` (or 3,000 rounds, or 60 s); what it was told.
async fn stream(
    node: Endpoint,
    token: String,
    tt: Value,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
) -> Ledger {
    let started = Instant::now();
    let mut ledger = Ledger::default();
    for round in 0..3_000 {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let (response, elapsed) = node.timed(&token, "tickets.reserve", reserve(&tt, 1)).await;
        let Some(id) = ledger.reserved(&response, 1, Some(elapsed), &[]) else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        acknowledged.fetch_add(1, Ordering::SeqCst);
        if round % 2 == 0 {
            let pay = json!({"reservation_id": id, "payment_token": "tok_ok"});
            let (response, elapsed) = node.timed(&token, "payments.create", pay).await;
            // A reserve acknowledged just before the kill may expire during the takeover.
            if ledger.paid(&id, &response, Some(elapsed), &["RESERVATION_EXPIRED"]) {
                acknowledged.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    ledger
}

async fn owner_killed_under_load(cluster: &mut Cluster) {
    const CAPACITY: u64 = 100_000;
    let (event_id, tts) = cluster
        .create_event(0, &[(CAPACITY as u32, json!({"kind": "any"}))])
        .await;
    let tt = tts[0].clone();
    let owner = cluster.owner(&event_id).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let tokens = cluster.customers(6).await;
    let takeovers = "ticket_api_cluster_takeovers_total";
    let takeovers_before = cluster.metric_sum(&survivors, takeovers).await;

    // Reservations and payments stream in through the two other servers.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(n, token)| {
            tokio::spawn(stream(
                cluster.node(survivors[n % 2]),
                token.clone(),
                tt.clone(),
                Arc::clone(&stop),
                Arc::clone(&acknowledged),
            ))
        })
        .collect();
    poll_until(
        Duration::from_secs(20),
        "60 acknowledged changes before the kill",
        || async { (acknowledged.load(Ordering::SeqCst) >= 60).then_some(()) },
    )
    .await;
    // A reserve with the client's idempotency key, through a survivor, just before the kill.
    let mut ledger = Ledger::default();
    let keyed = json!({
        "items": [{"ticket_type_id": tt, "quantity": 1}],
        "idempotency_key": "before-the-kill",
    });
    let other = cluster.node(survivors[1]);
    let (first, elapsed) = other
        .timed(&tokens[1], "tickets.reserve", keyed.clone())
        .await;
    ledger
        .reserved(&first, 1, Some(elapsed), &[])
        .expect("a keyed reserve before the kill");
    cluster.kill(owner).await;
    let killed_at = Instant::now();

    // Retried at once, while no server owns the event: the key's stored result, as the
    // owner would have replayed it, within the forwarding deadline.
    let (again, elapsed) = other.timed(&tokens[1], "tickets.reserve", keyed).await;
    assert_eq!(again["result"]["id"], first["result"]["id"], "{again}");
    assert!(elapsed <= UNAVAILABLE_WITHIN + SLACK, "{elapsed:?}");

    // Within 10 s of the kill, a reserve through a survivor succeeds.
    let survivor = cluster.node(survivors[0]);
    let (response, elapsed) = until_not_unavailable(
        &survivor,
        &tokens[0],
        "tickets.reserve",
        reserve(&tt, 1),
        TAKEOVER,
        &mut ledger,
    )
    .await;
    ledger
        .reserved(&response, 1, Some(elapsed), &[])
        .expect("a reserve through a survivor after the takeover");
    let recovered = killed_at.elapsed();
    assert!(
        recovered <= TAKEOVER + SLACK,
        "the first successful reserve came {recovered:?} after the kill"
    );
    let after = acknowledged.load(Ordering::SeqCst) + 30;
    poll_until(
        TAKEOVER,
        "30 more acknowledged changes after the takeover",
        || async { (acknowledged.load(Ordering::SeqCst) >= after).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for stream in join_all(streams).await {
        ledger.merge(stream.unwrap());
    }
    eprintln!(
        "owner killed: {} acknowledged, {} UNAVAILABLE (slowest {:?}), first success {recovered:?} after the kill",
        ledger.told.len(),
        ledger.unavailable,
        ledger.slowest_unavailable
    );

    // Everything acknowledged is in the database, nothing else is, nothing counted twice.
    cluster
        .audit(&event_id, &ledger, CAPACITY, &survivors)
        .await;

    // The pending reservations still expire, those of the dead owner included, and their
    // tickets come back: in the end only the paid ones hold any.
    poll_until(
        cluster.ttl + TAKEOVER,
        "every pending reservation to expire",
        || async {
            let stored = cluster.stored(&event_id).await;
            (stored.with_status("pending") == 0).then_some(())
        },
    )
    .await;
    let stored = cluster.stored(&event_id).await;
    for (id, (told, _)) in &ledger.told {
        let status = &stored.reservations[id].0;
        let expected = if *told == "paid" { "paid" } else { "expired" };
        assert_eq!(status, expected, "reservation {id}, told {told}");
    }
    cluster.settled(&event_id, CAPACITY, &survivors).await;
    let takeovers_after = cluster.metric_sum(&survivors, takeovers).await;
    assert!(
        takeovers_after > takeovers_before,
        "{takeovers} on the survivors: {takeovers_before} before the kill, {takeovers_after} after"
    );
}

/// The owner of an event is SIGKILLed while reservations and payments stream in through
/// the two others: every call is answered (UNAVAILABLE within 5 s, or a success), a reserve
/// succeeds again within 10 s, every answer agrees with the database, nothing is counted
/// twice, and the pending reservations, the dead owner's included, still expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_owner_loses_nothing_acknowledged_and_a_survivor_carries_its_event() {
    with_cluster(3, Duration::from_secs(3), |c| {
        Box::pin(owner_killed_under_load(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. A stale owner: frozen past its lease, then resumed
// ---------------------------------------------------------------------------------------

async fn stale_owner_resumed(cluster: &mut Cluster) {
    const CAPACITY: u64 = 30;
    let (event_id, tts) = cluster
        .create_event(0, &[(CAPACITY as u32, json!({"kind": "any"}))])
        .await;
    let pair = reserve(&tts[0], 2);
    let owner = cluster.owner(&event_id).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let tokens = cluster.customers(8).await;
    let stale = cluster.node(owner);
    let mut ledger = Ledger::default();

    // 5 pairs through the owner itself: 20 tickets left. The first is cancelled later.
    let mut before = Vec::new();
    for token in &tokens[..5] {
        let (response, elapsed) = stale.timed(token, "tickets.reserve", pair.clone()).await;
        let id = ledger.reserved(&response, 2, Some(elapsed), &[]);
        before.push(id.expect("a reserve through the owner before it froze"));
    }
    let first = before.swap_remove(0);

    cluster.signal(owner, "-STOP").await;
    // Calls sent to the frozen owner wait in its sockets; it handles them when it
    // resumes, with the view it had before the takeover.
    let queued: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (stale, token, pair) = (stale.clone(), token.clone(), pair.clone());
            tokio::spawn(async move {
                stale
                    .try_call(
                        Some(&token),
                        "tickets.reserve",
                        pair,
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("a call queued at the frozen owner: {e}"))
            })
        })
        .collect();

    // Another node takes the event over, and sells what is left through the survivors.
    let new_owner = cluster.new_owner(&event_id, owner).await;
    assert!(survivors.contains(&new_owner));
    let mut drained = false;
    let started = Instant::now();
    for attempt in 0..100 {
        assert!(
            started.elapsed() < TAKEOVER,
            "the survivors did not sell the rest within {TAKEOVER:?}"
        );
        let node = cluster.node(survivors[attempt % 2]);
        let token = &tokens[attempt % tokens.len()];
        let (response, elapsed) = node.timed(token, "tickets.reserve", pair.clone()).await;
        ledger.reserved(&response, 2, Some(elapsed), &["INSUFFICIENT_TICKETS"]);
        if !response["error"].is_null() && reason(&response) == "INSUFFICIENT_TICKETS" {
            drained = true;
            break;
        }
        if !response["error"].is_null() {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    assert!(drained, "the pool never ran out through the survivors");
    let sold: u64 = ledger.told.values().map(|(_, quantity)| quantity).sum();
    assert_eq!(sold, CAPACITY, "acknowledged before the resume");

    cluster.signal(owner, "-CONT").await;
    // What was queued at the stale owner is answered now: refused, or (the audit checks)
    // a success that is in the database and within capacity.
    for call in join_all(queued).await {
        let response = call.unwrap();
        ledger.reserved(&response, 2, None, &["INSUFFICIENT_TICKETS"]);
    }

    // The resumed server still answers, from the new owner's state.
    let token = &tokens[0];
    let (response, elapsed) = until_not_unavailable(
        &stale,
        token,
        "tickets.reserve",
        pair.clone(),
        TAKEOVER,
        &mut ledger,
    )
    .await;
    ledger.reserved(&response, 2, Some(elapsed), &["INSUFFICIENT_TICKETS"]);
    let cancel = json!({"reservation_id": first});
    let (response, elapsed) = until_not_unavailable(
        &stale,
        token,
        "reservations.cancel",
        cancel,
        TAKEOVER,
        &mut ledger,
    )
    .await;
    assert!(
        ledger.cancelled(&first, &response, Some(elapsed)),
        "{response}"
    );
    let (response, elapsed) = until_not_unavailable(
        &stale,
        token,
        "tickets.reserve",
        pair.clone(),
        TAKEOVER,
        &mut ledger,
    )
    .await;
    ledger
        .reserved(&response, 2, Some(elapsed), &[])
        .expect("the cancelled pair, reserved again through the resumed server");

    cluster
        .audit(&event_id, &ledger, CAPACITY, &[0, 1, 2])
        .await;
    assert_eq!(
        cluster.stored(&event_id).await.held(),
        CAPACITY,
        "sold out, one pair given back and taken again"
    );
}

/// The owner of an event is frozen (SIGSTOP) with calls queued at it until another server
/// takes the event over and sells the rest; resumed (SIGCONT), it commits nothing on its
/// stale view: every success anyone answered is in the database, nothing is oversold, and
/// calls through the resumed server are served from the new owner's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_resumed_after_its_lease_commits_nothing_and_oversells_nothing() {
    with_cluster(3, Duration::from_secs(600), |c| {
        Box::pin(stale_owner_resumed(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Long-poll without sticky sessions
// ---------------------------------------------------------------------------------------

async fn long_poll_through_any_server(cluster: &mut Cluster) {
    const CAPACITY: u64 = 50;
    let (event_id, tts) = cluster
        .create_event(0, &[(CAPACITY as u32, json!({"kind": "any"}))])
        .await;
    let tt = &tts[0];
    let buyer = cluster.customers(1).await.remove(0);
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    // Opened on A, subscribed through B.
    let session = a.lp_open(None).await;
    let (status, subscribed) = b
        .lp_post(
            &session,
            message(1, "pool.subscribe", json!({"event_id": event_id})),
        )
        .await
        .expect("POST /lp answered");
    assert_eq!(status, 200, "{subscribed}");
    assert_eq!(available_in(&subscribed["result"]), Some(CAPACITY));
    let subscription = subscribed["result"]["subscription"].clone();

    // Polled through C.
    let (mut cursor, mut seen) = (0, Vec::new());
    c.ok(Some(&buyer), "tickets.reserve", reserve(tt, 1)).await;
    c.lp_until(&session, &mut cursor, &mut seen, "available 49", |m| {
        available_in(&m["params"]) == Some(CAPACITY - 1)
    })
    .await;

    // A response lost: a GET through C whose answer the client never reads…
    a.ok(Some(&buyer), "tickets.reserve", reserve(tt, 2)).await;
    let mut lost = Vec::new();
    for _ in 0..10 {
        let (status, body) = c.lp_get(&session, cursor).await.expect("GET answered");
        assert_eq!(status, 200, "{body}");
        lost = LongPollClient::check_poll(cursor, &body).1;
        if !lost.is_empty() {
            break;
        }
    }
    assert!(
        !lost.is_empty(),
        "the second reserve never reached the session"
    );
    // …and the re-poll through A with the old cursor gets the same messages again.
    let (status, body) = a.lp_get(&session, cursor).await.expect("GET answered");
    assert_eq!(status, 200, "{body}");
    let (next, again) = LongPollClient::check_poll(cursor, &body);
    assert!(
        again.len() >= lost.len() && again[..lost.len()] == lost[..],
        "a message once handed out never changes: lost {lost:?}, re-polled {again:?}"
    );
    cursor = next;
    seen.extend(again);

    b.ok(Some(&buyer), "tickets.reserve", reserve(tt, 1)).await;
    b.lp_until(&session, &mut cursor, &mut seen, "available 46", |m| {
        available_in(&m["params"]) == Some(CAPACITY - 4)
    })
    .await;
    // Nothing more is owed: the next poll times out empty, whichever server it goes to.
    let (status, body) = c.lp_get(&session, cursor).await.expect("GET answered");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"cursor": cursor, "messages": []}));

    // Every message once, in order: seqs 1, 2, … (checked per poll), one subscription,
    // versions strictly increasing, availability only going down.
    assert_eq!(seen.len() as u64, cursor, "{seen:?}");
    let mut last: Option<(u64, u64)> = None;
    for message in &seen {
        assert_eq!(message["method"], "pool.update", "{message}");
        assert_eq!(message["params"]["subscription"], subscription, "{message}");
        let pool = &message["params"]["pools"][0];
        let now = (
            pool["version"].as_u64().unwrap(),
            pool["available"].as_u64().unwrap(),
        );
        if let Some((version, available)) = last {
            assert!(now.0 > version && now.1 < available, "{seen:?}");
        }
        last = Some(now);
    }

    // The server holding the session dies: through the others it answers 410.
    cluster.kill(0).await;
    let expired = json!({"error": "SESSION_EXPIRED"});
    poll_until(TAKEOVER, "the session to answer 410 through C", || async {
        let (status, body) = c.lp_get(&session, cursor).await?;
        (status == 410).then_some(body)
    })
    .await;
    let (status, body) = c.lp_get(&session, cursor).await.expect("GET answered");
    assert_eq!((status, body), (410, expired.clone()));
    let (status, body) = b
        .lp_post(
            &session,
            message(2, "pool.unsubscribe", json!({"subscription": subscription})),
        )
        .await
        .expect("POST answered");
    assert_eq!((status, body), (410, expired));
}

/// A long-poll session opened on A, subscribed through B and polled through C, A and B
/// gets every message once and in order, a lost response included; once A is killed, the
/// session answers 410 through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_session_works_through_any_server_and_expires_with_its_server() {
    with_cluster(3, Duration::from_secs(600), |c| {
        Box::pin(long_poll_through_any_server(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. Refusals at start
// ---------------------------------------------------------------------------------------

/// Runs the binary with `args` (and `--listen 127.0.0.1:0`) and asserts it refuses to
/// start: exit code 2 and one line on stderr, within 30 s. Returns that line.
async fn assert_refused(cluster: &Cluster, args: Vec<String>) -> String {
    let mut command = cluster.command();
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output: Output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} still running after 30 s: it should refuse"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    stderr
}

/// Node `id`'s settings: the common ones and the cluster ones.
fn clustered(cluster: &Cluster, id: &str) -> Vec<String> {
    let mut args = cluster.common_args(id);
    args.extend(cluster.cluster_args(id));
    args
}

async fn servers_in_and_out_of_cluster_mode(cluster: &mut Cluster) {
    // A server outside cluster mode holds the database: neither a second one nor a
    // cluster server may join it.
    let (mut first, _) = cluster
        .spawn_server("plain-1", cluster.common_args("plain-1"))
        .await;
    assert_refused(cluster, cluster.common_args("plain-2")).await;
    assert_refused(cluster, clustered(cluster, "node-x")).await;
    first.kill().await.unwrap();

    // Cluster servers hold it: a server outside cluster mode may not join them.
    let node = cluster.spawn_node(NODE_IDS[0]).await;
    cluster.nodes.push(node);
    assert_refused(cluster, cluster.common_args("plain-3")).await;
}

/// A database held by a server outside cluster mode refuses a second such server and a
/// cluster server; one held by a cluster server refuses a server outside cluster mode:
/// exit code 2 and one line each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_held_in_or_out_of_cluster_mode_is_refused_by_the_other_mode() {
    with_cluster(0, Duration::from_secs(600), |c| {
        Box::pin(servers_in_and_out_of_cluster_mode(c))
    })
    .await;
}

async fn cluster_needs_postgres_and_redis(cluster: &mut Cluster) {
    let id = "node-x";
    let sqlite = cluster.dir.path().join("cluster.db");
    let without = |flag: &str| -> Vec<String> {
        let mut args = clustered(cluster, id);
        let at = args.iter().position(|a| a == flag).unwrap();
        args.drain(at..at + 2);
        args
    };
    // No --database-url: the embedded SQLite file.
    let line = assert_refused(cluster, without("--database-url")).await;
    assert!(line.contains("--cluster"), "{line}");
    let mut on_sqlite = without("--database-url");
    on_sqlite.extend([
        "--database-url".to_owned(),
        format!("sqlite://{}?mode=rwc", sqlite.display()),
    ]);
    let line = assert_refused(cluster, on_sqlite).await;
    assert!(line.contains("--cluster"), "{line}");
    let line = assert_refused(cluster, without("--redis-url")).await;
    assert!(line.contains("--cluster"), "{line}");
}

/// `--cluster` on the embedded SQLite file, on a `sqlite:` URL, or without `--redis-url`
/// stops at start: exit code 2, one line naming `--cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_without_postgres_or_without_redis_exits_with_code_2() {
    with_cluster(0, Duration::from_secs(600), |c| {
        Box::pin(cluster_needs_postgres_and_redis(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. Events imported from a file beside running cluster servers
// ---------------------------------------------------------------------------------------

async fn imported_events_reach_every_server(cluster: &mut Cluster) {
    let file = cluster.dir.path().join("import.json");
    let params = event_with_types("Imported", &[(5, json!({"kind": "any"}))]);
    std::fs::write(&file, json!([params]).to_string()).unwrap();
    let mut import = cluster.command();
    import
        .args(["events", "import", &file.display().to_string()])
        .args(clustered(cluster, "importer"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::time::timeout(Duration::from_secs(30), import.output())
        .await
        .expect("events import finished within 30 s")
        .unwrap();
    assert!(
        output.status.success(),
        "events import beside cluster servers: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Every server lists it within VISIBLE_WITHIN, and it can be sold through any of them.
    let mut tt = Value::Null;
    for index in cluster.running() {
        let node = cluster.node(index);
        tt = poll_until(
            VISIBLE_WITHIN,
            &format!("the imported event on {}", cluster.nodes[index].id),
            || async {
                let listed = node.ok(None, "events.list", json!({})).await;
                listed["events"]
                    .as_array()?
                    .iter()
                    .find(|e| e["name"] == "Imported")
                    .map(|e| e["ticket_types"][0]["id"].clone())
            },
        )
        .await;
    }
    let tokens = cluster.customers(3).await;
    for (index, token) in cluster.running().into_iter().zip(&tokens) {
        let node = cluster.node(index);
        let (response, _) = until_not_unavailable(
            &node,
            token,
            "tickets.reserve",
            reserve(&tt, 1),
            TAKEOVER,
            &mut Ledger::default(),
        )
        .await;
        assert!(
            response["error"].is_null(),
            "reserve through {index}: {response}"
        );
    }
}

/// `events import` with `--cluster` runs beside cluster servers (a plain one would be
/// refused), and the events it creates are listed and sold by every server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_imported_beside_cluster_servers_are_served_by_every_server() {
    with_cluster(3, Duration::from_secs(600), |c| {
        Box::pin(imported_events_reach_every_server(c))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 9. A takeover that outlasts a lease
// ---------------------------------------------------------------------------------------

async fn takeover_longer_than_a_lease(cluster: &mut Cluster) {
    const CAPACITY: u64 = 1_000_000;
    // More than the Redis expiry's queue holds (32,768): the takeover must not drop keys.
    const PENDING: i64 = 40_000;
    let (event_id, tts) = cluster
        .create_event(0, &[(CAPACITY as u32, json!({"kind": "any"}))])
        .await;
    let tt = tts[0].clone();
    let owner = cluster.owner(&event_id).await;
    let survivor = 1 - owner;
    let token = cluster.customers(1).await.remove(0);
    let event = event_id.as_str().unwrap();

    // Pending reservations stored straight in the database, as an owner with a busy
    // on-sale behind it would leave them: the survivor must rebuild all of them.
    let mut db = sqlx::PgConnection::connect(&cluster.db_url).await.unwrap();
    let now = SystemClock.now().as_millis();
    sqlx::query(
        "INSERT INTO reservations \
         (id, user_id, event_id, status, total_amount, currency, created_at, expires_at, updated_at) \
         SELECT gen_random_uuid()::text, u.id, t.event_id, 'pending', t.price_amount, t.currency, \
                $2, $3, $2 \
         FROM generate_series(1, $4) AS g, ticket_types t, \
              (SELECT id FROM users WHERE role = 'customer' LIMIT 1) AS u \
         WHERE t.id = $1",
    )
    .bind(tt.as_str().unwrap())
    .bind(now)
    .bind(now + 600_000)
    .bind(PENDING)
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reservation_items (reservation_id, ticket_type_id, position, quantity, unit_price) \
         SELECT r.id, t.id, 0, 1, t.price_amount FROM reservations r, ticket_types t \
         WHERE r.event_id = $1 AND t.id = $2",
    )
    .bind(event)
    .bind(tt.as_str().unwrap())
    .execute(&mut db)
    .await
    .unwrap();
    let epoch = |row: sqlx::postgres::PgRow| row.get::<i64, _>("epoch");
    let epoch_query = "SELECT epoch FROM events WHERE id = $1";
    let epoch_before = epoch(
        sqlx::query(epoch_query)
            .bind(event)
            .fetch_one(&mut db)
            .await
            .unwrap(),
    );
    let takeovers = "ticket_api_cluster_takeovers_total";
    let takeovers_before = cluster.metric_sum(&[survivor], takeovers).await;

    // A lock on the reservations stalls the survivor's rebuild for longer than a lease.
    let mut blocker = sqlx::PgConnection::connect(&cluster.db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE reservations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    cluster.kill(owner).await;
    assert_eq!(cluster.new_owner(&event_id, owner).await, survivor);
    // The stimulus, not a wait for a condition: the rebuild is held a lease and more.
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    assert_eq!(
        cluster.owner_now(&event_id).await,
        Some(survivor),
        "the lease of an event being taken over is kept while the rebuild takes its time"
    );
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();

    let node = cluster.node(survivor);
    let (response, _) = until_not_unavailable(
        &node,
        &token,
        "tickets.reserve",
        reserve(&tt, 1),
        TAKEOVER,
        &mut Ledger::default(),
    )
    .await;
    assert!(response["error"].is_null(), "reserve: {response}");
    let (available, _) = node.pool(&event_id).await;
    assert_eq!(available, CAPACITY - PENDING as u64 - 1);

    // Every pending reservation is back under expiry: its Redis key is written again.
    let sample: Vec<String> = sqlx::query(
        "SELECT id FROM reservations WHERE event_id = $1 AND status = 'pending' \
         ORDER BY random() LIMIT 20",
    )
    .bind(event)
    .fetch_all(&mut db)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get("id"))
    .collect();
    for id in &sample {
        let key = format!("{}reservation:{id}", cluster.prefix);
        poll_until(
            Duration::from_secs(10),
            &format!("the expiry key of {id}"),
            || async {
                let ttl: i64 = cluster.redis.pttl(&key).await.unwrap();
                (ttl > 0).then_some(())
            },
        )
        .await;
    }

    // Taken over once: another lease later, the epoch was bumped once and the survivor
    // counts one takeover (a lapsed lease would have it give the event up and take it
    // over again).
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    let epoch_after = epoch(
        sqlx::query(epoch_query)
            .bind(event)
            .fetch_one(&mut db)
            .await
            .unwrap(),
    );
    assert_eq!(
        epoch_after,
        epoch_before + 1,
        "one takeover, one epoch bump"
    );
    let takeovers_after = cluster.metric_sum(&[survivor], takeovers).await;
    assert_eq!(takeovers_after, takeovers_before + 1.0);
    assert_eq!(cluster.owner_now(&event_id).await, Some(survivor));
    db.close().await.unwrap();
    let log = std::fs::read_to_string(cluster.log(cluster.nodes[survivor].id)).unwrap();
    assert!(
        !log.contains("queue full"),
        "the takeover overflowed the expiry queue"
    );
}

/// The survivor's rebuild of an event with 40,000 pending reservations is stalled for
/// longer than a lease: it keeps the lease meanwhile, takes the event over once, and puts
/// every pending reservation back under expiry without overflowing the Redis key queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_longer_than_a_lease_keeps_the_lease_and_happens_once() {
    with_cluster(2, Duration::from_secs(600), |c| {
        Box::pin(takeover_longer_than_a_lease(c))
    })
    .await;
}
