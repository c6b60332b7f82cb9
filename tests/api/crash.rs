//! Crash safety with the real binary (PROTOCOL §5, Durability): every acknowledged
//! reservation, payment and cancellation survives a SIGKILL, availability is rebuilt from
//! them, and the pending ones still expire after the restart. On SQLite (a data folder) and
//! on a fresh PostgreSQL database.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{
    fresh_postgres_database, millis, poll_until, remove_postgres_database, Backend, WsClient,
    JWT_SECRET,
};

const TTL: Duration = Duration::from_secs(5);
const CAPACITY: u64 = 50;

/// Where the server keeps its data: a temporary folder, and a PostgreSQL URL or not.
struct Database {
    dir: tempfile::TempDir,
    url: Option<String>,
}

impl Database {
    /// The settings every run of the binary gets.
    fn settings(&self) -> Vec<String> {
        let mut args = vec![
            "--data-dir".to_owned(),
            self.dir.path().join("data").display().to_string(),
            "--jwt-secret".to_owned(),
            JWT_SECRET.to_owned(),
            "--reservation-ttl".to_owned(),
            format!("{}s", TTL.as_secs()),
            // These tests check durability, not the per-connection rate limit.
            "--rate-limit".to_owned(),
            "1000000".to_owned(),
            "--rate-burst".to_owned(),
            "1000000".to_owned(),
        ];
        if let Some(url) = &self.url {
            args.push("--database-url".to_owned());
            args.push(url.clone());
        }
        args
    }

    fn log(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("server-{run}.log"))
    }
}

/// The binary with a clean environment: only the settings given on the command line count.
fn ticket_api(db: &Database) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ticket-api"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TICKET_API_") || name == "DATABASE_URL" || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    command.current_dir(db.dir.path()).kill_on_drop(true);
    command
}

/// A running server process; killed (SIGKILL) when dropped, so a failing test leaves none.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn start(db: &Database, run: u32) -> Server {
        let log = std::fs::File::create(db.log(run)).unwrap();
        let mut child = ticket_api(db)
            .args(["--listen", "127.0.0.1:0"])
            .args(db.settings())
            .stdin(Stdio::null())
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
                "ticket-api ended before listening; see {}",
                db.log(run).display()
            );
        })
        .await
        .expect("ticket-api listening within 60 s");
        // Keep reading stdout, so the server never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, addr }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL ticket-api");
    }

    async fn rpc(&self, method: &str, params: Value, token: Option<&str>) -> Value {
        let mut request = reqwest::Client::new()
            .post(format!("http://{}/rpc", self.addr))
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn ok(&self, method: &str, params: Value, token: Option<&str>) -> Value {
        let response = self.rpc(method, params, token).await;
        assert!(response["error"].is_null(), "{method} failed: {response}");
        response["result"].clone()
    }

    async fn available(&self, event_id: &Value) -> u64 {
        let event = self
            .ok("events.get", json!({"event_id": event_id}), None)
            .await;
        event["ticket_types"][0]["available"].as_u64().unwrap()
    }

    async fn ws_as(&self, token: &str) -> WsClient {
        WsClient::connect(&format!("ws://{}/ws?token={token}", self.addr))
            .await
            .unwrap()
    }
}

/// Runs `test` on a fresh database of `backend`, then drops the database; on failure the
/// server logs are printed.
async fn with_database<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let (name, url) = match backend {
        Backend::Sqlite => (None, None),
        Backend::Postgres => match fresh_postgres_database().await {
            Some((name, url)) => (Some(name), Some(url)),
            None => return,
        },
    };
    let db = Arc::new(Database { dir, url });
    let outcome = AssertUnwindSafe(test(Arc::clone(&db))).catch_unwind().await;
    if let Some(name) = name {
        remove_postgres_database(&name).await;
    }
    if let Err(panic) = outcome {
        for run in 1..=2 {
            if let Ok(log) = std::fs::read_to_string(db.log(run)) {
                eprintln!("--- server run {run} log ---\n{log}");
            }
        }
        std::panic::resume_unwind(panic);
    }
}

