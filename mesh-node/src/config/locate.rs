//! Where a field is in a YAML text: semantic errors (a duplicate address, an empty name) are
//! found after deserializing, which keeps no positions, so the field path the validator names
//! (`workloads[1].ips[0]`) is looked up again in the text's marked event stream
//! (`saphyr-parser`). Also tells an empty document (nothing but comments) from a configuration.

use std::fmt;

use saphyr_parser::{Event, Parser, Span};

/// A line and column in a YAML text, both from 1 (as `serde_yaml_ng` reports them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

fn position(span: &Span) -> Position {
    Position {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// Whether `text` holds no YAML node at all (empty, blanks, comments, a bare `---`) or only a
/// null. A text that does not parse is not empty: the deserializer reports its error.
#[must_use]
pub fn is_empty_document(text: &str) -> bool {
    for event in Parser::new_from_str(text) {
        match event {
            Ok((Event::StreamStart | Event::DocumentStart(_) | Event::Nothing, _)) => {}
            Ok((Event::StreamEnd | Event::DocumentEnd, _)) => return true,
            Ok((Event::Scalar(value, style, _, tag), _)) => {
                return tag.is_none()
                    && style == saphyr_parser::ScalarStyle::Plain
                    && matches!(&*value, "" | "~" | "null" | "Null" | "NULL");
            }
            Ok(_) | Err(_) => return false,
        }
    }
    true
}

/// One open collection while walking the events.
enum Frame {
    /// A mapping at `path`; `key` is the key whose value comes next, if a key was read.
    Map { path: String, key: Option<String> },
    /// A sequence at `path`; `next` is the index of its next item.
    Seq { path: String, next: usize },
    /// A collection used as a mapping key (never a field): skipped with its content.
    Skip,
}

/// The position of `field` (`a.b[2].c`) in `text`: of the key for a mapping entry, of the item
/// for a sequence entry. When the field itself is absent (a default), the position of its
/// closest ancestor that is present; `None` when not even the top-level key is.
#[must_use]
pub fn locate(text: &str, field: &str) -> Option<Position> {
    let mut found: Option<(usize, Position)> = None;
    let mut consider = |path: &str, span: &Span| {
        let matched = path.len();
        let is_prefix = field == path
            || (field.starts_with(path)
                && matches!(field.as_bytes().get(matched), Some(b'.' | b'[')));
        if is_prefix && !path.is_empty() && found.is_none_or(|(len, _)| matched > len) {
            found = Some((matched, position(span)));
        }
    };
    let mut stack: Vec<Frame> = Vec::new();
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else { break };
        let starts = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
        let ends = matches!(event, Event::MappingEnd | Event::SequenceEnd);
        if ends {
            stack.pop();
            continue;
        }
        if !starts && !matches!(event, Event::Scalar(..) | Event::Alias(_)) {
            continue;
        }
        // The path of this node, or `None` inside a skipped key.
        let path = match stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Skip) => None,
            Some(Frame::Seq { path, next }) => {
                let item = format!("{path}[{next}]");
                *next += 1;
                consider(&item, &span);
                Some(item)
            }
            Some(Frame::Map { path, key }) => {
                if let Some(key) = key.take() {
                    Some(join(path, &key))
                } else if let Event::Scalar(name, ..) = &event {
                    // A key: a scalar names a field.
                    let field_path = join(path, name);
                    consider(&field_path, &span);
                    *key = Some(name.to_string());
                    continue;
                } else {
                    // A collection used as a key: skipped, and its value with it.
                    *key = Some(String::new());
                    None
                }
            }
        };
        if starts {
            stack.push(match (path, &event) {
                (Some(path), Event::MappingStart(..)) => Frame::Map { path, key: None },
                (Some(path), _) => Frame::Seq { path, next: 0 },
                (None, _) => Frame::Skip,
            });
        }
    }
    found.map(|(_, position)| position)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# a comment
node: a
workloads:
- name: w0
  ips: [198.18.0.1, 198.18.0.2]
- name: w1
  ips:
    - 198.18.0.3
    - 198.18.0.4
  labels: {app: x}
policies:
- spec:
    rules:
    - from: [{source: {principals: [a]}}]
";

    fn at(field: &str) -> Option<(usize, usize)> {
        locate(TEXT, field).map(|p| (p.line, p.column))
    }

    #[test]
    fn finds_keys_and_items() {
        assert_eq!(at("node"), Some((2, 1)));
        assert_eq!(at("workloads"), Some((3, 1)));
        assert_eq!(at("workloads[0]"), Some((4, 3)));
        assert_eq!(at("workloads[0].ips"), Some((5, 3)));
        assert_eq!(at("workloads[0].ips[1]"), Some((5, 21)));
        assert_eq!(at("workloads[1].name"), Some((6, 3)));
        assert_eq!(at("workloads[1].ips[1]"), Some((9, 7)));
        assert_eq!(at("workloads[1].labels.app"), Some((10, 12)));
        assert_eq!(
            at("policies[0].spec.rules[0].from[0].source.principals[0]"),
            Some((14, 37))
        );
    }

    #[test]
    fn an_absent_field_falls_back_to_its_closest_ancestor() {
        assert_eq!(at("workloads[1].netns"), Some((6, 3)), "the item");
        assert_eq!(at("workloads[0].ips[7]"), Some((5, 3)), "the list");
        assert_eq!(at("proxy.connectTimeoutMs"), None);
        // `node` is a prefix of `nodeX` as text, not as a path.
        assert_eq!(at("nodeX"), None);
    }

    #[test]
    fn empty_documents_are_told_from_configurations() {
        for empty in [
            "",
            "\n",
            "  \n\t\n",
            "# only\n# comments\n",
            "---\n",
            "---\n...\n",
            "~\n",
            "null",
        ] {
            assert!(is_empty_document(empty), "{empty:?}");
        }
        for not_empty in ["{}", "node: a\n", "- a\n", "'null'\n", "[\n", "x"] {
            assert!(!is_empty_document(not_empty), "{not_empty:?}");
        }
    }
}
