//! Records what the harness's clients send and receive, for the API reference written by
//! `reference.rs`. The clients report every message at their send and receive points; a
//! test collects them only inside [`recording`] (a task-local log), so the other tests,
//! running in parallel, record nothing.

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One message on the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    /// `WebSocket`, `long-poll` (`POST /lp/{session}`), `long-poll GET` (a poll's whole
    /// answer) or `/rpc`.
    pub transport: &'static str,
    /// Which connection or session it travelled on.
    pub conn: String,
    pub outgoing: bool,
    pub message: Value,
}

tokio::task_local! {
    static LOG: Arc<Mutex<Vec<Frame>>>;
}

/// Called by the clients for every message; a no-op outside [`recording`]. Text that is not
/// JSON (the malformed-input tests) is not recorded.
pub fn frame(transport: &'static str, conn: &str, outgoing: bool, text: &str) {
    let _ = LOG.try_with(|log| {
        if let Ok(message) = serde_json::from_str::<Value>(text) {
            log.lock().unwrap().push(Frame {
                transport,
                conn: conn.to_owned(),
                outgoing,
                message,
            });
        }
    });
}

/// Runs `test`, returning its output and every frame its clients sent and received.
pub async fn recording<F: Future>(test: F) -> (F::Output, Vec<Frame>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let output = LOG.scope(Arc::clone(&log), test).await;
    let frames = std::mem::take(&mut *log.lock().unwrap());
    (output, frames)
}