fn by_id(list: &Value) -> std::collections::HashMap<String, Value> {
    list["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

/// What a test needs of a freshly started server: one event with one `any` ticket type of
/// `capacity`, and a logged-in customer.
struct Shop {
    event_id: Value,
    tt: Value,
    token: String,
}

/// Creates an admin with `ticket-api user add`, starts the server (run 1), creates the event
/// and registers a customer.
async fn open_shop(db: &Database, name: &str, capacity: u64) -> (Server, Shop) {
    let output = ticket_api(db)
        .args([
            "user",
            "add",
            "--email",
            "boss@example.com",
            "--password",
            "boss-password",
            "--admin",
        ])
        .args(db.settings())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let server = Server::start(db, 1).await;
    let admin = server
        .ok(
            "auth.login",
            json!({"email": "boss@example.com", "password": "boss-password"}),
            None,
        )
        .await;
    let admin = admin["token"].as_str().unwrap().to_owned();
    let params = crate::harness::event_params(name, capacity as u32, json!({"kind": "any"}));
    let event = server.ok("admin.events.create", params, Some(&admin)).await;
    let customer = server
        .ok(
            "auth.register",
            json!({"email": "buyer@example.com", "password": "buyer-password"}),
            None,
        )
        .await;
    let shop = Shop {
        event_id: event["id"].clone(),
        tt: event["ticket_types"][0]["id"].clone(),
        token: customer["token"].as_str().unwrap().to_owned(),
    };
    (server, shop)
}

async fn acknowledged_work_survives_sigkill_and_pending_reservations_still_expire(
    db: Arc<Database>,
) {
    let db = &*db;
    let (
        server,
        Shop {
            event_id,
            tt,
            token,
        },
    ) = open_shop(db, "Crash test", CAPACITY).await;
    let mut ws = server.ws_as(&token).await;

    let mut reservations = Vec::new();
    for _ in 0..20 {
        let reservation = ws
            .ok(
                "tickets.reserve",
                json!({"items": [{"ticket_type_id": tt, "quantity": 1}]}),
            )
            .await;
        assert_eq!(reservation["status"], "pending");
        reservations.push(reservation);
    }
    for reservation in &reservations[..7] {
        let paid = ws
            .ok(
                "payments.create",
                json!({"reservation_id": reservation["id"], "payment_token": "tok_ok"}),
            )
            .await;
        assert_eq!(paid["reservation"]["status"], "paid");
    }
    for reservation in &reservations[7..10] {
        let cancelled = ws
            .ok(
                "reservations.cancel",
                json!({"reservation_id": reservation["id"]}),
            )
            .await;
        assert_eq!(cancelled["status"], "cancelled");
    }
    // The last acknowledgement is in: kill at once, with no chance to flush anything.
    server.kill().await;
    drop(ws);

    let server = Server::start(db, 2).await;
    let first_expiry = reservations[10..]
        .iter()
        .map(|r| millis(&r["expires_at"]))
        .min()
        .unwrap();
    let list = server
        .ok("reservations.list", json!({}), Some(&token))
        .await;
    let available = server.available(&event_id).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        now < first_expiry,
        "too slow to see the pending reservations before their {TTL:?} TTL ran out \
         ({} ms late); the checks below would be meaningless",
        now - first_expiry
    );

    let listed = by_id(&list);
    assert_eq!(
        listed.len(),
        20,
        "every acknowledged reservation is there: {list}"
    );
    let listed_ids: Vec<&Value> = list["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["id"])
        .collect();
    let newest_first: Vec<&Value> = reservations.iter().rev().map(|r| &r["id"]).collect();
    assert_eq!(listed_ids, newest_first, "newest first");
    for (i, reservation) in reservations.iter().enumerate() {
        let status = match i {
            0..=6 => "paid",
            7..=9 => "cancelled",
            _ => "pending",
        };
        let mut expected = reservation.clone();
        expected["status"] = json!(status);
        assert_eq!(
            listed[reservation["id"].as_str().unwrap()],
            expected,
            "reservation {i}"
        );
        let got = server
            .ok(
                "reservations.get",
                json!({"reservation_id": reservation["id"]}),
                Some(&token),
            )
            .await;
        assert_eq!(got, expected, "reservation {i}");
    }
    assert_eq!(available, CAPACITY - 17, "capacity − (7 paid + 10 pending)");

    // The expiry of the pending ones was not lost with the process.
    poll_until(
        Duration::from_secs(20),
        "the 10 pending reservations to expire",
        || async {
            let expired = server
                .ok(
                    "reservations.list",
                    json!({"status": "expired"}),
                    Some(&token),
                )
                .await;
            (expired["reservations"].as_array().unwrap().len() == 10).then_some(())
        },
    )
    .await;
    let list = server
        .ok("reservations.list", json!({}), Some(&token))
        .await;
    for (i, reservation) in reservations.iter().enumerate() {
        let status = match i {
            0..=6 => "paid",
            7..=9 => "cancelled",
            _ => "expired",
        };
        assert_eq!(
            by_id(&list)[reservation["id"].as_str().unwrap()]["status"],
            status,
            "reservation {i}"
        );
    }
    assert_eq!(
        server.available(&event_id).await,
        CAPACITY - 7,
        "only the paid ones hold tickets"
    );
    server.kill().await;
}

/// SIGTERM while reservations stream in: the server stops accepting, answers or refuses
/// each call in flight, commits everything it acknowledged, and exits cleanly.
async fn sigterm_commits_every_acknowledged_reservation_before_exit(db: Arc<Database>) {
    let db = &*db;
    let (
        server,
        Shop {
            event_id,
            tt,
            token,
        },
    ) = open_shop(db, "Shutdown test", 100_000).await;

    let mut streams = Vec::new();
    // Acknowledged so far, over every stream.
    let streamed = Arc::new(AtomicUsize::new(0));
    for _ in 0..8 {
        let mut ws = server.ws_as(&token).await;
        let tt = tt.clone();
        let streamed = Arc::clone(&streamed);
        streams.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let request = json!({"items": [{"ticket_type_id": tt, "quantity": 1}]});
            for id in 0..10_000u64 {
                let call = json!({"jsonrpc": "2.0", "id": id, "method": "tickets.reserve", "params": request});
                ws.send_text(call.to_string()).await;
                match ws.next_text().await {
                    Ok(response) if response["result"]["id"].is_string() => {
                        acknowledged.push(response["result"]["id"].as_str().unwrap().to_owned());
                        streamed.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(response) => panic!("a reservation failed before shutdown: {response}"),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    // SIGTERM once reservations are streaming in.
    poll_until(
        Duration::from_secs(20),
        "reservations to stream in",
        || async { (streamed.load(Ordering::SeqCst) >= 50).then_some(()) },
    )
    .await;
    let pid = server.child.id().expect("running").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let mut server = server;
    let exit = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the server exits within 30 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
    let mut acknowledged = Vec::new();
    for stream in streams {
        acknowledged.extend(stream.await.unwrap());
    }
    assert!(
        !acknowledged.is_empty(),
        "no reservation was made before SIGTERM"
    );

    let server = Server::start(db, 2).await;
    // Every acknowledged reservation is there (`reservations.list` shows only the newest
    // 1,000, so each is fetched), and availability counts exactly those: nothing
    // unacknowledged was kept either.
    let mut ws = server.ws_as(&token).await;
    for id in &acknowledged {
        let response = ws
            .call("reservations.get", json!({"reservation_id": id}))
            .await;
        assert_eq!(
            response["result"]["id"], *id,
            "acknowledged reservation {id} was lost: {response}"
        );
    }
    assert_eq!(
        server.available(&event_id).await,
        100_000 - acknowledged.len() as u64
    );
    server.kill().await;
}

/// The versions of a subscription's snapshot and of the `pool.update` a reserve then sends.
async fn versions_seen(server: &Server, shop: &Shop) -> Vec<u64> {
    let mut watcher = WsClient::connect(&format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    let snapshot = watcher
        .ok("pool.subscribe", json!({"event_id": shop.event_id}))
        .await;
    let mut seen = vec![snapshot["pools"][0]["version"].as_u64().unwrap()];
    let mut buyer = server.ws_as(&shop.token).await;
    buyer
        .ok(
            "tickets.reserve",
            json!({"items": [{"ticket_type_id": shop.tt, "quantity": 1}]}),
        )
        .await;
    let update = watcher.notification("pool.update").await;
    seen.push(update["params"]["pools"][0]["version"].as_u64().unwrap());
    seen
}

/// PROTOCOL §4: a version is never lower than one a client has seen, across a SIGKILL and
/// a SIGTERM.
async fn versions_never_go_back_across_restarts(db: Arc<Database>) {
    let db = &*db;
    let (server, shop) = open_shop(db, "Versions", CAPACITY).await;
    let first = versions_seen(&server, &shop).await;
    server.kill().await;

    let server = Server::start(db, 2).await;
    let second = versions_seen(&server, &shop).await;
    let highest = first.iter().max().unwrap();
    assert!(
        second.iter().all(|v| v > highest),
        "after SIGKILL: {second:?} not all above {first:?}"
    );
    let mut server = server;
    let pid = server.child.id().expect("running").to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the server exits within 30 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");

    let server = Server::start(db, 3).await;
    let third = versions_seen(&server, &shop).await;
    let highest = second.iter().max().unwrap();
    assert!(
        third.iter().all(|v| v > highest),
        "after SIGTERM: {third:?} not all above {second:?}"
    );
    assert!(
        third.iter().all(|v| *v < 1 << 53),
        "versions stay exact in JavaScript numbers: {third:?}"
    );
    server.kill().await;
}

/// Eleven runs, each SIGKILLed (ten kills) while buyers reserve, pay and cancel; then every
/// answer given is checked against the database and the rebuilt availability.
async fn a_crash_loop_under_mixed_load_keeps_every_answer_true(db: Arc<Database>) {
    use crate::faults::{audit, buyers, Ledger};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const KILLS: u32 = 10;
    let db = &*db;
    let capacity = 100_000;
    let (first, shop) = open_shop(db, "Crash loop", capacity).await;
    let mut first = Some(first);
    let mut ledger = Ledger::default();
    for run in 1..=KILLS {
        let server = match first.take() {
            Some(server) => server,
            None => Server::start(db, run).await,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let load = tokio::spawn(buyers(
            format!("http://{}", server.addr),
            vec![shop.token.clone(); 6],
            shop.tt.clone(),
            2_000,
            Arc::clone(&stop),
            Arc::clone(&acknowledged),
            Arc::new(AtomicU64::new(0)),
        ));
        let target = 40 + 15 * u64::from(run);
        poll_until(Duration::from_secs(30), "changes acknowledged", || async {
            (acknowledged.load(Ordering::SeqCst) >= target).then_some(())
        })
        .await;
        // Killed with calls in flight: those get no answer, and may or may not be committed.
        server.kill().await;
        stop.store(true, Ordering::SeqCst);
        ledger.merge(load.await.unwrap());
    }
    let server = Server::start(db, KILLS + 1).await;
    let url = db.url.clone().expect("the crash loop runs on PostgreSQL");
    assert!(
        ledger.status.len() > 100,
        "too little load to mean anything"
    );
    audit(&ledger, &url, capacity, || server.available(&shop.event_id)).await;
    server.kill().await;
}

mod sqlite {
    use super::*;
    const BACKEND: Backend = Backend::Sqlite;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn versions_never_go_back_across_restarts() {
        with_database(BACKEND, super::versions_never_go_back_across_restarts).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_work_survives_sigkill_and_pending_reservations_still_expire() {
        with_database(
            Backend::Sqlite,
            super::acknowledged_work_survives_sigkill_and_pending_reservations_still_expire,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_commits_every_acknowledged_reservation_before_exit() {
        with_database(
            BACKEND,
            super::sigterm_commits_every_acknowledged_reservation_before_exit,
        )
        .await;
    }
}

mod postgres {
    use super::*;
    const BACKEND: Backend = Backend::Postgres;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn versions_never_go_back_across_restarts() {
        with_database(BACKEND, super::versions_never_go_back_across_restarts).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_loop_under_mixed_load_keeps_every_answer_true() {
        with_database(
            BACKEND,
            super::a_crash_loop_under_mixed_load_keeps_every_answer_true,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_work_survives_sigkill_and_pending_reservations_still_expire() {
        with_database(
            Backend::Postgres,
            super::acknowledged_work_survives_sigkill_and_pending_reservations_still_expire,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_commits_every_acknowledged_reservation_before_exit() {
        with_database(
            BACKEND,
            super::sigterm_commits_every_acknowledged_reservation_before_exit,
        )
        .await;
    }
}
