//! The `events import` file: any bytes are refused with a message or read as drafts that
//! passed validation; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(drafts) = ticket_api::cli::parse_import(data) {
        for draft in drafts {
            assert!(draft.validate().is_ok());
        }
    }
});
