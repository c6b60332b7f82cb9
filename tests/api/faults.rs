//! Database faults (PROTOCOL §5, Durability): a COMMIT that loses its connection is settled
//! before anyone is answered, an outage is answered at once and recovered from on its own,
//! and after PostgreSQL is stopped and started under load every answer agrees with the
//! database. The connection cuts go through a proxy of the test's own on loopback; the
//! outages stop a PostgreSQL of the test's own, never the shared one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, Row};
use ticket_api::config::DatabaseUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::expiry::redis_expiry::free_port;
use crate::harness::{poll_until, reason, spawn_app, test_settings, TestApp};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn services_required() -> bool {
    std::env::var("TICKET_API_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A PostgreSQL cluster of the test's own (initdb in a temporary folder, its own port),
/// stopped with `-m immediate` when dropped.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

/// Runs a command line as the `postgres` user (initdb and the server refuse root).
fn as_postgres(command: &str) -> std::process::Output {
    Command::new("su")
        .args(["postgres", "-c", command])
        .output()
        .expect("run su")
}

impl PrivatePostgres {
    /// A fresh cluster, started; `None` (loudly) when PostgreSQL 15's binaries are missing.
    pub async fn start() -> Option<Self> {
        if !std::path::Path::new(&format!("{PG_BIN}/initdb")).exists() {
            assert!(
                !services_required(),
                "initdb is required (TICKET_API_REQUIRE_SERVICES=1) but missing in {PG_BIN}"
            );
            eprintln!("\n*** SKIPPED: no {PG_BIN}/initdb for a private PostgreSQL ***\n");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("chown")
            .args(["postgres:", &dir.path().display().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "chown the private cluster's folder");
        let output = as_postgres(&format!(
            "{PG_BIN}/initdb -D {}/data -U postgres --auth=trust -E UTF8 --no-sync",
            dir.path().display()
        ));
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pg = Self {
            dir,
            port: free_port(),
        };
        pg.start_again().await;
        Some(pg)
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub async fn start_again(&self) {
        let dir = self.dir.path().display();
        let output = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {dir}/data -l {dir}/server.log -w -t 60 \
             -o '-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off' start",
            self.port
        ));
        assert!(
            output.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let url = self.url();
        poll_until(
            Duration::from_secs(30),
            "the private PostgreSQL to answer",
            || async { sqlx::PgConnection::connect(&url).await.ok().map(|_| ()) },
        )
        .await;
    }

    /// `pg_ctl stop -m immediate`: every backend dies at once, mid-statement or mid-COMMIT.
    pub fn stop_immediate(&self) {
        let output = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {}/data -m immediate -w stop",
            self.dir.path().display()
        ));
        assert!(
            output.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {}/data -m immediate -w stop",
            self.dir.path().display()
        ));
    }
}

/// Where the proxy cuts the connection that sends the next `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The database never sees the COMMIT: the transaction is rolled back.
    BeforeCommit,
    /// The database commits and answers; the answer never reaches the server.
    AfterCommit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Armed(Cut),
    /// Every connection is closed and new ones are closed at once, until [`CutProxy::restore`].
    Down,
}

/// A TCP proxy on loopback in front of PostgreSQL that can cut one COMMIT deterministically.
pub struct CutProxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    up: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let up = Arc::new(watch::Sender::new(true));
        let task = tokio::spawn({
            let (mode, up) = (Arc::clone(&mode), Arc::clone(&up));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.lock().unwrap() == Mode::Down {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(pump(client, target, Arc::clone(&mode), Arc::clone(&up)));
                }
            }
        });
        Self {
            addr,
            mode,
            up,
            task,
        }
    }

    pub fn arm(&self, cut: Cut) {
        *self.mode.lock().unwrap() = Mode::Armed(cut);
    }

    pub fn is_down(&self) -> bool {
        *self.mode.lock().unwrap() == Mode::Down
    }

    pub fn restore(&self) {
        *self.mode.lock().unwrap() = Mode::Pass;
        self.up.send_replace(true);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.up.send_replace(false);
    }
}

fn go_down(mode: &Mutex<Mode>, up: &watch::Sender<bool>) {
    *mode.lock().unwrap() = Mode::Down;
    up.send_replace(false);
}

