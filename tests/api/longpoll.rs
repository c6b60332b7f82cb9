//! The long-poll fallback under stress (PROTOCOL §2 "GET /lp/{session}?cursor=N", limits):
//! a client that loses poll responses loses nothing and sees nothing twice; a thousand
//! sessions waiting at once all get every update and expire when they stop; a session that
//! never acknowledges overflows and expires; a GET with nothing to deliver returns after the
//! poll timeout. And, ignored by default, a latency benchmark of long-poll against
//! WebSocket (`cargo test --release --test api -- --ignored --nocapture notification_latency`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use ticket_api::config::Settings;

use crate::harness::{poll_until, with_app, Backend, LongPollClient, TestApp, CLIENT_WAIT};

fn reserve_params(ticket_type_id: &Value, quantity: u64) -> Value {
    json!({"items": [{"ticket_type_id": ticket_type_id, "quantity": quantity}]})
}

/// No rate limit to speak of: these tests make thousands of calls as one user.
fn unlimited(s: &mut Settings) {
    s.rate_limit = 1_000_000;
    s.rate_burst = 1_000_000;
}

/// `cycles` reservations of one ticket, each cancelled at once, over `/rpc` as the token's
/// user, `workers` at a time. Each cancel sends a `reservation.updated` to every session of
/// the user. Returns the ids of the cancelled reservations.
async fn reserve_and_cancel(
    app: &TestApp,
    token: &str,
    ticket_type_id: &Value,
    cycles: usize,
    workers: usize,
) -> Vec<Value> {
    let worker = |share: usize| async move {
        let mut ids = Vec::with_capacity(share);
        for _ in 0..share {
            let reservation = app
                .ok_as(token, "tickets.reserve", reserve_params(ticket_type_id, 1))
                .await;
            let cancelled = app
                .ok_as(
                    token,
                    "reservations.cancel",
                    json!({"reservation_id": reservation["id"]}),
                )
                .await;
            assert_eq!(cancelled["status"], "cancelled");
            ids.push(reservation["id"].clone());
        }
        ids
    };
    let shares = (0..workers).map(|w| cycles / workers + usize::from(w < cycles % workers));
    join_all(shares.map(worker)).await.concat()
}

