//! The binary's settings of contract version 2 (PROTOCOL §9): booleans, `--cluster`, one
//! server per database, and logs without colour codes when stderr is not a terminal.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{fresh_postgres_database, remove_postgres_database};

const WAIT: Duration = Duration::from_secs(60);

fn command(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ticket-api"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("NO_COLOR")
        .env("TICKET_API_LISTEN", "127.0.0.1:0")
        .env("TICKET_API_DATA_DIR", dir.join("data"))
        .env(
            "TICKET_API_JWT_SECRET",
            "settings-test-secret-settings-test!!",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs a command that must end by itself, within a minute.
fn finish(mut child: Child) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > WAIT {
            let _ = child.kill();
            panic!("ticket-api was still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A server started from `command`, up once it printed its address.
struct Server {
    child: Child,
}

impl Server {
    fn start(mut command: Command) -> Self {
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("ticket-api listening on") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(WAIT).is_err() {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the server did not start: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Self { child }
    }

    /// SIGTERM, then waits for the exit; returns what it logged.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > WAIT {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_refused(output: &Output, names: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(names), "{stderr}");
}

#[test]
fn boolean_settings_accept_1_yes_on_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    for value in ["1", "yes", "ON", "true", "0", "off"] {
        let output = finish(
            command(dir.path(), &["migrate"])
                .env("TICKET_API_DEMO", value)
                .spawn()
                .unwrap(),
        );
        assert!(
            output.status.success(),
            "TICKET_API_DEMO={value}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = finish(
        command(dir.path(), &["migrate", "--demo=maybe"])
            .spawn()
            .unwrap(),
    );
    assert_refused(&output, "--demo");
}

#[test]
fn cluster_mode_needs_postgres_and_redis() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(command(dir.path(), &["--cluster"]).spawn().unwrap());
    assert_refused(&output, "--cluster");
    let output = finish(
        command(dir.path(), &[])
            .env("TICKET_API_CLUSTER", "yes")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/none")
            .spawn()
            .unwrap(),
    );
    assert_refused(&output, "--redis-url");
}

#[test]
fn a_second_server_on_one_sqlite_data_folder_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(command(dir.path(), &[]));
    let second = finish(command(dir.path(), &[]).spawn().unwrap());
    assert_refused(&second, "another ticket-api server");
    // Importing behind the server's back is refused too; adding a user is safe.
    std::fs::write(dir.path().join("events.json"), "[]").unwrap();
    let import = finish(
        command(dir.path(), &["events", "import", "events.json"])
            .spawn()
            .unwrap(),
    );
    assert_refused(&import, "another ticket-api server");
    let add = finish(
        command(
            dir.path(),
            &[
                "user",
                "add",
                "--email",
                "a@example.com",
                "--password",
                "long-enough",
            ],
        )
        .spawn()
        .unwrap(),
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let log = first.stop();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
    assert!(log.contains("node"), "the log names the node: {log}");
    Server::start(command(dir.path(), &[])).stop();
}

#[tokio::test]
async fn a_second_server_on_one_postgres_database_is_refused_until_the_first_stops() {
    let Some((name, url)) = fresh_postgres_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url2 = url.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let with_db = |args: &[&str]| {
            let mut c = command(dir.path(), args);
            c.env("DATABASE_URL", &url2);
            c
        };
        let first = Server::start(with_db(&[]));
        let second = finish(with_db(&[]).spawn().unwrap());
        assert_refused(&second, "another ticket-api server");
        let migrate = finish(with_db(&["migrate"]).spawn().unwrap());
        assert!(migrate.status.success(), "migrate while a server runs");
        first.stop();
        Server::start(with_db(&[])).stop();
    })
    .await;
    remove_postgres_database(&name).await;
    outcome.unwrap();
}
