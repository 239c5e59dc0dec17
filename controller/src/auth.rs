//! Bearer tokens. The admin and join tokens are made at the first start
//! and written to files only their owner can read (never printed); the
//! store keeps their SHA-256, never the tokens. Nodes get a credential of
//! their own when they register.
//!
//! The file is written (temp file, fsync, rename) before the hash is
//! stored: a start that fails between the two leaves a token nobody
//! accepts yet, and the next start makes a new one. The other order would
//! leave a hash whose token is lost, locking the admin out for good.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_store::{Compare, Op, Store, Txn};
use sha2::{Digest, Sha256};

use crate::apps::{decode, encode};
use crate::records::{AdminToken, keys};

#[derive(Debug)]
pub struct Auth {
    admin_sha256: String,
    join_sha256: String,
}

/// A token this start made (the only time it is known in clear).
#[derive(Debug)]
pub struct NewToken {
    pub token: String,
    pub file: PathBuf,
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token with a prefix that says what it is for.
pub fn new_token(kind: &str) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for a {kind} token: {e}"))?;
    Ok(format!("keel-{kind}-{}", hex::encode(bytes)))
}

/// Loads the hash of the token under `key`, making the token first (and
/// writing it to `file`, mode 0600, before its hash is stored) if there is
/// none.
async fn load_or_create(
    store: &Arc<dyn Store>,
    key: &str,
    kind: &str,
    file: &Path,
) -> anyhow::Result<(String, Option<NewToken>)> {
    for _ in 0..3 {
        if let Some(kv) = store.get(key).await? {
            let record: AdminToken = decode(&kv).map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok((record.sha256, None));
        }
        let token = new_token(kind)?;
        let record = AdminToken {
            sha256: sha256_hex(&token),
        };
        let value = encode(&record).map_err(|e| anyhow::anyhow!("{e}"))?;
        write_secret(file, kind, &token)?;
        let txn = Txn::new()
            .when([Compare::missing(key)])
            .and_then([Op::put(key, value)]);
        if store.txn(txn).await?.succeeded {
            return Ok((
                record.sha256,
                Some(NewToken {
                    token,
                    file: file.to_path_buf(),
                }),
            ));
        }
        // Another controller made it first: the file holds a token
        // nobody accepts, so it goes; theirs is in their data directory.
        if let Err(error) = std::fs::remove_file(file) {
            tracing::warn!(file = %file.display(), error = %error, "cannot remove a token that lost the race to another controller");
        }
    }
    anyhow::bail!("cannot create the {kind} token: the store keeps changing under {key}")
}

impl Auth {
    /// Loads the admin and join tokens' hashes, making the tokens at the
    /// first start.
    pub async fn load_or_create(
        store: &Arc<dyn Store>,
        admin_file: &Path,
        join_file: &Path,
    ) -> anyhow::Result<(Auth, Option<NewToken>, Option<NewToken>)> {
        let (admin_sha256, new_admin) =
            load_or_create(store, &keys::admin_token(), "admin", admin_file).await?;
        let (join_sha256, new_join) =
            load_or_create(store, &keys::join_token(), "join", join_file).await?;
        Ok((
            Auth {
                admin_sha256,
                join_sha256,
            },
            new_admin,
            new_join,
        ))
    }

    /// Compares hashes, so the comparison's timing says nothing about the
    /// token.
    pub fn is_admin(&self, token: &str) -> bool {
        sha256_hex(token) == self.admin_sha256
    }

    pub fn is_join(&self, token: &str) -> bool {
        sha256_hex(token) == self.join_sha256
    }
}

/// Writes a secret to `path`, mode 0600, all or nothing: a temp file in
/// the same directory, synced, then renamed over `path`, then the
/// directory synced, so that a crash leaves either no file or the whole
/// one.
fn write_secret(path: &Path, kind: &str, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let context = |e: std::io::Error| {
        anyhow::anyhow!("cannot write the {kind} token to {}: {e}", path.display())
    };
    let dir = path.parent().ok_or_else(|| {
        anyhow::anyhow!("the {kind} token file {} has no directory", path.display())
    })?;
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(temp_name);
    let written = (|| {
        // A stale temp file of an earlier process with this id may have
        // another mode: start from none.
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        writeln!(file, "{secret}")?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(context)
}
