//! Bounded fuzzing of the manifest parser, inside the normal test suite:
//! whatever the text, YAML or JSON, parsing gives a manifest or errors
//! (each with a message), and never panics. A few seconds per property.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use keel_manifest::{Format, parse};
use proptest::prelude::*;
use proptest::test_runner::Config;

const YAML: &str = include_str!("../examples/app.yaml");
const JSON: &str = include_str!("../examples/app.json");

fn config(cases: u32) -> Config {
    Config {
        cases,
        // A failure is reported with its minimal input; nothing is written
        // into the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Parses in both formats: each gives a value or at least one problem
/// with a message.
fn parses_or_explains(text: &str) {
    for format in [Format::Yaml, Format::Json] {
        match parse(text, format) {
            Ok(manifest) => assert!(!manifest.name.is_empty()),
            Err(errors) => {
                let problems = errors.into_problems();
                assert!(!problems.is_empty(), "{format:?}: an error with no problem");
                assert!(
                    problems.iter().all(|p| !p.message.is_empty()),
                    "{format:?}: a problem without a message"
                );
            }
        }
    }
}

/// Characters that mean something to YAML or JSON, and some that are
/// several bytes long, so that mutations hit the parsers' corners.
fn syntax() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            ":", "-", " ", "\n", "\t", "{", "}", "[", "]", ",", "\"", "'", "#", "&", "*", "!", "|",
            ">", "%", "@", "`", "?", "\\", "\\u", "0", "1e999", "-1", "null", "true", "~", "<<",
            "!!str", "é", "😀", "\u{feff}", "\u{0}", "\r", "---", "...",
        ]),
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

/// One edit of a text at character positions (never inside a character).
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, len: usize, text: String },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Truncate { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0usize..20).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), syntax()).prop_map(|(at, text)| Edit::Insert { at, text }),
        (any::<usize>(), 0usize..10, syntax()).prop_map(|(at, len, text)| Edit::Replace {
            at,
            len,
            text
        }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let string = |c: &[char]| c.iter().collect::<String>();
    match edit {
        Edit::Delete { at, len } => {
            let at = at % (n + 1);
            let end = (at + len).min(n);
            string(&chars[..at]) + &string(&chars[end..])
        }
        Edit::Insert { at, text } => {
            let at = at % (n + 1);
            string(&chars[..at]) + text + &string(&chars[at..])
        }
        Edit::Replace { at, len, text } => {
            let at = at % (n + 1);
            let end = (at + len).min(n);
            string(&chars[..at]) + text + &string(&chars[end..])
        }
        Edit::DuplicateLine { line } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
        Edit::SwapLines { a, b } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let len = lines.len();
                lines.swap(a % len, b % len);
            }
            lines.join("\n")
        }
        Edit::Truncate { at } => string(&chars[..at % (n + 1)]),
    }
}

#[test]
fn the_examples_parse_so_mutations_start_from_valid_input() {
    parse(YAML, Format::Yaml).unwrap();
    parse(JSON, Format::Json).unwrap();
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        parses_or_explains(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_syntax_never_panics(parts in prop::collection::vec(syntax(), 0..40)) {
        parses_or_explains(&parts.concat());
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn mutated_yaml_manifests_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        let text = edits.iter().fold(YAML.to_owned(), |text, e| apply(&text, e));
        parses_or_explains(&text);
    }

    #[test]
    fn mutated_json_manifests_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        let text = edits.iter().fold(JSON.to_owned(), |text, e| apply(&text, e));
        parses_or_explains(&text);
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Nesting far past the parsers' depth limit is an error, not a stack
    /// overflow.
    #[test]
    fn deep_nesting_never_panics(depth in 0usize..5000, open in prop::sample::select(vec!["[", "{\"a\":", "- "])) {
        parses_or_explains(&open.repeat(depth));
    }
}