/// Asserts a `reservation.updated` for a cancelled reservation; returns its id.
#[track_caller]
fn cancelled_id(message: &Value) -> Value {
    assert_eq!(message["method"], "reservation.updated", "{message}");
    assert_eq!(
        message["params"]["reservation"]["status"], "cancelled",
        "{message}"
    );
    message["params"]["reservation"]["id"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_loses_poll_responses_sees_every_notification_once_and_in_order() {
    const CYCLES: usize = 1_000;
    let tweak = |s: &mut Settings| {
        unlimited(s);
        s.poll_timeout = Duration::from_millis(200);
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let admin = app.quick_admin().await;
        let (_, types) = app
            .create_pools(&admin, &[(1_000_000, json!({"kind": "any"}))])
            .await;
        let (_, token) = app.quick_customer().await;
        let session = app.long_poll(Some(&token)).await;
        assert_eq!(session.poll_timeout_ms, 200);

        let poller = async {
            let mut rng = StdRng::seed_from_u64(0x10e5);
            let started = Instant::now();
            let (mut cursor, mut seqs, mut ids) = (0u64, Vec::new(), Vec::new());
            let (mut dropped, mut discarded, mut polls) = (0, 0, 0);
            while seqs.len() < CYCLES {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "only {} notifications after 60 s",
                    seqs.len()
                );
                polls += 1;
                let roll: f64 = rng.gen();
                if roll < 0.15 {
                    // The connection breaks while the GET waits or answers.
                    let within = Duration::from_millis(rng.gen_range(1..30));
                    session.get_within(cursor, within).await;
                    dropped += 1;
                    continue;
                }
                let (status, body) = session.get_raw(cursor).await;
                assert_eq!(status, 200, "{body}");
                if roll < 0.30 {
                    // The answer came but was lost: poll again with the same cursor.
                    discarded += 1;
                    continue;
                }
                let (next, messages) = LongPollClient::check_poll(cursor, &body);
                for (seq, message) in (cursor + 1..).zip(&messages) {
                    seqs.push(seq);
                    ids.push(cancelled_id(message));
                }
                cursor = next;
            }
            println!(
                "{polls} polls, {dropped} dropped mid-way, {discarded} answers discarded, {:?}",
                started.elapsed()
            );
            (seqs, ids)
        };
        let reservers = reserve_and_cancel(&app, &token, &types[0], CYCLES, 4);
        let ((seqs, seen), made) = futures_util::future::join(poller, reservers).await;

        assert_eq!(seqs, (1..=CYCLES as u64).collect::<Vec<_>>());
        assert_eq!(seen.len(), CYCLES);
        let seen: HashSet<String> = seen.iter().map(Value::to_string).collect();
        let made: HashSet<String> = made.iter().map(Value::to_string).collect();
        assert_eq!(seen.len(), CYCLES, "a reservation was announced twice");
        assert_eq!(seen, made);
        // Nothing more is owed.
        let (status, body) = session.get_raw(CYCLES as u64).await;
        assert_eq!(
            (status, body),
            (200, json!({"cursor": CYCLES, "messages": []}))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_sessions_all_get_every_update_then_expire_when_they_stop() {
    const SESSIONS: usize = 1_000;
    const RESERVATIONS: u64 = 5;
    const CAPACITY: u64 = 100;
    let tweak = |s: &mut Settings| {
        s.poll_timeout = Duration::from_secs(3);
        s.session_timeout = Duration::from_secs(5);
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let admin = app.quick_admin().await;
        let (event_id, types) = app
            .create_pools(&admin, &[(CAPACITY as u32, json!({"kind": "any"}))])
            .await;
        let (_, token) = app.quick_customer().await;
        let started = Instant::now();

        // Each session's latest version, and how many have sent their first GET.
        let latest: Arc<Vec<AtomicU64>> =
            Arc::new((0..SESSIONS).map(|_| AtomicU64::new(0)).collect());
        let polling = Arc::new(AtomicUsize::new(0));
        // Open and subscribe, 50 at a time; each session polls as soon as it is subscribed,
        // until it has seen the last version.
        let opening = Arc::new(tokio::sync::Semaphore::new(50));
        let pollers: Vec<_> = (0..SESSIONS)
            .map(|i| {
                let (latest, polling, opening) =
                    (Arc::clone(&latest), Arc::clone(&polling), Arc::clone(&opening));
                let (http, base, event_id) = (app.http.clone(), app.url(""), event_id.clone());
                tokio::spawn(async move {
                    let permit = opening.acquire_owned().await.unwrap();
                    let mut session = LongPollClient::open(&http, &base, None).await;
                    let subscribed = session
                        .ok("pool.subscribe", json!({"event_id": event_id}))
                        .await;
                    assert_eq!(subscribed["pools"][0]["available"], CAPACITY);
                    drop(permit);
                    polling.fetch_add(1, Ordering::SeqCst);
                    let mut seen = Vec::new();
                    let within = Duration::from_millis(session.poll_timeout_ms) + CLIENT_WAIT;
                    loop {
                        session
                            .poll_for(within)
                            .await
                            .expect("a GET answers within the poll timeout");
                        for update in session.notifications.drain(..) {
                            assert_eq!(update["method"], "pool.update", "{update}");
                            assert_eq!(
                                update["params"]["subscription"],
                                subscribed["subscription"]
                            );
                            let pool = &update["params"]["pools"][0];
                            let state = (
                                pool["available"].as_u64().unwrap(),
                                pool["version"].as_u64().unwrap(),
                            );
                            latest[i].store(state.1, Ordering::SeqCst);
                            seen.push(state);
                        }
                        if seen.last().is_some_and(|(_, v)| *v == RESERVATIONS) {
                            return (session, seen);
                        }
                    }
                })
            })
            .collect();
        poll_until(Duration::from_secs(60), "every session to poll", || async {
            (polling.load(Ordering::SeqCst) == SESSIONS).then_some(())
        })
        .await;
        let opened = started.elapsed();
        assert_eq!(app.long_poll_sessions(), SESSIONS);
        assert_eq!(app.app.fanout.subscription_count(), SESSIONS);

        // Each reservation once every session has the previous version, so each one is
        // a separate update for every session.
        let mut other_calls = Vec::new();
        let mut ws = app.ws().await;
        for version in 1..=RESERVATIONS {
            // Meanwhile the server answers other calls, over every transport.
            let t = Instant::now();
            app.rpc("events.list", json!({}), None).await;
            ws.ok("events.get", json!({"event_id": event_id})).await;
            other_calls.push(t.elapsed());
            app.ok_as(&token, "tickets.reserve", reserve_params(&types[0], 1)).await;
            poll_until(Duration::from_secs(30), "every session to get the update", || async {
                latest.iter().all(|v| v.load(Ordering::SeqCst) >= version).then_some(())
            })
            .await;
        }
        let delivered = started.elapsed();

        let expected: Vec<(u64, u64)> = (1..=RESERVATIONS).map(|v| (CAPACITY - v, v)).collect();
        let mut sessions = Vec::new();
        for poller in pollers {
            let (session, seen) = poller.await.unwrap();
            assert_eq!(seen, expected, "session {}", session.session);
            assert_eq!(session.cursor, RESERVATIONS, "one update per reservation");
            sessions.push(session);
        }

        // They all stopped polling: they expire and free their subscriptions.
        poll_until(Duration::from_secs(30), "every session to expire", || async {
            ((app.long_poll_sessions() == 0) && app.app.fanout.subscription_count() == 0).then_some(())
        })
        .await;
        for session in sessions.iter().step_by(100) {
            let (status, body) = session.get_raw(session.cursor).await;
            assert_eq!((status, body), (410, json!({"error": "SESSION_EXPIRED"})));
        }
        println!(
            "{SESSIONS} sessions opened and subscribed in {opened:?}, {RESERVATIONS} updates to all by {delivered:?}, \
             expired by {:?}; other calls meanwhile took {other_calls:?}",
            started.elapsed()
        );
    })
    .await;
}

/// A session bound to a user that never acknowledges (it polls with cursor 0) while more
/// than its outbox holds (1,024) of `reservation.updated` arrive. Checks that up to full it
/// loses nothing; returns it once one more has not fit.
async fn overflow_a_session(app: &TestApp) -> LongPollClient {
    // The outbox capacity of a long-poll session (`longpoll::NOTIFICATION_CAPACITY`).
    const CAPACITY: usize = 1_024;
    const CHUNK: usize = 128;
    let admin = app.quick_admin().await;
    let (_, types) = app
        .create_pools(&admin, &[(1_000_000, json!({"kind": "any"}))])
        .await;
    // A subscription to an event that never changes: it takes no room, and must be freed.
    let (quiet_event, _) = app
        .create_pools(&admin, &[(1, json!({"kind": "any"}))])
        .await;
    let (_, token) = app.quick_customer().await;
    let mut session = app.long_poll(Some(&token)).await;
    session
        .ok("pool.subscribe", json!({"event_id": quiet_event}))
        .await;
    let mut made = Vec::new();
    for _ in 0..CAPACITY / CHUNK {
        made.extend(reserve_and_cancel(app, &token, &types[0], CHUNK, 4).await);
        // Always cursor 0: everything from seq 1, never acknowledged.
        let (status, body) = session.get_raw(0).await;
        assert_eq!(status, 200, "{body}");
        let (cursor, messages) = LongPollClient::check_poll(0, &body);
        assert_eq!(cursor, made.len() as u64);
        let seen: HashSet<String> = messages
            .iter()
            .map(|m| cancelled_id(m).to_string())
            .collect();
        let expected: HashSet<String> = made.iter().map(Value::to_string).collect();
        assert_eq!(seen, expected, "an outbox up to full loses nothing");
    }
    assert_eq!(app.long_poll_sessions(), 1, "full is not yet over");
    assert_eq!(app.app.fanout.subscription_count(), 1);
    // One more does not fit.
    reserve_and_cancel(app, &token, &types[0], 1, 1).await;
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_acknowledges_overflows_and_expires() {
    with_app(Backend::Sqlite, unlimited, |app| async move {
        let session = overflow_a_session(&app).await;
        let gone = (410, json!({"error": "SESSION_EXPIRED"}));
        assert_eq!(session.get_raw(0).await, gone);
        assert_eq!(app.long_poll_sessions(), 0);
        poll_until(
            Duration::from_secs(5),
            "the subscription to be freed",
            || async { (app.app.fanout.subscription_count() == 0).then_some(()) },
        )
        .await;
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"events.list"}"#;
        assert_eq!(session.post_raw(call).await, gone);
        assert_eq!(session.delete_raw().await, gone);
    })
    .await;
}

/// PROTOCOL §2: a session whose queue still overflows is expired, and an expired session
/// answers 410 — to a call as to a poll, whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowed_session_refuses_calls_before_any_poll() {
    with_app(Backend::Sqlite, unlimited, |app| async move {
        let session = overflow_a_session(&app).await;
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"events.list"}"#;
        assert_eq!(
            session.post_raw(call).await,
            (410, json!({"error": "SESSION_EXPIRED"})),
            "a call on an overflowed session"
        );
    })
    .await;
}

/// A GET with this cursor, and how long it took.
async fn timed_get(session: &LongPollClient, cursor: u64) -> ((u16, Value), Duration) {
    let started = Instant::now();
    let answer = session.get_raw(cursor).await;
    (answer, started.elapsed())
}

/// End to end over HTTP; the timeout to the millisecond, a notification ending the wait and
/// a newer GET answering an older one are pinned down on paused time in
/// `transport::longpoll::tests::on_tokio_time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_nothing_to_deliver_returns_empty_after_the_poll_timeout() {
    const POLL_TIMEOUT: Duration = Duration::from_millis(200);
    let tweak = |s: &mut Settings| s.poll_timeout = POLL_TIMEOUT;
    with_app(Backend::Sqlite, tweak, |app| async move {
        let admin = app.quick_admin().await;
        let (_, types) = app
            .create_pools(&admin, &[(10, json!({"kind": "any"}))])
            .await;
        let (_, token) = app.quick_customer().await;
        let mut session = app.long_poll(Some(&token)).await;
        assert_eq!(session.poll_timeout_ms, 200);

        let ((status, body), waited) = timed_get(&session, 0).await;
        assert_eq!((status, body), (200, json!({"cursor": 0, "messages": []})));
        assert!(
            waited >= POLL_TIMEOUT && waited < POLL_TIMEOUT + Duration::from_secs(2),
            "waited {waited:?}"
        );

        // With a cursor past a delivered message, the same cursor comes back.
        reserve_and_cancel(&app, &token, &types[0], 1, 1).await;
        session.notification("reservation.updated").await;
        assert_eq!(session.cursor, 1);
        let ((status, body), waited) = timed_get(&session, 1).await;
        assert_eq!((status, body), (200, json!({"cursor": 1, "messages": []})));
        assert!(
            waited >= POLL_TIMEOUT && waited < POLL_TIMEOUT + Duration::from_secs(2),
            "waited {waited:?}"
        );
    })
    .await;
}

