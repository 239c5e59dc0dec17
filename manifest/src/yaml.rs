//! YAML text to a [`Node`] tree, from `saphyr-parser`'s events (which carry
//! spans). Building the tree here rather than with a loader lets us keep
//! duplicate keys for the validator, resolve scalars ourselves, and turn the
//! YAML features a manifest has no use for (anchors, aliases, tags, several
//! documents) into problems with a path instead of silent surprises.

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, Tag};

use crate::error::Problem;
use crate::tree::{Node, Pos, Value, resolve_plain};

/// Deeper documents are rejected: the tree is dropped recursively, and no
/// manifest comes close.
pub(crate) const MAX_DEPTH: usize = 64;

/// The tree (if the text was well-formed enough to build one) and the
/// problems found on the way. A syntax error ends parsing: YAML cannot be
/// resynchronised reliably after one.
pub(crate) fn load(text: &str) -> (Option<Node>, Vec<Problem>) {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    for event in parser.by_ref() {
        match event {
            Ok((event, span)) => {
                if !builder.on_event(event, pos(span.start)) {
                    break;
                }
            }
            Err(err) => {
                builder.problems.push(Problem {
                    path: String::new(),
                    line: pos(*err.marker()).line,
                    column: pos(*err.marker()).column,
                    message: format!("YAML syntax error: {}", err.info()),
                });
                return (None, builder.problems);
            }
        }
    }
    (builder.root, builder.problems)
}

fn pos(marker: Marker) -> Pos {
    // saphyr's lines are 1-based and its columns 0-based (in characters).
    Pos::new(marker.line(), marker.col() + 1)
}

enum Frame {
    Seq {
        items: Vec<Node>,
        pos: Pos,
    },
    Map {
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
        pos: Pos,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    problems: Vec<Problem>,
    /// Inside a collection that is being skipped (too deep); its depth.
    skipping: usize,
}

impl Builder {
    /// Returns whether to go on.
    fn on_event(&mut self, event: Event<'_>, at: Pos) -> bool {
        if self.skipping > 0 {
            match event {
                Event::SequenceStart(..) | Event::MappingStart(..) => self.skipping += 1,
                Event::SequenceEnd | Event::MappingEnd => self.skipping -= 1,
                _ => {}
            }
            if self.skipping == 0 {
                self.complete(Node::new(Value::Invalid, at));
            }
            return true;
        }
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    self.report(at, "a manifest is one YAML document; found a second one");
                    return false;
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = if anchor != 0 {
                    self.report_anchor(at);
                    Value::Invalid
                } else if let Some(tag) = tag {
                    self.report_tag(at, &tag);
                    Value::Invalid
                } else if style == ScalarStyle::Plain {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                self.complete(Node::new(value, at));
            }
            Event::Alias(_) => {
                self.report_anchor(at);
                self.complete(Node::new(Value::Invalid, at));
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if anchor != 0 {
                    self.report_anchor(at);
                }
                if let Some(tag) = tag {
                    self.report_tag(at, tag);
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.report(at, &format!("nested deeper than {MAX_DEPTH} levels"));
                    self.skipping = 1;
                } else if matches!(event, Event::SequenceStart(..)) {
                    self.stack.push(Frame::Seq {
                        items: Vec::new(),
                        pos: at,
                    });
                } else {
                    self.stack.push(Frame::Map {
                        entries: Vec::new(),
                        key: None,
                        pos: at,
                    });
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq { items, pos }) => Node::new(Value::Seq(items), pos),
                    Some(Frame::Map { entries, pos, .. }) => Node::new(Value::Map(entries), pos),
                    None => return true,
                };
                self.complete(node);
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        true
    }

    fn complete(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }

    /// The path of the node being built, for problems found here.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Seq { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Frame::Map { key: Some(key), .. } => {
                    let name = key.scalar_text().unwrap_or("?");
                    crate::validate::push_key(&mut path, name);
                }
                Frame::Map { key: None, .. } => {}
            }
        }
        path
    }

    fn report(&mut self, at: Pos, message: &str) {
        self.problems.push(Problem {
            path: self.path(),
            line: at.line,
            column: at.column,
            message: message.to_owned(),
        });
    }

    fn report_anchor(&mut self, at: Pos) {
        self.report(
            at,
            "YAML anchors (&name) and aliases (*name) are not supported in manifests; \
             write the value out",
        );
    }

    fn report_tag(&mut self, at: Pos, tag: &Tag) {
        // `op: !=` reads as the tag `!=` on an empty value; say so.
        let message = if tag.handle == "!" && tag.suffix == "=" {
            "`!=` starts a YAML tag; quote it: \"!=\"".to_owned()
        } else {
            format!("YAML tags ({tag}) are not supported in manifests; quote the value instead")
        };
        self.report(at, &message);
    }
}
