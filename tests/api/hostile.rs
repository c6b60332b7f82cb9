//! Hostile clients (issue: hardening): logins limited per client address, foreign origins
//! refused on `/ws` and `/lp`, unfinished requests closed, connections capped per address,
//! and a WebSocket whose client stops reading closed after the write timeout.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{assert_error, with_app, Backend};

#[tokio::test]
async fn logins_and_registrations_are_limited_per_client_address() {
    with_app(
        Backend::Sqlite,
        |s| {
            s.auth_rate_limit = 1;
            s.auth_rate_burst = 2;
        },
        |app| async move {
            // Sent at once: the budget is checked before the (slow) password hash, so a
            // burst of 2 lets at most two through within the first second.
            let calls = (0..6).map(|i| {
                let params = if i % 2 == 0 {
                    json!({"email": "nobody@example.com", "password": "whatever-it-is"})
                } else {
                    json!({"email": format!("new-{i}@example.com"), "password": "long-enough"})
                };
                app.rpc(
                    if i % 2 == 0 {
                        "auth.login"
                    } else {
                        "auth.register"
                    },
                    params,
                    None,
                )
            });
            let answers = futures_util::future::join_all(calls).await;
            let limited: Vec<_> = answers
                .iter()
                .filter(|a| a["error"]["data"]["reason"] == "RATE_LIMITED")
                .collect();
            assert!(limited.len() >= 3, "{answers:?}");
            for answer in limited {
                assert_error(answer, 4001, "RATE_LIMITED");
                let wait = answer["error"]["data"]["retry_after_ms"].as_u64().unwrap();
                assert!((1..=1_000).contains(&wait), "{answer}");
            }
            // Other calls are not counted against it.
            let listed = app.rpc("events.list", json!({}), None).await;
            assert!(listed["result"].is_object(), "{listed}");
        },
    )
    .await;
}

async fn upgrade_status(addr: std::net::SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("upgrade failed: {error}"),
    }
}

