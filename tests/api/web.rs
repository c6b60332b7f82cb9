//! `GET /`: the bundled web client is an HTML page built on `GET /client.js` (the JavaScript
//! client library), speaking the protocol over the same host's `/ws` and `/lp`, and loading
//! nothing from anywhere else. Its behaviour in a browser is tested under `tests/browser/`.

use crate::harness::{with_app, Backend};

#[tokio::test]
async fn the_web_client_is_a_page_and_its_client_library() {
    with_app(
        Backend::Sqlite,
        |_| {},
        |app| async move {
            let response = app.http.get(app.url("/")).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(content_type.starts_with("text/html"), "{content_type}");
            let page = response.text().await.unwrap();
            assert!(
                page.contains("from \"/client.js\""),
                "the page imports the client library"
            );

            let response = app.http.get(app.url("/client.js")).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let content_type = response.headers()["content-type"].to_str().unwrap();
            assert!(
                content_type.starts_with("text/javascript"),
                "{content_type}"
            );
            let library = response.text().await.unwrap();
            assert!(library.contains("export function connect("));
            for marker in [
                "\"/ws\"",
                "/lp",
                "retry_after_ms",
                "auth.authenticate",
                "pool.subscribe",
            ] {
                assert!(
                    library.contains(marker),
                    "the client library lacks {marker:?}"
                );
            }
            // The favicon is inline (no request, no 404); its SVG namespace is not an address.
            let page = page.replace("xmlns='http://www.w3.org/2000/svg'", "");
            let body = format!("{page}\n{library}");

            for marker in [
                "<!doctype html>",
                "<title>",
                "<html lang=",
                "/ws",
                "/lp",
                "auth.authenticate",
                "auth.register",
                "auth.login",
                "auth.logout",
                "events.list",
                "next_cursor",
                "pool.subscribe",
                "pool.update",
                "tickets.reserve",
                "idempotency_key",
                "payments.create",
                "reservations.cancel",
                "reservations.list",
                "reservation.updated",
                "Intl.NumberFormat",
                "localStorage",
                "tok_ok",
                "tok_declined",
                "tok_error",
                "INSUFFICIENT_TICKETS",
                "RULE_VIOLATION",
                "RESERVATION_EXPIRED",
                "PAYMENT_DECLINED",
                "RATE_LIMITED",
                "retry_after_ms",
                "UNAVAILABLE",
            ] {
                assert!(body.contains(marker), "the page lacks {marker:?}");
            }

            // Nothing is fetched from another host: no absolute URLs at all (the page builds its
            // addresses from `location`), no external scripts, styles or images.
            let lower = body.to_ascii_lowercase();
            for forbidden in [
                "http://",
                "https://",
                " src=",
                "<link rel=\"stylesheet",
                "url(",
                "@import",
                "href=\"//",
            ] {
                assert!(
                    !lower.contains(forbidden),
                    "the page refers to something outside itself: {forbidden:?}"
                );
            }
            assert!(
                body.contains("location.origin"),
                "addresses come from location"
            );
        },
    )
    .await;
}
