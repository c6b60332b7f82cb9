//! One server (SQLite in a temporary folder) shared by every run of a target.

use std::sync::{Arc, OnceLock};

use ticket_api::app::App;
use ticket_api::config::{DatabaseUrl, Settings};

pub struct Shared {
    pub runtime: tokio::runtime::Runtime,
    pub app: Arc<App>,
    _dir: tempfile::TempDir,
}

pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = dir.path().to_owned();
        settings.database_url = Some(DatabaseUrl::embedded(dir.path()));
        settings.jwt_secret = Some("fuzz-secret-fuzz-secret-fuzz-secret!".to_owned());
        settings.rate_limit = u32::MAX;
        settings.rate_burst = u32::MAX;
        settings.auth_rate_limit = u32::MAX;
        settings.auth_rate_burst = u32::MAX;
        settings.demo = true;
        // A long-poll GET waits this long for notifications: the default (25 s) would make
        // every poll of a quiet session a libFuzzer timeout.
        settings.poll_timeout = std::time::Duration::from_millis(20);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = runtime.block_on(App::start(settings)).unwrap();
        Shared {
            runtime,
            app,
            _dir: dir,
        }
    })
}