#[tokio::test]
async fn a_foreign_origin_is_refused_on_websocket_and_long_poll_with_403() {
    with_app(
        Backend::Sqlite,
        |s| s.allowed_origins = vec!["https://shop.example".to_owned()],
        |app| async move {
            let own = format!("http://{}", app.addr);
            assert_eq!(upgrade_status(app.addr, None).await, 101);
            assert_eq!(upgrade_status(app.addr, Some(&own)).await, 101);
            assert_eq!(
                upgrade_status(app.addr, Some("https://shop.example")).await,
                101
            );
            assert_eq!(
                upgrade_status(app.addr, Some("https://evil.example")).await,
                403
            );

            let open = |origin: Option<&'static str>| {
                let mut request = app.http.post(app.url("/lp"));
                if let Some(origin) = origin {
                    request = request.header("origin", origin);
                }
                request.send()
            };
            assert_eq!(open(None).await.unwrap().status().as_u16(), 201);
            assert_eq!(
                open(Some("https://evil.example"))
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
                403
            );
            let lp = app.long_poll(None).await;
            let poll = app
                .http
                .get(format!("{}?cursor=0", lp.url()))
                .header("origin", "https://evil.example")
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            assert_eq!(poll.status().as_u16(), 403);
            // /rpc carries its token in a header a foreign page cannot set unasked: open.
            let rpc = app
                .http
                .post(app.url("/rpc"))
                .header("origin", "https://evil.example")
                .header("content-type", "application/json")
                .body(json!({"jsonrpc": "2.0", "id": 1, "method": "events.list"}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(rpc.status().as_u16(), 200);
        },
    )
    .await;
}

/// Waits until the server closes `stream` (a read returns 0 or fails), within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The status line the server answers on a fresh connection from `source` to a static
/// `GET /client.js` (the whole answer when it is not 200, for the assertion message).
async fn first_status_line(source: &str, addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // A static route: these tests are about taking connections, not about storage.
    let _ = stream
        .write_all(b"GET /client.js HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.starts_with("HTTP/1.1 200") {
        return answer;
    }
    answer.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn unfinished_requests_and_idle_keep_alive_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    with_app(
        Backend::Sqlite,
        |s| s.header_timeout = Duration::from_millis(500),
        |app| async move {
            let mut partial = tokio::net::TcpStream::connect(app.addr).await.unwrap();
            partial.write_all(b"GET /hea").await.unwrap();
            let mut headers_only = tokio::net::TcpStream::connect(app.addr).await.unwrap();
            headers_only
                .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .unwrap();
            let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
            let mut kept_alive = tokio::net::TcpStream::connect(app.addr).await.unwrap();
            // A static route: `/health` may answer 503 when a loaded machine is slow to ping the
            // database, and this test is about connections, not storage.
            kept_alive
                .write_all(b"GET /client.js HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = [0u8; 12];
            kept_alive.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 200");
            let within = Duration::from_secs(15);
            assert!(
                closed_within(&mut partial, within).await,
                "a partial request line"
            );
            assert!(
                closed_within(&mut headers_only, within).await,
                "partial headers"
            );
            assert!(closed_within(&mut silent, within).await, "nothing sent");
            assert!(
                closed_within(&mut kept_alive, within).await,
                "idle keep-alive"
            );
            // A whole request is still served.
            assert!(first_status_line("127.0.0.1", app.addr)
                .await
                .contains("200"));
        },
    )
    .await;
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_answered_503() {
    with_app(
        Backend::Sqlite,
        |s| s.max_connections_per_address = 3,
        |app| async move {
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
            }
            let status = first_status_line("127.0.0.1", app.addr).await;
            assert!(status.contains("503"), "{status:?}");
            // Another address is not affected.
            let status = first_status_line("127.0.0.2", app.addr).await;
            assert!(status.contains("200"), "{status:?}");
            drop(held);
            crate::harness::poll_until(
                Duration::from_secs(10),
                "a place is free again",
                || async {
                    first_status_line("127.0.0.1", app.addr)
                        .await
                        .contains("200")
                        .then_some(())
                },
            )
            .await;
        },
    )
    .await;
}

/// The `/metrics` line of `name` (with its labels) and its value, if present.
async fn metric(app: &crate::harness::TestApp, name: &str) -> Option<f64> {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// PROTOCOL decision 26: a client that subscribes and never reads again is sent 1008 once
/// a write has stalled for `--write-timeout`, and dropped at most the close grace (10 s)
/// later. The stall begins during the burst, so the connection is gone within
/// write timeout + grace of its end.
#[tokio::test]
async fn a_websocket_that_never_reads_is_dropped_within_the_write_timeout_and_the_grace() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
    const CLOSE_GRACE: Duration = Duration::from_secs(10);
    const MARGIN: Duration = Duration::from_secs(3);
    const OPEN_WS: &str = "ticket_api_open_connections{transport=\"ws\"}";
    const CLOSED_SLOW: &str =
        "ticket_api_websocket_closes_total{code=\"1008\",reason=\"client too slow\"}";
    let tweak = |s: &mut ticket_api::config::Settings| {
        s.write_timeout = WRITE_TIMEOUT;
        s.rate_limit = 100_000;
        s.rate_burst = 100_000;
    };
    with_app(Backend::Sqlite, tweak, |app| async move {
        let admin = app.quick_admin().await;
        let types: Vec<_> = (0..20)
            .map(|_| (1_000_000, json!({"kind": "any"})))
            .collect();
        let (event_id, ids) = app.create_pools(&admin, &types).await;

        // A small receive buffer, so the server's writes stall soon.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(app.addr).await.unwrap();
        let (mut slow, _) =
            tokio_tungstenite::client_async(format!("ws://{}/ws", app.addr), stream)
                .await
                .unwrap();
        for i in 0..20 {
            let subscribe = json!({"jsonrpc": "2.0", "id": i, "method": "pool.subscribe",
                "params": {"event_id": event_id}});
            slow.send(Message::text(subscribe.to_string()))
                .await
                .unwrap();
        }
        assert_eq!(metric(&app, OPEN_WS).await, Some(1.0));

        // Reservations by another client over /rpc (not a WebSocket, so the gauge counts
        // only `slow`): bounded in count and time, ended early once `slow` is gone.
        let (_, token) = app.quick_customer().await;
        let started = std::time::Instant::now();
        let mut reserved = 0;
        while reserved < 3_000 && started.elapsed() < Duration::from_secs(10) {
            let item =
                json!({"items": [{"ticket_type_id": ids[reserved % ids.len()], "quantity": 1}]});
            app.ok_as(&token, "tickets.reserve", item).await;
            reserved += 1;
            if reserved % 100 == 0 && app.app.metrics.open_connections("ws") == 0 {
                break;
            }
        }
        let burst_ended = std::time::Instant::now();

        let within = WRITE_TIMEOUT + CLOSE_GRACE + MARGIN;
        crate::harness::poll_until(within, "the server to drop the client", || async {
            (metric(&app, OPEN_WS).await == Some(0.0)).then_some(())
        })
        .await;
        let gone_after = burst_ended.elapsed();
        assert_eq!(
            metric(&app, CLOSED_SLOW).await,
            Some(1.0),
            "closed as too slow (1008)"
        );

        // The socket itself is closed: reading now reaches its end.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match slow.next().await {
                    Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the socket still open after the gauge fell");
        eprintln!(
            "never-reading client: {reserved} reservations, gone {gone_after:?} after the burst, \
             close frame on the wire: {:?}",
            ended.unwrap()
        );
    })
    .await;
}
