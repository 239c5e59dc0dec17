//! Bearer tokens. The admin token is made at the first start, printed once
//! and written to a file only root can read; the store keeps its SHA-256,
//! never the token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keel_store::{Compare, Op, Store, Txn};
use sha2::{Digest, Sha256};

use crate::apps::{decode, encode};
use crate::records::{AdminToken, keys};

#[derive(Debug)]
pub struct Auth {
    admin_sha256: String,
}

/// The admin token when this start made it (the only time it is known).
#[derive(Debug)]
pub struct NewAdminToken {
    pub token: String,
    pub file: PathBuf,
}

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Auth {
    /// Loads the admin token's hash, making the token first if there is
    /// none. The new token is written to `token_file` (mode 0600).
    pub async fn load_or_create(
        store: &Arc<dyn Store>,
        token_file: &Path,
    ) -> anyhow::Result<(Auth, Option<NewAdminToken>)> {
        let key = keys::admin_token();
        if let Some(kv) = store.get(&key).await? {
            let record: AdminToken = decode(&kv).map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok((
                Auth {
                    admin_sha256: record.sha256,
                },
                None,
            ));
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
        let token = format!("keel-admin-{}", hex::encode(bytes));
        let record = AdminToken {
            sha256: sha256_hex(&token),
        };
        let txn = Txn::new().when([Compare::missing(&key)]).and_then([Op::put(
            &key,
            encode(&record).map_err(|e| anyhow::anyhow!("{e}"))?,
        )]);
        if !store.txn(txn).await?.succeeded {
            // Another controller made it first; use theirs.
            return Box::pin(Self::load_or_create(store, token_file)).await;
        }
        write_secret(token_file, &token)?;
        Ok((
            Auth {
                admin_sha256: record.sha256,
            },
            Some(NewAdminToken {
                token,
                file: token_file.to_path_buf(),
            }),
        ))
    }

    /// Compares hashes, so the comparison's timing says nothing about the
    /// token.
    pub fn is_admin(&self, token: &str) -> bool {
        sha256_hex(token) == self.admin_sha256
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