/// Relays one connection both ways, cutting it (and taking the proxy down) at an armed COMMIT.
async fn pump(
    mut client: TcpStream,
    target: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    up: Arc<watch::Sender<bool>>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let mut down = up.subscribe();
    let (mut from_client, mut from_server) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    let mut cut_at_answer = false;
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { return };
                let chunk = &from_client[..n];
                // sqlx sends COMMIT as a simple query: 'Q', its length, "COMMIT\0".
                let commit = chunk.windows(6).any(|w| w == b"COMMIT");
                let armed = match *mode.lock().unwrap() {
                    Mode::Armed(cut) if commit => Some(cut),
                    _ => None,
                };
                match armed {
                    Some(Cut::BeforeCommit) => return go_down(&mode, &up),
                    Some(Cut::AfterCommit) => cut_at_answer = true,
                    None => {}
                }
                if server.write_all(chunk).await.is_err() { return }
            }
            read = server.read(&mut from_server) => {
                let Ok(n @ 1..) = read else { return };
                if cut_at_answer {
                    // Committed: the answer is dropped with the connection.
                    return go_down(&mode, &up);
                }
                if client.write_all(&from_server[..n]).await.is_err() { return }
            }
            changed = down.changed() => {
                if changed.is_err() || !*down.borrow() { return }
            }
        }
    }
}

