//! Keel's app manifest: what a user deploys, parsed strictly from YAML or
//! JSON into a validated [`AppManifest`] with every default filled in.
//!
//! The controller's API parses a manifest with [`parse`] and stores
//! [`AppManifest::canonical_json`] as the new revision's spec (applying an
//! identical manifest compares equal there and makes no new revision); the
//! CLI parses files the same way to report mistakes before uploading them.
//! `manifest/REFERENCE.md` documents every field for users.
//!
//! Architecture Invariant: this crate is pure. It does no I/O and depends on
//! no store, HTTP, async runtime or other Keel crate; the controller converts
//! an `AppManifest` into store records and scheduler requests.
//!
//! # Strict, and every problem at once
//!
//! An unknown field, a wrong type, a value out of range, a bad name, a route
//! to a port that does not exist: each is a [`Problem`] with the field's path
//! (`ports[1].port`, `env.FOO`), its line and column, and a message that says
//! what is allowed. A manifest is checked to the end and all its problems are
//! returned together in a [`ManifestErrors`], in document order. A syntax
//! error is the exception: it ends parsing, since neither YAML nor JSON can be
//! reliably resumed after one, and it is reported alone (with its position).
//!
//! That is why parsing does not go through serde: a derived `Deserialize`
//! stops at the first error and knows no positions. Text becomes a small tree
//! of values with positions (`tree`), and a hand-written validator
//! (`validate`) walks it. `AppManifest`'s own `Deserialize` feeds the same
//! validator, so a stored spec read back is held to the same rules.
//!
//! # Why `saphyr-parser` for YAML
//!
//! `serde_yaml` is unmaintained. Of the maintained YAML 1.2 parsers,
//! `saphyr-parser` (the event layer of the saphyr project, which continues
//! `yaml-rust` and `yaml-rust2`) is the smallest that gives a span for every
//! event; it passes the YAML test suite, has no C and no `unsafe` of ours, and
//! depends only on `arraydeque` and `thiserror`. Building the tree from its
//! events ourselves (`yaml`, under 200 lines) lets us keep duplicate keys so that
//! they are errors with a position (loaders keep one, or stop at the first),
//! resolve scalars by the YAML 1.2 core schema (`yes` and `on` are strings,
//! `0777` is decimal), and turn anchors, aliases, tags and second documents,
//! which a manifest has no use for, into problems. `saphyr`'s loader or
//! `serde-saphyr` would add a layer we would then have to work around.
//!
//! JSON goes through `serde_json` for its syntax (errors with line and
//! column) and a small scanner for positions; see `json`. Feeding JSON to the
//! YAML parser would accept comments and unquoted strings in a file that
//! claims to be JSON.
//!
//! # Decisions a user will notice
//!
//! - A field set to null (`health:` with nothing under it) is the same as a
//!   field left out: its default, or "required" if it has none.
//! - Free text (environment values, command arguments, constraint values)
//!   takes numbers and booleans as written: `PORT: 8080` is `"8080"` and
//!   `VERSION: 1.10` is `"1.10"`, not `"1.1"`. Everything else is typed: a
//!   name or an image given as a number is an error.
//! - `command` is a list of arguments; a single string is an error, not
//!   split (there is no shell to split it the way a user would expect).
//! - Durations need a unit (`500ms`, `5s`, `2m`, `1m30s`); a bare number is
//!   an error. In Rust they are whole milliseconds in `*_ms` fields.
//! - Anchors, aliases and tags are errors; so is a second YAML document.

#![forbid(unsafe_code)]

mod duration;
mod error;
mod json;
mod names;
mod tree;
mod types;
mod validate;
mod yaml;

use std::path::Path;

pub use error::{ManifestErrors, Problem};
pub use types::{
    AppManifest, Backoff, Constraint, ConstraintOp, HealthCheck, HostRoute, Instances, Placement,
    Port, Probe, Protocol, Resources, Restart, RestartPolicy, Route, Strategy, TcpRoute, TlsMode,
    Update,
};