/// Percentiles of a sorted sample of milliseconds.
fn percentiles(sorted: &[f64]) -> String {
    let at = |p: f64| {
        let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    format!(
        "n={} min={:.2} p50={:.2} p90={:.2} p99={:.2} max={:.2} ms",
        sorted.len(),
        at(0.0),
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    )
}

/// Per reservation (version `v`) and subscriber: milliseconds from the reserver's
/// acknowledged response to the subscriber's first `pool.update` carrying version `v` or
/// newer; negative when the update came first. Sorted.
fn latencies(acked: &[Instant], receipts: &[Vec<(u64, Instant)>]) -> Vec<f64> {
    let mut all = Vec::new();
    for subscriber in receipts {
        for (index, acked_at) in acked.iter().enumerate() {
            let version = index as u64 + 1;
            let (_, received) = subscriber
                .iter()
                .find(|(v, _)| *v >= version)
                .expect("every version reached every subscriber");
            let ms = if received >= acked_at {
                received.duration_since(*acked_at).as_secs_f64()
            } else {
                -acked_at.duration_since(*received).as_secs_f64()
            };
            all.push(ms * 1_000.0);
        }
    }
    all.sort_by(f64::total_cmp);
    all
}

/// One round of the benchmark: `subscribers` per transport on a fresh event, a reserver
/// making `reservations` reservations over a WebSocket, one every `pace` at most; prints
/// the latency percentiles per transport.
async fn latency_round(app: &TestApp, subscribers: usize, reservations: u64, pace: Duration) {
    let admin = app.quick_admin().await;
    let (event_id, types) = app
        .create_pools(&admin, &[(100_000, json!({"kind": "any"}))])
        .await;
    let (_, token) = app.quick_customer().await;

    // The same event, the same reservations, for both transports at once.
    let mut ws_tasks = Vec::new();
    let mut lp_tasks = Vec::new();
    for _ in 0..subscribers {
        let mut ws = app.ws().await;
        ws.ok("pool.subscribe", json!({"event_id": event_id})).await;
        ws_tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            while receipts.last().is_none_or(|(v, _)| *v < reservations) {
                let update = ws.notification("pool.update").await;
                let at = Instant::now();
                let version = update["params"]["pools"][0]["version"].as_u64().unwrap();
                receipts.push((version, at));
            }
            receipts
        }));
        let mut lp = app.long_poll(None).await;
        lp.ok("pool.subscribe", json!({"event_id": event_id})).await;
        lp_tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            while receipts.last().is_none_or(|(v, _)| *v < reservations) {
                lp.poll_for(Duration::from_secs(60))
                    .await
                    .expect("a GET answers");
                let at = Instant::now();
                for update in lp.notifications.drain(..) {
                    let version = update["params"]["pools"][0]["version"].as_u64().unwrap();
                    receipts.push((version, at));
                }
            }
            receipts
        }));
    }

    let mut reserver = app.ws_as(&token).await;
    let mut acked = Vec::new();
    let started = Instant::now();
    for _ in 0..reservations {
        let next = tokio::time::Instant::now() + pace;
        reserver
            .ok("tickets.reserve", reserve_params(&types[0], 1))
            .await;
        acked.push(Instant::now());
        tokio::time::sleep_until(next).await;
    }
    let reserving = started.elapsed();
    let ws_receipts: Vec<_> = join_all(ws_tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let lp_receipts: Vec<_> = join_all(lp_tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let updates =
        |r: &[Vec<(u64, Instant)>]| r.iter().map(Vec::len).sum::<usize>() as f64 / r.len() as f64;
    let ws_latency = latencies(&acked, &ws_receipts);
    let lp_latency = latencies(&acked, &lp_receipts);
    println!(
        "{subscribers} subscribers per transport, {reservations} reservations, one every {pace:?} \
         (took {reserving:?}); from the reserver's acknowledged response to each subscriber's \
         pool.update with that version (negative: the update came before the ack):"
    );
    println!(
        "  websocket: {} ({:.1} updates per subscriber)",
        percentiles(&ws_latency),
        updates(&ws_receipts)
    );
    println!(
        "  long-poll: {} ({:.1} updates per subscriber)",
        percentiles(&lp_latency),
        updates(&lp_receipts)
    );
}

/// Notification latency over long-poll against WebSocket under the same load: 100
/// subscribers each, 200 reservations; first every 10 ms (changes coalesce within the
/// fan-out window of 50 ms), then every 60 ms (each change its own update, so the figures
/// are the delivery itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn notification_latency_long_poll_versus_websocket() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            latency_round(&app, 100, 200, Duration::from_millis(10)).await;
            latency_round(&app, 100, 200, Duration::from_millis(60)).await;
        },
    )
    .await;
}
