//! The JSON-RPC parser and dispatch: any text is answered with JSON (or nothing, for
//! notifications), never a panic or a hang.
#![no_main]

mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ticket_api::rpc::{Ctx, Session, Transport};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let shared = common::shared();
    let session = Arc::new(Session::new(Transport::Http, None));
    let ctx = Ctx::new(Arc::clone(&shared.app.services), session);
    if let Some(answer) = shared.runtime.block_on(ctx.handle_message(text)) {
        let parsed: serde_json::Value = serde_json::from_str(&answer).expect("answers are JSON");
        assert!(parsed.is_object() || parsed.is_array());
    }
});
