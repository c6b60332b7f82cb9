//! Password hashing with Argon2id on a small pool of threads of its own.
//!
//! Each hash costs tens of milliseconds of CPU and a 19 MiB block of memory. Run on
//! tokio's blocking pool, a login rush spread those blocks over dozens of threads, each
//! with its own allocator arena that is never given back (64 concurrent registrations
//! left the server at ~770 MB). Here a fixed number of threads (one per core) each own
//! one block, allocated once and reused for every hash, and take work from one bounded
//! queue; a full queue is refused at once as overload. The reserve path never waits on it.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

/// Hashes waiting for a thread, beyond those being computed: at ~40 ms each on one core,
/// 1,024 is tens of seconds of work, past which new logins are refused as overload.
pub const QUEUE_CAPACITY: usize = 1_024;

/// Hashes and verifies passwords.
#[derive(Clone)]
pub struct Passwords {
    queue: SyncSender<Task>,
    /// A hash of a random password, verified against when the email is unknown so that
    /// the answer takes as long as for a wrong password (no user enumeration by timing).
    dummy_hash: Arc<str>,
}

/// Work for a hashing thread, given that thread's memory.
type Task = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every hashing thread is busy and the queue is full: overload, try again later.
    #[error("too many password checks at once")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

impl Passwords {
    /// Starts `threads` hashing threads; they stop when the last handle is dropped.
    pub fn new(threads: usize) -> Self {
        let (queue, tasks) = mpsc::sync_channel::<Task>(QUEUE_CAPACITY);
        let tasks = Arc::new(Mutex::new(tasks));
        for n in 0..threads.max(1) {
            let tasks = Arc::clone(&tasks);
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || work(&tasks))
                .expect("starting a password hashing thread");
        }
        let (done, dummy) = mpsc::sync_channel(1);
        let _ = queue.send(Box::new(move |memory: &mut Vec<Block>| {
            let secret = SaltString::generate(&mut OsRng);
            let _ = done.send(hash_with(secret.as_str(), memory));
        }));
        let dummy_hash = dummy
            .recv()
            .expect("a hashing thread answers")
            .expect("hashing a fresh password");
        Self {
            queue,
            dummy_hash: dummy_hash.into(),
        }
    }

    /// Runs `job` on a hashing thread with that thread's memory.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, answer) = oneshot::channel();
        let task: Task = Box::new(move |memory| {
            let _ = done.send(job(memory));
        });
        self.queue.try_send(task).map_err(|e| match e {
            TrySendError::Full(_) => HashError::Busy,
            TrySendError::Disconnected(_) => {
                HashError::Failed("the hashing threads stopped".into())
            }
        })?;
        answer
            .await
            .map_err(|_| HashError::Failed("a hashing thread panicked".into()))
    }

    /// A PHC string (`$argon2id$…`) of the password with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |memory| hash_with(&password, memory)).await?
    }

    /// Whether `password` matches `stored`; with `None` (unknown user) a dummy hash is
    /// verified instead and the answer is always `false`.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, HashError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let matches = self
            .run(move |memory| verify_with(&password, &stored, memory))
            .await?;
        Ok(known && matches)
    }
}

/// A hashing thread: one block of Argon2 memory, allocated at its first hash and reused.
fn work(tasks: &Mutex<Receiver<Task>>) {
    let mut memory = Vec::new();
    loop {
        let next = tasks.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(task) = next else {
            return;
        };
        // A panicking hash loses its answer (the caller sees `Failed`), not the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(&mut memory)));
    }
}

/// `memory` grown to what `params` needs, the first time (and if a stored hash asks more).
fn memory_for<'m>(memory: &'m mut Vec<Block>, params: &Params) -> &'m mut [Block] {
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), Block::default());
    }
    &mut memory[..params.block_count()]
}

fn hash_with(password: &str, memory: &mut Vec<Block>) -> Result<String, HashError> {
    let failed = |e: &dyn std::fmt::Display| HashError::Failed(e.to_string());
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    let params = Params::default();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2
        .hash_password_into_with_memory(
            password.as_bytes(),
            &salt,
            &mut out,
            memory_for(memory, &params),
        )
        .map_err(|e| failed(&e))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| failed(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| failed(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| failed(&e))?),
    };
    Ok(phc.to_string())
}

fn verify_with(password: &str, stored: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(parsed.algorithm),
        Params::try_from(&parsed),
        parsed.salt,
        parsed.hash,
    ) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params.clone());
    if argon2
        .hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            &mut out,
            memory_for(memory, &params),
        )
        .is_err()
    {
        return false;
    }
    // `Output` compares in constant time.
    Output::new(&out).is_ok_and(|out| out == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn verifies_the_right_password_only() {
        let passwords = Passwords::new(2);
        let hash = passwords.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(passwords
            .verify("correct horse".into(), Some(hash.clone()))
            .await
            .unwrap());
        assert!(!passwords
            .verify("wrong horse".into(), Some(hash))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies() {
        let passwords = Passwords::new(2);
        assert!(!passwords.verify("anything".into(), None).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_are_standard_phc_strings_both_ways() {
        let passwords = Passwords::new(1);
        // Ours verify with the crate's own verifier…
        let ours = passwords.hash("s3cret pass".into()).await.unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"s3cret pass", &parsed)
            .is_ok());
        // …and the crate's (stored by earlier versions) verify with ours.
        use argon2::PasswordHasher;
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"older pass", &salt)
            .unwrap()
            .to_string();
        assert!(passwords
            .verify("older pass".into(), Some(theirs.clone()))
            .await
            .unwrap());
        assert!(!passwords
            .verify("other".into(), Some(theirs))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let passwords = Passwords::new(1);
        // Hold the one thread, then fill the queue behind it.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let holder = passwords.clone();
        let busy = tokio::spawn(async move {
            holder
                .run(move |_| {
                    let _ = started.send(());
                    held.recv().ok()
                })
                .await
        });
        while running.try_recv().is_err() {
            tokio::task::yield_now().await;
        }
        let mut waiting = Vec::new();
        let refused = loop {
            let mut call = Box::pin(passwords.run(|_| ()));
            // `run` queues before its first await, so polling once queues or refuses.
            match (&mut call).now_or_never() {
                Some(Err(HashError::Busy)) => break true,
                Some(_) => break false,
                None => waiting.push(call),
            }
            assert!(waiting.len() <= QUEUE_CAPACITY + 1, "never refused");
        };
        assert!(refused);
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        for call in waiting {
            call.await.unwrap();
        }
    }
}