/// A manifest larger than this is rejected before parsing: the API parses
/// untrusted text, and a real manifest is a few kilobytes.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// The compiled size a constraint's regex may reach (the `regex` crate's
/// default is 10 MiB; placement patterns are a few characters).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The text formats a manifest can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// By file extension: `.yaml` and `.yml` are YAML, `.json` JSON.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Parses and validates a manifest written in `format`.
pub fn parse(text: &str, format: Format) -> Result<AppManifest, ManifestErrors> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestErrors::new(vec![Problem {
            path: String::new(),
            line: 1,
            column: 1,
            message: format!(
                "the manifest is {} bytes; at most {MAX_MANIFEST_BYTES} are accepted",
                text.len()
            ),
        }]));
    }
    let (root, mut problems) = match format {
        Format::Yaml => yaml::load(text),
        Format::Json => match json::load(text) {
            Ok(root) => (Some(root), Vec::new()),
            Err(problem) => (None, vec![problem]),
        },
    };
    let Some(root) = root else {
        if problems.is_empty() {
            problems.push(Problem {
                path: String::new(),
                line: 1,
                column: 1,
                message: "the manifest is empty; it needs at least name, project and image"
                    .to_owned(),
            });
        }
        return Err(ManifestErrors::new(problems));
    };
    let (manifest, found) = validate::check(&root);
    problems.extend(found);
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(ManifestErrors::new(problems))
    }
}

/// [`parse`] for YAML (1.2, one document).
pub fn parse_yaml(text: &str) -> Result<AppManifest, ManifestErrors> {
    parse(text, Format::Yaml)
}

/// [`parse`] for JSON (RFC 8259).
pub fn parse_json(text: &str) -> Result<AppManifest, ManifestErrors> {
    parse(text, Format::Json)
}

/// Whether `name` is a valid app, project or port name: a DNS label of 1 to
/// 63 lowercase letters, digits or '-', starting with a letter and not ending
/// with '-'. For checking names that arrive elsewhere (URL paths) the same way.
pub fn is_dns_label(name: &str) -> bool {
    names::dns_label(name).is_ok()
}

/// Checks a route host name the way the manifest does (a lowercase DNS name,
/// or `*.` and a domain of at least two labels), for host names that arrive
/// elsewhere (certificates); the error says what is wrong.
pub fn check_hostname(name: &str) -> Result<(), String> {
    names::hostname(name)
}

/// Compiles a `regex` constraint's pattern the way it is meant: matching the
/// whole value (`ssd|nvme` matches `ssd`, not `ssd-slow`). The validator has
/// already compiled every pattern in an [`AppManifest`] this way.
pub fn anchored_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Why a pattern does not compile, on one line.
pub(crate) fn check_regex(pattern: &str) -> Result<(), String> {
    // Alone first: an unbalanced pattern like `a)|(b` could otherwise close
    // the anchoring group and compile to something else.
    let alone = regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build();
    match alone.and_then(|_| anchored_regex(pattern)) {
        Ok(_) => Ok(()),
        Err(regex::Error::CompiledTooBig(limit)) => Err(format!(
            "the pattern compiles to more than {limit} bytes; simplify it"
        )),
        Err(err) => {
            // Syntax errors span several lines (the pattern, a caret, then
            // "error: why"); keep the why.
            let text = err.to_string();
            let why = text
                .lines()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .or_else(|| text.lines().map(str::trim).rfind(|l| !l.is_empty()))
                .unwrap_or("it does not compile");
            Err(why.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_errors_are_one_line_saying_why() {
        assert_eq!(check_regex("ssd|nvme"), Ok(()));
        assert_eq!(check_regex("(ssd"), Err("unclosed group".to_owned()));
        assert_eq!(check_regex("a)|(b"), Err("unopened group".to_owned()));
        assert!(check_regex("[z-a]").unwrap_err().contains("range"));
        assert!(check_regex("a{1000}{1000}").unwrap_err().contains("bytes"));
    }

    #[test]
    fn anchored_regexes_match_whole_values() {
        let re = anchored_regex("ssd|nvme").unwrap();
        assert!(re.is_match("ssd"));
        assert!(re.is_match("nvme"));
        assert!(!re.is_match("ssd-slow"));
        assert!(!re.is_match("fast-nvme"));
    }

    #[test]
    fn dns_labels_are_exposed_for_names_from_elsewhere() {
        assert!(is_dns_label("shop-2"));
        assert!(!is_dns_label("Shop"));
        assert!(!is_dns_label(""));
    }

    #[test]
    fn formats_follow_file_extensions() {
        assert_eq!(Format::from_path(Path::new("app.yaml")), Some(Format::Yaml));
        assert_eq!(
            Format::from_path(Path::new("a/app.yml")),
            Some(Format::Yaml)
        );
        assert_eq!(Format::from_path(Path::new("app.json")), Some(Format::Json));
        assert_eq!(Format::from_path(Path::new("app.toml")), None);
        assert_eq!(Format::from_path(Path::new("app")), None);
    }
}
