//! The document as a tree of values with positions: what the YAML and JSON
//! front ends produce and the validator walks. It keeps what serde would lose:
//! where each value is, duplicate keys, and the text of numbers as written.

use std::fmt;

/// A 1-based position in the text; 0:0 when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn new(line: usize, column: usize) -> Self {
        Self { line, column }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    /// The text as written (`true`, `True`), for fields that take it verbatim.
    Bool(bool, String),
    Int(i128, String),
    /// No manifest field is a float, so only the text is kept, for messages
    /// and for fields that take scalars verbatim.
    Float(String),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order, duplicates included: the validator reports
    /// them. Keys are nodes because YAML allows any node as a key.
    Map(Vec<(Node, Node)>),
    /// Something the front end already reported (an alias, a tag). The
    /// validator accepts it silently so that one mistake is one problem.
    Invalid,
}

impl Node {
    pub fn new(value: Value, pos: Pos) -> Self {
        Self { value, pos }
    }

    /// A scalar's text as the user wrote it: strings as they are, numbers and
    /// booleans in their source spelling. `None` for null and collections.
    pub fn scalar_text(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) | Value::Bool(_, s) | Value::Int(_, s) | Value::Float(s) => Some(s),
            Value::Null | Value::Seq(_) | Value::Map(_) | Value::Invalid => None,
        }
    }
}

/// What a value is, for "expected X, got Y" messages.
pub(crate) struct Describe<'a>(pub &'a Value);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::Null => f.write_str("null"),
            Value::Bool(_, raw) => write!(f, "boolean {raw}"),
            Value::Int(_, raw) => write!(f, "integer {raw}"),
            Value::Float(raw) => write!(f, "float {raw}"),
            Value::Str(s) => write!(f, "string {s:?}"),
            Value::Seq(_) => f.write_str("a list"),
            Value::Map(_) => f.write_str("a map"),
            Value::Invalid => f.write_str("an invalid value"),
        }
    }
}

/// Resolves an unquoted YAML scalar by the YAML 1.2 core schema: `yes`, `on`
/// and `0777` are not the booleans and octal numbers of YAML 1.1.
pub(crate) fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true, text.to_owned()),
        "false" | "False" | "FALSE" => return Value::Bool(false, text.to_owned()),
        _ => {}
    }
    if let Some(n) = parse_core_int(text) {
        return Value::Int(n, text.to_owned());
    }
    if is_core_float(text) || is_decimal(text) {
        // A decimal integer too large for i128 is still a number, not a string.
        return Value::Float(text.to_owned());
    }
    Value::Str(text.to_owned())
}

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_core_int(text: &str) -> Option<i128> {
    if let Some(octal) = text.strip_prefix("0o") {
        return non_empty(octal).and_then(|d| i128::from_str_radix(d, 8).ok());
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return non_empty(hex)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| i128::from_str_radix(d, 16).ok());
    }
    if is_decimal(text) {
        return text.parse().ok();
    }
    None
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, `[-+]?.inf`, `.nan`.
fn is_core_float(text: &str) -> bool {
    if matches!(text, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") {
        return true;
    }
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
            all_digits(int) && all_digits(frac) && !(int.is_empty() && frac.is_empty())
        }
        None => is_decimal(mantissa) && !mantissa.starts_with(['-', '+']),
    };
    let exponent_ok = exponent.is_none_or(is_decimal);
    mantissa_ok && exponent_ok
}

/// Lets [`crate::AppManifest`]'s `Deserialize` run the same validator as the
/// text parsers: any self-describing format becomes a tree without positions.
impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a manifest value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(unpositioned(Value::Bool(v, v.to_string())))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(unpositioned(Value::Int(v.into(), v.to_string())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(unpositioned(Value::Int(v.into(), v.to_string())))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(unpositioned(Value::Int(v, v.to_string())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(unpositioned(Value::Float(v.to_string())))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(unpositioned(Value::Str(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(unpositioned(Value::Str(v)))
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(unpositioned(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(unpositioned(Value::Null))
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(unpositioned(Value::Seq(items)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(unpositioned(Value::Map(entries)))
    }
}

fn unpositioned(value: Value) -> Node {
    Node::new(value, Pos::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_resolve_by_the_yaml_1_2_core_schema() {
        let int = |n: i128, s: &str| Value::Int(n, s.to_owned());
        let cases = [
            ("", Value::Null),
            ("~", Value::Null),
            ("NULL", Value::Null),
            ("True", Value::Bool(true, "True".into())),
            ("yes", Value::Str("yes".into())),
            ("off", Value::Str("off".into())),
            ("42", int(42, "42")),
            ("-7", int(-7, "-7")),
            ("+7", int(7, "+7")),
            ("0o17", int(15, "0o17")),
            ("0x1F", int(31, "0x1F")),
            ("0777", int(777, "0777")),
            ("0x", Value::Str("0x".into())),
            ("0xZZ", Value::Str("0xZZ".into())),
            ("1.5", Value::Float("1.5".into())),
            (".5", Value::Float(".5".into())),
            ("1e3", Value::Float("1e3".into())),
            ("-.inf", Value::Float("-.inf".into())),
            (".nan", Value::Float(".nan".into())),
            ("1e", Value::Str("1e".into())),
            (".", Value::Str(".".into())),
            ("5s", Value::Str("5s".into())),
            ("1.2.3", Value::Str("1.2.3".into())),
            (
                "123456789012345678901234567890123456789012",
                Value::Float("123456789012345678901234567890123456789012".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(resolve_plain(text), want, "{text:?}");
        }
    }
}
