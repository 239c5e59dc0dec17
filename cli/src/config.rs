//! The CLI's contexts: which clusters it knows, with their URL and token,
//! and which one commands talk to.
//!
//! Kept in one TOML file (`$KEEL_CONFIG`, else
//! `$XDG_CONFIG_HOME/keel/config.toml`, else `~/.config/keel/config.toml`),
//! written atomically (temporary file, then rename) and readable only by
//! its owner, since it holds tokens. Unknown keys are errors that name the
//! file: a typo must not silently point commands at the wrong cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The context commands use when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One cluster the CLI can talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The controller's API, e.g. `http://127.0.0.1:7070`.
    pub url: String,
    pub token: String,
    /// Where the cluster's router answers HTTP, when known (`keel up` sets
    /// it), so `keel deploy` can print a URL that works from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_http: Option<String>,
}

/// Where the config file is.
pub fn path() -> PathBuf {
    if let Some(path) = std::env::var_os("KEEL_CONFIG") {
        return PathBuf::from(path);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("keel").join("config.toml")
}

/// A strict TOML file's contents; an error names the file, and the line
/// and key as the parser gives them.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
    toml::from_str(text)
        .map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.to_string().trim()))
}

impl Config {
    /// The file's contents; an absent file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let config: Config = parse_toml(path, &text)?;
        if let Some(current) = &config.current
            && !config.contexts.contains_key(current)
        {
            bail!(
                "{}: current = {current:?} names no context (known: {})",
                path.display(),
                known(&config)
            );
        }
        Ok(config)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let text = toml::to_string_pretty(self).context("cannot encode the config")?;
        let temporary = path.with_extension("toml.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }

    /// The context named `name`, or the current one.
    pub fn context(&self, name: Option<&str>) -> anyhow::Result<(String, Context)> {
        let name = match name.or(self.current.as_deref()) {
            Some(name) => name,
            None => bail!(
                "no cluster selected: run `keel login URL --token TOKEN` (or `keel up`), or set KEEL_URL and KEEL_TOKEN"
            ),
        };
        match self.contexts.get(name) {
            Some(context) => Ok((name.to_owned(), context.clone())),
            None => bail!("no context {name:?} (known: {})", known(self)),
        }
    }
}

fn known(config: &Config) -> String {
    if config.contexts.is_empty() {
        "none".to_owned()
    } else {
        config
            .contexts
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_dangling_current_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "current = \"a\"\n[contexts.a]\nurl = \"http://x\"\ntokn = \"t\"\n",
        )
        .expect("write");
        let error = Config::load(&path).expect_err("typo must fail").to_string();
        assert!(error.contains("config.toml"), "{error}");
        assert!(error.contains("tokn"), "{error}");

        std::fs::write(
            &path,
            "current = \"b\"\n[contexts.a]\nurl = \"http://x\"\ntoken = \"t\"\n",
        )
        .expect("write");
        let error = Config::load(&path).expect_err("dangling").to_string();
        assert!(
            error.contains("\"b\"") && error.contains("known: a"),
            "{error}"
        );
    }

    #[test]
    fn saved_config_loads_back_and_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("config.toml");
        let mut config = Config::default();
        config.contexts.insert(
            "local".into(),
            Context {
                url: "http://127.0.0.1:7070".into(),
                token: "secret".into(),
                router_http: Some("127.0.0.1:8080".into()),
            },
        );
        config.current = Some("local".into());
        config.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = Config::load(&path).expect("load");
        assert_eq!(
            loaded.context(None).expect("current").1,
            config.contexts["local"]
        );
    }
}
