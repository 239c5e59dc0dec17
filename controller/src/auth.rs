//! Bearer tokens. The admin and join tokens are made at the first start,
//! printed once and written to files only their owner can read; the store
//! keeps their SHA-256, never the tokens. Nodes get a credential of their
//! own when they register.

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
/// writing it to `file`, mode 0600) if there is none.
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
        let txn = Txn::new()
            .when([Compare::missing(key)])
            .and_then([Op::put(key, value)]);
        if store.txn(txn).await?.succeeded {
            write_secret(file, &token)?;
            return Ok((
                record.sha256,
                Some(NewToken {
                    token,
                    file: file.to_path_buf(),
                }),
            ));
        }
        // Another controller made it first; read theirs.
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

fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write the admin token to {}: {e}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}
