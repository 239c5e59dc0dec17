//! JSON text to a [`Node`] tree.
//!
//! `serde_json` decides what is valid JSON and reports syntax errors with
//! their line and column; it has no positions for values that parse, so a
//! small scanner then walks the (now known-good) text to build the tree with
//! positions. String literals are decoded by `serde_json` too, so escapes
//! and surrogate pairs mean exactly what they mean there.
//!
//! Feeding JSON to the YAML parser instead would accept non-JSON (comments,
//! unquoted strings) in a file that claims to be JSON, and YAML's rules on
//! tabs and `\u` escapes differ from JSON's at the edges.

use crate::error::Problem;
use crate::tree::{Node, Pos, Value};

/// The tree, or the syntax error (one: JSON cannot be resynchronised either).
pub(crate) fn load(text: &str) -> Result<Node, Problem> {
    if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(syntax_problem(text, &err));
    }
    let mut scanner = Scanner {
        text,
        at: 0,
        line: 1,
        column: 1,
    };
    scanner.skip_whitespace();
    let node = scanner.value(0)?;
    Ok(node)
}

fn syntax_problem(text: &str, err: &serde_json::Error) -> Problem {
    // serde_json's Display appends " at line L column C"; keep only what.
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    // serde_json counts columns in bytes, and 0 for an error right after a
    // newline; the rest of the crate counts characters from 1.
    let line_text = text
        .split('\n')
        .nth(err.line().saturating_sub(1))
        .unwrap_or("");
    let byte_column = err.column().min(line_text.len());
    let before = line_text.get(..byte_column.saturating_sub(1)).unwrap_or("");
    let column = before.chars().count() + 1;
    // `[1, 2,]` and `{"a": 1,}` get serde_json's word for what should come
    // next; the mistake is the comma.
    let preceding = text
        .split('\n')
        .take(err.line().saturating_sub(1))
        .chain(std::iter::once(before))
        .collect::<Vec<_>>()
        .join("\n");
    let message = if preceding.trim_end().ends_with(',') {
        format!("JSON syntax error: trailing comma ({what})")
    } else {
        format!("JSON syntax error: {what}")
    };
    Problem {
        path: String::new(),
        line: err.line(),
        column,
        message,
    }
}

struct Scanner<'a> {
    text: &'a str,
    /// Byte offset.
    at: usize,
    line: usize,
    /// In characters, like the YAML front end.
    column: usize,
}

impl Scanner<'_> {
    fn pos(&self) -> Pos {
        Pos::new(self.line, self.column)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Moves over `n` bytes, keeping line and column.
    fn advance(&mut self, n: usize) {
        let end = (self.at + n).min(self.text.len());
        for &b in &self.text.as_bytes()[self.at..end] {
            if b == b'\n' {
                self.line += 1;
                self.column = 1;
            } else if b & 0xC0 != 0x80 {
                // Not a UTF-8 continuation byte: a new character.
                self.column += 1;
            }
        }
        self.at = end;
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.advance(1);
        }
    }

    /// An error in text `serde_json` accepted: a bug here, but reported, not
    /// panicked on.
    fn unexpected(&self) -> Problem {
        Problem {
            path: String::new(),
            line: self.line,
            column: self.column,
            message: "JSON syntax error: unexpected input".to_owned(),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, Problem> {
        let pos = self.pos();
        if depth > crate::yaml::MAX_DEPTH {
            return Err(Problem {
                path: String::new(),
                line: pos.line,
                column: pos.column,
                message: format!("nested deeper than {} levels", crate::yaml::MAX_DEPTH),
            });
        }
        let value = match self.peek() {
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => Value::Str(self.string()?),
            Some(b't') => self.keyword("true", Value::Bool(true, "true".to_owned()))?,
            Some(b'f') => self.keyword("false", Value::Bool(false, "false".to_owned()))?,
            Some(b'n') => self.keyword("null", Value::Null)?,
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => return Err(self.unexpected()),
        };
        Ok(Node::new(value, pos))
    }

    fn keyword(&mut self, word: &str, value: Value) -> Result<Value, Problem> {
        if !self.text[self.at..].starts_with(word) {
            return Err(self.unexpected());
        }
        self.advance(word.len());
        Ok(value)
    }

    fn number(&mut self) -> Value {
        let start = self.at;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.advance(1);
        }
        let raw = &self.text[start..self.at];
        match raw.parse::<i128>() {
            Ok(n) => Value::Int(n, raw.to_owned()),
            Err(_) => Value::Float(raw.to_owned()),
        }
    }

    fn string(&mut self) -> Result<String, Problem> {
        let start = self.at;
        let bytes = self.text.as_bytes();
        let mut end = start + 1;
        while end < bytes.len() {
            match bytes[end] {
                b'\\' => end += 2,
                b'"' => break,
                _ => end += 1,
            }
        }
        let literal = self
            .text
            .get(start..=end)
            .ok_or_else(|| self.unexpected())?;
        let decoded = serde_json::from_str::<String>(literal).map_err(|_| self.unexpected())?;
        self.advance(end + 1 - start);
        Ok(decoded)
    }

    fn expect(&mut self, byte: u8) -> Result<(), Problem> {
        self.skip_whitespace();
        if self.peek() != Some(byte) {
            return Err(self.unexpected());
        }
        self.advance(1);
        self.skip_whitespace();
        Ok(())
    }

    fn object(&mut self, depth: usize) -> Result<Value, Problem> {
        let mut entries = Vec::new();
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.advance(1);
            return Ok(Value::Map(entries));
        }
        loop {
            let key_pos = self.pos();
            let key = Node::new(Value::Str(self.string()?), key_pos);
            self.expect(b':')?;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.expect(b',')?,
                Some(b'}') => {
                    self.advance(1);
                    return Ok(Value::Map(entries));
                }
                _ => return Err(self.unexpected()),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, Problem> {
        let mut items = Vec::new();
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.advance(1);
            return Ok(Value::Seq(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.expect(b',')?,
                Some(b']') => {
                    self.advance(1);
                    return Ok(Value::Seq(items));
                }
                _ => return Err(self.unexpected()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_positions_counted_in_characters() {
        let text = "{\n  \"a\": [1, \"é\\u00e9\", true],\n\t\"b\": {\"c\": null, \"d\": -2.5e3}\n}";
        let root = load(text).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map: {root:?}")
        };
        assert_eq!(entries[0].0.pos, Pos::new(2, 3));
        let Value::Seq(items) = &entries[0].1.value else {
            panic!()
        };
        assert_eq!(items[1].value, Value::Str("éé".into()));
        assert_eq!(items[2].pos, Pos::new(2, 23));
        assert_eq!(entries[1].0.pos, Pos::new(3, 2));
        let Value::Map(inner) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(inner[1].1.value, Value::Float("-2.5e3".into()));
        assert_eq!(inner[1].1.pos, Pos::new(3, 24));
    }

    #[test]
    fn syntax_errors_have_a_line_and_column() {
        let err = load("{\n  \"a\": 1,\n  \"b\" 2\n}").unwrap_err();
        assert_eq!((err.line, err.column), (3, 7));
        assert_eq!(err.message, "JSON syntax error: expected `:`");
    }
}
