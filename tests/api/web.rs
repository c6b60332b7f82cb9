//! `GET /`: the bundled web client is one self-contained HTML page that speaks the protocol
//! over the same host's `/ws` and `/lp`, and loads nothing from anywhere else.

use crate::harness::{with_app, Backend};

#[tokio::test]
async fn the_web_client_is_one_self_contained_page() {
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
            let body = response.text().await.unwrap();

            for marker in [
                "<!doctype html>",
                "<title>",
                "<html lang=",
                "/ws",
                "\"/lp\"",
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
                "<link",
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
                body.contains("location.host"),
                "addresses come from location"
            );
        },
    )
    .await;
}