/// One call over `/rpc`, with a client and address that a spawned task can own.
async fn call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: &str,
    params: Value,
) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    http.post(format!("{base}/rpc"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET /health`: the status code, the body, and how long it took.
async fn health(app: &TestApp) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response = app.http.get(app.url("/health")).send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap();
    (status, body, started.elapsed())
}

/// Every reservation in the database `(status, quantity)` by id, and the payments'
/// reservation ids, read with a connection of the test's own.
async fn stored(url: &str) -> (HashMap<String, (String, u64)>, Vec<String>) {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let rows = sqlx::query(
        "SELECT r.id AS id, r.status AS status, CAST(SUM(i.quantity) AS BIGINT) AS quantity \
         FROM reservations r JOIN reservation_items i ON i.reservation_id = r.id GROUP BY r.id, r.status",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let reservations = rows
        .iter()
        .map(|row| {
            let quantity: i64 = row.get("quantity");
            (
                row.get::<String, _>("id"),
                (row.get::<String, _>("status"), quantity as u64),
            )
        })
        .collect();
    let payments = sqlx::query("SELECT reservation_id FROM payments")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>("reservation_id"))
        .collect();
    conn.close().await.unwrap();
    (reservations, payments)
}

/// What the clients were told, to hold against the database afterwards.
#[derive(Default)]
pub struct Ledger {
    /// Acknowledged reservations and the status their last acknowledged change gave them.
    pub status: HashMap<String, String>,
    /// Reserves answered with an error (they have no id: counted).
    pub refused_reserves: u64,
    /// Pays and cancels answered with an error, by reservation: the status must not be theirs.
    pub refused: Vec<(String, &'static str)>,
    /// Calls with no answer at all (a server killed mid-call): outcome unknown.
    pub unanswered: u64,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.status.extend(other.status);
        self.refused_reserves += other.refused_reserves;
        self.refused.extend(other.refused);
        self.unanswered += other.unanswered;
    }
}

/// Every acknowledged change is in the database with its status, nothing refused is, no pool
/// is above capacity, and the server's `available` is capacity − pending − paid.
pub async fn audit<F, Fut>(ledger: &Ledger, database_url: &str, capacity: u64, available: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let (rows, payments) = stored(database_url).await;
    for (id, status) in &ledger.status {
        let Some((stored, _)) = rows.get(id) else {
            panic!("acknowledged reservation {id} ({status}) is not in the database");
        };
        // A reservation left pending may have expired since.
        let expired = status == "pending" && stored == "expired";
        assert!(
            stored == status || expired,
            "reservation {id}: {stored}, told {status}"
        );
    }
    let unacknowledged = rows
        .keys()
        .filter(|id| !ledger.status.contains_key(*id))
        .count() as u64;
    assert!(
        unacknowledged <= ledger.unanswered,
        "{unacknowledged} reservations in the database were never acknowledged \
         ({} calls had no answer, {} reserves were refused)",
        ledger.unanswered,
        ledger.refused_reserves
    );
    for (id, refused) in &ledger.refused {
        if let Some((stored, _)) = rows.get(id) {
            assert_ne!(
                stored, refused,
                "refused {refused} of {id} is in the database"
            );
        }
    }
    let paid_rows = rows.values().filter(|(s, _)| s == "paid").count();
    assert_eq!(
        paid_rows,
        payments.len(),
        "one payment per paid reservation"
    );
    let held = held_in(&rows);
    assert!(held <= capacity, "{held} tickets held of {capacity}");
    // Expiries may commit while this looks: compare at a moment the database stood still.
    let mut last = (0, 0);
    for _ in 0..100 {
        let before = held_in(&stored(database_url).await.0);
        let shown = available().await;
        let after = held_in(&stored(database_url).await.0);
        if before == after && shown == capacity - after {
            return;
        }
        last = (shown, capacity - after);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, last.1, "available = capacity − pending − paid");
}

fn held_in(rows: &HashMap<String, (String, u64)>) -> u64 {
    rows.values()
        .filter(|(s, _)| s == "pending" || s == "paid")
        .map(|(_, q)| q)
        .sum()
}

/// Buyers that reserve one ticket, then pay, cancel or keep it, until `stop` (or `rounds`).
pub async fn buyers(
    base: String,
    tokens: Vec<String>,
    tt: Value,
    rounds: u64,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    refusals: Arc<AtomicU64>,
) -> Ledger {
    let workers = tokens.into_iter().enumerate().map(|(n, token)| {
        let (base, tt, stop) = (base.clone(), tt.clone(), Arc::clone(&stop));
        let (acknowledged, refusals) = (Arc::clone(&acknowledged), Arc::clone(&refusals));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let mut ledger = Ledger::default();
            for round in 0..rounds {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let reserve = json!({"items": [{"ticket_type_id": tt, "quantity": 1}]});
                let answer = match try_call(&http, &base, &token, "tickets.reserve", reserve).await
                {
                    Reply::Answer(answer) => answer,
                    Reply::Lost => {
                        ledger.unanswered += 1;
                        continue;
                    }
                    Reply::NotSent => break,
                };
                let Some(id) = answer["result"]["id"].as_str().map(str::to_owned) else {
                    assert_eq!(reason(&answer), "UNAVAILABLE", "{answer}");
                    ledger.refused_reserves += 1;
                    refusals.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                acknowledged.fetch_add(1, Ordering::SeqCst);
                ledger.status.insert(id.clone(), "pending".into());
                let (method, params, status) = match (round + n as u64) % 3 {
                    0 => (
                        "payments.create",
                        json!({"reservation_id": id, "payment_token": "tok_ok"}),
                        "paid",
                    ),
                    1 => (
                        "reservations.cancel",
                        json!({"reservation_id": id}),
                        "cancelled",
                    ),
                    _ => continue,
                };
                match try_call(&http, &base, &token, method, params).await {
                    Reply::Lost | Reply::NotSent => {
                        // Outcome unknown: either status may be in the database.
                        ledger.status.remove(&id);
                        ledger.unanswered += 1;
                    }
                    Reply::Answer(answer) if answer["error"].is_null() => {
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                        ledger.status.insert(id, status.into());
                    }
                    Reply::Answer(answer) => {
                        assert_eq!(reason(&answer), "UNAVAILABLE", "{method}: {answer}");
                        refusals.fetch_add(1, Ordering::SeqCst);
                        ledger.refused.push((id, status));
                    }
                }
            }
            ledger
        })
    });
    let mut ledger = Ledger::default();
    for worker in workers.collect::<Vec<_>>() {
        ledger.merge(worker.await.unwrap());
    }
    ledger
}

/// What became of a call to a server that may go away.
enum Reply {
    Answer(Value),
    /// Sent, but the connection ended first: its outcome is unknown.
    Lost,
    /// Never reached a server (nothing listens): the server is gone.
    NotSent,
}

async fn try_call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: &str,
    params: Value,
) -> Reply {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let response = match http
        .post(format!("{base}/rpc"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(error) if error.is_connect() => return Reply::NotSent,
        Err(_) => return Reply::Lost,
    };
    match response.json().await {
        Ok(answer) => Reply::Answer(answer),
        Err(_) => Reply::Lost,
    }
}

/// The database URL `url` with its address replaced by the proxy's.
fn through(url: &str, proxy: SocketAddr) -> String {
    let rest = url
        .strip_prefix("postgres://postgres@127.0.0.1:5432/")
        .unwrap();
    format!("postgres://postgres@{proxy}/{rest}?sslmode=disable")
}

/// Cuts the writer's connection at its COMMIT (before or after the database commits) and
/// checks the reserve in that batch is answered only once the database answers again, and
/// as the database says.
async fn a_cut_commit_is_settled_by_the_database(cut: Cut) {
    let Some((_, direct)) = crate::harness::fresh_postgres_database().await else {
        return;
    };
    let proxy = CutProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied = through(&direct, proxy.addr);
    // with_app makes a database of its own; this test points the server at `direct`.
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data_dir.path());
    settings.database_url = Some(DatabaseUrl::Postgres(proxied));
    let app = spawn_app(settings, data_dir).await;
    let admin = app.quick_admin().await;
    let (event_id, tts) = app
        .create_pools(&admin, &[(5, json!({"kind": "any"}))])
        .await;
    let (_, token) = app.quick_customer().await;
    let reserve = json!({"items": [{"ticket_type_id": tts[0], "quantity": 2}]});
    app.ok_as(&token, "tickets.reserve", reserve.clone()).await;

    proxy.arm(cut);
    let held = tokio::spawn({
        let (http, base, token, reserve) = (
            app.http.clone(),
            app.url(""),
            token.clone(),
            reserve.clone(),
        );
        async move { call(&http, &base, &token, "tickets.reserve", reserve).await }
    });
    poll_until(
        Duration::from_secs(10),
        "the proxy to cut the COMMIT",
        || async { proxy.is_down().then_some(()) },
    )
    .await;
    // The writer knows the database is gone: a new reserve is refused at once...
    poll_until(
        Duration::from_secs(5),
        "/health to report storage down",
        || async {
            let (status, body, _) = health(&app).await;
            (status == 503 && body["storage"] == "down").then_some(())
        },
    )
    .await;
    let refused = app
        .rpc("tickets.reserve", reserve.clone(), Some(&token))
        .await;
    assert_eq!(reason(&refused), "UNAVAILABLE", "{refused}");
    // ...but the reserve whose COMMIT was cut is neither answered nor undone.
    assert!(
        !held.is_finished(),
        "the cut reserve was answered before it was settled"
    );
    let (rows, _) = stored(&direct).await;
    let pending = rows.values().filter(|(s, _)| s == "pending").count();
    assert_eq!(
        pending,
        if cut == Cut::AfterCommit { 2 } else { 1 },
        "{rows:?}"
    );
    assert_eq!(
        app.pool(&event_id, 0).await.0,
        1,
        "its tickets stay held meanwhile"
    );

    proxy.restore();
    let answer = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("answered once the database is back")
        .unwrap();
    match cut {
        Cut::AfterCommit => {
            assert!(
                answer["error"].is_null(),
                "committed, so a success: {answer}"
            );
            let id = answer["result"]["id"].as_str().unwrap();
            assert_eq!(stored(&direct).await.0[id].0, "pending");
        }
        Cut::BeforeCommit => assert_eq!(reason(&answer), "UNAVAILABLE", "{answer}"),
    }
    let (rows, _) = stored(&direct).await;
    let held_tickets: u64 = rows.values().map(|(_, q)| q).sum();
    assert_eq!(
        app.pool(&event_id, 0).await.0,
        5 - held_tickets,
        "memory agrees with the database"
    );
    // And the server goes on as before.
    poll_until(Duration::from_secs(5), "/health to be ok again", || async {
        (health(&app).await.0 == 200).then_some(())
    })
    .await;
    let more = json!({"items": [{"ticket_type_id": tts[0], "quantity": 1}]});
    app.ok_as(&token, "tickets.reserve", more).await;
    app.app.shutdown.cancel();
    drop(proxy);
    let name = direct.rsplit('/').next().unwrap().to_owned();
    crate::harness::remove_postgres_database(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_whose_commit_lost_its_answer_succeeds_once_the_database_says_it_committed() {
    a_cut_commit_is_settled_by_the_database(Cut::AfterCommit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_whose_commit_never_arrived_is_unavailable_once_the_database_says_so() {
    a_cut_commit_is_settled_by_the_database(Cut::BeforeCommit).await;
}

/// Starts a server on a private PostgreSQL; `None` when there is none to be had.
async fn on_private_postgres() -> Option<(PrivatePostgres, TestApp)> {
    let pg = PrivatePostgres::start().await?;
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data_dir.path());
    settings.database_url = Some(DatabaseUrl::Postgres(pg.url()));
    let app = spawn_app(settings, data_dir).await;
    Some((pg, app))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_writes_and_health_answer_at_once_and_recovery_is_automatic() {
    let Some((pg, app)) = on_private_postgres().await else {
        return;
    };
    let admin = app.quick_admin().await;
    let (event_id, tts) = app
        .create_pools(&admin, &[(100, json!({"kind": "any"}))])
        .await;
    let (_, token) = app.quick_customer().await;
    let reserve = json!({"items": [{"ticket_type_id": tts[0], "quantity": 1}]});
    let kept = app.ok_as(&token, "tickets.reserve", reserve.clone()).await;

    pg.stop_immediate();
    // The first write finds out (a connection attempt); from then on the outage is known.
    let first = app
        .rpc("tickets.reserve", reserve.clone(), Some(&token))
        .await;
    assert_eq!(reason(&first), "UNAVAILABLE", "{first}");
    let mut writes = Vec::new();
    let mut checks = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let answer = if i % 2 == 0 {
            app.rpc("tickets.reserve", reserve.clone(), Some(&token))
                .await
        } else {
            let key = json!({"items": [{"ticket_type_id": tts[0], "quantity": 1}], "idempotency_key": format!("k{i}")});
            app.rpc("tickets.reserve", key, Some(&token)).await
        };
        writes.push(started.elapsed());
        assert_eq!(reason(&answer), "UNAVAILABLE", "{answer}");
        let cancel = app
            .rpc(
                "reservations.cancel",
                json!({"reservation_id": kept["id"]}),
                Some(&token),
            )
            .await;
        assert_eq!(reason(&cancel), "UNAVAILABLE", "{cancel}");
        let (status, body, took) = health(&app).await;
        assert_eq!((status, &body["storage"]), (503, &json!("down")), "{body}");
        checks.push(took);
    }
    writes.sort();
    checks.sort();
    eprintln!(
        "outage: UNAVAILABLE p50 {:?} max {:?}; /health 503 p50 {:?} max {:?}",
        writes[writes.len() / 2],
        writes[writes.len() - 1],
        checks[checks.len() / 2],
        checks[checks.len() - 1]
    );
    // Generous bounds (the figures above are what matters): no call waits for a connection.
    assert!(
        writes[writes.len() - 1] < Duration::from_secs(1),
        "{writes:?}"
    );
    assert!(
        checks[checks.len() - 1] < Duration::from_secs(1),
        "{checks:?}"
    );
    assert_eq!(
        app.pool(&event_id, 0).await.0,
        99,
        "nothing refused was taken"
    );

    pg.start_again().await;
    let back = Instant::now();
    poll_until(
        Duration::from_secs(10),
        "a reserve to succeed again",
        || async {
            let answer = app
                .rpc("tickets.reserve", reserve.clone(), Some(&token))
                .await;
            answer["error"].is_null().then_some(())
        },
    )
    .await;
    eprintln!(
        "outage: first success {:?} after PostgreSQL accepted connections",
        back.elapsed()
    );
    assert_eq!(health(&app).await.0, 200);
    let (rows, _) = stored(&pg.url()).await;
    assert_eq!(
        rows.len(),
        2,
        "the kept reservation and the one after the outage: {rows:?}"
    );
    assert_eq!(app.pool(&event_id, 0).await.0, 98);
    app.app.shutdown.cancel();
}

/// Fresh customers for the load, made directly in the database.
async fn customers(app: &TestApp, count: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for _ in 0..count {
        tokens.push(app.quick_customer().await.1);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load_leaves_every_answer_true() {
    const CAPACITY: u64 = 1_000_000;
    let Some((pg, app)) = on_private_postgres().await else {
        return;
    };
    let admin = app.quick_admin().await;
    let (event_id, tts) = app
        .create_pools(&admin, &[(CAPACITY as u32, json!({"kind": "any"}))])
        .await;
    let tokens = customers(&app, 16).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acknowledged, refusals) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = tokio::spawn(buyers(
        app.url(""),
        tokens,
        tts[0].clone(),
        5_000,
        Arc::clone(&stop),
        Arc::clone(&acknowledged),
        Arc::clone(&refusals),
    ));
    let at_least = |counter: &Arc<AtomicU64>, n: u64| {
        let counter = Arc::clone(counter);
        move || {
            let counter = Arc::clone(&counter);
            async move { (counter.load(Ordering::SeqCst) >= n).then_some(()) }
        }
    };
    poll_until(
        Duration::from_secs(30),
        "300 acknowledged changes",
        at_least(&acknowledged, 300),
    )
    .await;
    pg.stop_immediate();
    poll_until(
        Duration::from_secs(30),
        "50 refusals",
        at_least(&refusals, 50),
    )
    .await;
    pg.start_again().await;
    let before = acknowledged.load(Ordering::SeqCst);
    poll_until(
        Duration::from_secs(30),
        "300 more acknowledged changes",
        at_least(&acknowledged, before + 300),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let ledger = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("the buyers finish")
        .unwrap();
    assert_eq!(ledger.unanswered, 0, "every call gets an answer");
    audit(&ledger, &pg.url(), CAPACITY, || async {
        app.pool(&event_id, 0).await.0
    })
    .await;
    app.app.shutdown.cancel();
}
