//! The binary's command line (PROTOCOL §9): bad settings, sub-commands.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary to its end. A command that would start a server (a setting wrongly
/// accepted) listens on a free port and is killed after 60 s, failing the test.
fn ticket_api(args: &[&str], dir: &std::path::Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ticket-api"))
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("TICKET_API_LISTEN", "127.0.0.1:0")
        .env("TICKET_API_DATA_DIR", dir.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ticket-api");
    let started = Instant::now();
    while child.try_wait().expect("wait for ticket-api").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("ticket-api {args:?} was still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("ticket-api output")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_setting_stops_the_program_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    for (args, names) in [
        (
            vec!["--database-url", "mysql://localhost/x"],
            "--database-url",
        ),
        (vec!["--listen", "nowhere"], "--listen"),
        (vec!["--reservation-ttl", "forever"], "--reservation-ttl"),
        (vec!["--redis-url", "http://x"], "--redis-url"),
        (
            vec!["--redis-url", "redis://127.0.0.1:not-a-port"],
            "--redis-url",
        ),
        (vec!["--jwt-secret", "short"], "--jwt-secret"),
    ] {
        let output = ticket_api(&args, dir.path());
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        let text = stderr(&output);
        assert_eq!(text.trim_end().lines().count(), 1, "{args:?}: {text}");
        assert!(text.contains(names), "{args:?}: {text}");
    }
}

#[test]
fn a_bad_database_url_in_the_environment_is_named_too() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ticket-api"))
        .env("DATABASE_URL", "mysql://localhost/x")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--database-url"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn migrate_user_add_and_events_import_work_on_the_embedded_database() {
    let dir = tempfile::tempdir().unwrap();
    let output = ticket_api(&["migrate"], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let output = ticket_api(
        &[
            "user",
            "add",
            "--email",
            "Boss@Example.com",
            "--password",
            "boss-password",
            "--admin",
        ],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("admin boss@example.com"));
    let output = ticket_api(
        &[
            "user",
            "add",
            "--email",
            "boss@example.com",
            "--password",
            "boss-password",
        ],
        dir.path(),
    );
    assert!(
        !output.status.success(),
        "a second user with the same email"
    );

    let file = dir.path().join("events.json");
    std::fs::write(
        &file,
        r#"[{"name": "Imported", "starts_at": "2027-01-01T20:00:00Z", "ticket_types": [{"name": "GA", "price": {"amount": 100, "currency": "EUR"}, "capacity": 5, "rule": {"kind": "any"}}]}]"#,
    )
    .unwrap();
    let output = ticket_api(&["events", "import", file.to_str().unwrap()], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("created event Imported"));

    std::fs::write(
        &file,
        r#"[{"name": "Bad", "starts_at": "2027-01-01T20:00:00Z", "ticket_types": []}]"#,
    )
    .unwrap();
    let output = ticket_api(&["events", "import", file.to_str().unwrap()], dir.path());
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("ticket_types"),
        "{}",
        stderr(&output)
    );
}
