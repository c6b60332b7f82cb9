//! The `Origin` check of `/ws` and `/lp` (cross-site WebSocket and long-poll use): a page
//! of another site must not drive a visitor's session. A request without `Origin` is not
//! from a browser page of another site (browsers send it on every cross-origin request and
//! on every WebSocket upgrade), so it passes; one from the server's own host passes; others
//! pass only when listed in `--allowed-origins`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::App;

/// Refuses a request from a foreign origin with 403.
pub async fn check(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if allowed(&app.settings.allowed_origins, request.headers()) {
        next.run(request).await
    } else {
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(not text)");
        let origin: String = origin.chars().take(100).collect();
        tracing::info!(%origin, path = request.uri().path(), "refused: origin not allowed");
        (StatusCode::FORBIDDEN, "origin not allowed").into_response()
    }
}

/// Whether the request's `Origin` (if any) is the server's own host or an allowed one.
pub fn allowed(allow_list: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if allow_list.iter().any(|a| a == "*" || *a == origin) {
        return true;
    }
    let Some((_scheme, authority)) = origin.split_once("://") else {
        // `null` (a sandboxed page or a file) is only allowed when listed.
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    host.is_some_and(|host| same_authority(authority, &host))
}

/// `example.com` and `example.com:443` are one host for an `https` origin; browsers leave
/// the default port out of `Origin` while some clients put it in `Host`.
fn same_authority(origin: &str, host: &str) -> bool {
    let strip = |a: &str| {
        a.strip_suffix(":80")
            .or_else(|| a.strip_suffix(":443"))
            .unwrap_or(a)
            .to_owned()
    };
    origin == host || strip(origin) == strip(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn no_origin_and_the_same_host_pass_others_only_when_listed() {
        let none: Vec<String> = Vec::new();
        assert!(allowed(&none, &headers(None, "127.0.0.1:4000")));
        assert!(allowed(
            &none,
            &headers(Some("http://127.0.0.1:4000"), "127.0.0.1:4000")
        ));
        assert!(allowed(
            &none,
            &headers(Some("https://Shop.Example"), "shop.example:443")
        ));
        assert!(!allowed(
            &none,
            &headers(Some("http://evil.example"), "127.0.0.1:4000")
        ));
        assert!(!allowed(
            &none,
            &headers(Some("http://127.0.0.1:4001"), "127.0.0.1:4000")
        ));
        assert!(!allowed(&none, &headers(Some("null"), "127.0.0.1:4000")));
        let listed = vec!["https://shop.example".to_owned()];
        assert!(allowed(
            &listed,
            &headers(Some("https://shop.example"), "api.example")
        ));
        assert!(!allowed(
            &listed,
            &headers(Some("https://other.example"), "api.example")
        ));
        let any = vec!["*".to_owned()];
        assert!(allowed(
            &any,
            &headers(Some("https://other.example"), "api.example")
        ));
    }
}
