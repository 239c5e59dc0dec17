//! How commands print: aligned tables for people, `-o json` and `-o yaml`
//! for scripts (the API's own objects, unchanged).

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints `value` for scripts, or calls `table` for people.
pub fn print(format: Format, value: &Value, table: impl FnOnce(&Value) -> Table) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        ),
        Format::Yaml => print!("{}", yaml(value)),
        Format::Table => print!("{}", table(value)),
    }
}

/// Columns padded to their widest cell, headers in capitals, as kubectl
/// prints them.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    empty: Option<String>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_uppercase()).collect(),
            ..Self::default()
        }
    }

    /// A table that is only a message (`keel scale` and the like say
    /// what they did in a sentence).
    pub fn message(text: impl Into<String>) -> Self {
        Self {
            empty: Some(text.into()),
            ..Self::default()
        }
    }

    /// What to print instead of a header alone when there are no rows.
    pub fn empty(mut self, text: &str) -> Self {
        self.empty = Some(text.to_owned());
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rows.is_empty()
            && let Some(empty) = &self.empty
        {
            return writeln!(f, "{empty}");
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 < row.len() {
                    line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
                } else {
                    line.push_str(cell);
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A string field of a JSON object, or `-`.
pub fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// How long ago a millisecond timestamp was, the way people say it.
pub fn age(time_ms: Option<u64>) -> String {
    let Some(time_ms) = time_ms else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(time_ms);
    let seconds = now.saturating_sub(time_ms) / 1000;
    match seconds {
        0..120 => format!("{seconds}s"),
        120..7200 => format!("{}m", seconds / 60),
        7200..172_800 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// YAML 1.2 for a JSON value: block style, strings quoted whenever a plain
/// scalar could be read as something else.
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                out.push_str(&format!("{pad}{}:", scalar(&Value::String(key.clone()))));
                write_child(child, indent, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&format!("{pad}-"));
                match item {
                    Value::Object(map) if !map.is_empty() => {
                        // The first key shares the dash's line.
                        let mut nested = String::new();
                        write_yaml(item, indent + 2, &mut nested);
                        out.push(' ');
                        out.push_str(nested.trim_start());
                    }
                    _ => write_child(item, indent, out),
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn write_child(child: &Value, indent: usize, out: &mut String) {
    match child {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_yaml(child, indent + 2, out);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_yaml(child, indent + 2, out);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        Value::String(s) => {
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./@:".contains(c))
                && !s.starts_with(['-', '.', '@', ':'])
                && !s.ends_with(':')
                && s.parse::<f64>().is_err()
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~" | ".inf" | ".nan"
                );
            if plain {
                s.clone()
            } else {
                serde_json::to_string(s).unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_quotes_what_would_read_as_another_type() {
        let value = serde_json::json!({
            "name": "web",
            "env": {"PORT": "8080", "FLAG": "true", "EMPTY": "", "TEXT": "a: b", "IMAGE": "example/web:1"},
            "ports": [{"name": "http", "port": 80}, {"name": "x", "port": 81}],
            "command": ["/bin/web", "-v"],
            "nothing": [],
            "none": null,
        });
        let text = yaml(&value);
        // Keys come out sorted (serde_json's map); strings that YAML
        // would read as something else are quoted.
        let expected = "command:\n  - /bin/web\n  - \"-v\"\nenv:\n  EMPTY: \"\"\n  FLAG: \"true\"\n  IMAGE: example/web:1\n  PORT: \"8080\"\n  TEXT: \"a: b\"\nname: web\nnone: null\nnothing: []\nports:\n  - name: http\n    port: 80\n  - name: x\n    port: 81\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["name", "state"]);
        table.row(vec!["a-long-name".into(), "ready".into()]);
        table.row(vec!["b".into(), "pulling".into()]);
        assert_eq!(
            table.to_string(),
            "NAME          STATE\na-long-name   ready\nb             pulling\n"
        );
        assert_eq!(
            Table::new(&["x"]).empty("No apps.").to_string(),
            "No apps.\n"
        );
    }
}
