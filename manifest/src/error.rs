//! What a rejected manifest reports: every problem, each with where it is.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One thing wrong with a manifest.
///
/// `line` and `column` are 1-based and point at the offending value (or key,
/// for an unknown or duplicate field; or the enclosing map, for a missing
/// one). They are 0 when the position is unknown, which happens only for a
/// manifest that reached [`crate::AppManifest`]'s `Deserialize` from
/// something other than text (positions come from the text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Where in the manifest, e.g. `ports[1].port`, `env.FOO`,
    /// `placement.constraints[0].op`. Empty for a problem with the document
    /// itself (a syntax error, an empty file).
    pub path: String,
    pub line: usize,
    pub column: usize,
    /// What is wrong and what is allowed, e.g. `must be 1..65535, got 70000`.
    pub message: String,
}

impl fmt::Display for Problem {
    /// `line:column: path: message`, leaving out what is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A manifest was rejected. Holds every problem found, in document order
/// (by line, then column); never empty.
///
/// `Display` prints one problem per line as `line:column: path: message`, so a
/// CLI can prefix each line with the file name. The API returns
/// [`ManifestErrors::problems`] as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.problems))]
pub struct ManifestErrors {
    problems: Vec<Problem>,
}

fn display_lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

impl ManifestErrors {
    /// Sorts the problems into document order. Callers guarantee at least one.
    pub(crate) fn new(mut problems: Vec<Problem>) -> Self {
        // Stable: problems at one position keep the order they were found in.
        problems.sort_by_key(|p| (p.line, p.column));
        Self { problems }
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }
}
