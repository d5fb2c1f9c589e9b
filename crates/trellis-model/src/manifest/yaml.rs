//! A YAML (or JSON) document loaded into a tree whose every node remembers
//! the line and column it starts at.
//!
//! The serde-based YAML crates forget positions once a value is deserialised,
//! and silently keep the last of two equal mapping keys. Building our own
//! tree from the parser's events keeps both the positions and every key, so
//! the schema walker can say exactly where each problem is.

use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, ScanError, Span, Tag};

/// A position in the source text; both numbers start at 1. Columns count
/// characters, not bytes, as editors do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(marker: &Marker) -> Pos {
        Pos {
            line: marker.line().max(1),
            column: marker.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A scalar as written. Whether it was quoted decides whether `80` is a
/// number or text, so the style is kept alongside the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scalar {
    pub text: String,
    /// Plain scalars are resolved by their content (null, bool, number,
    /// text); quoted, block and `!!str`-tagged scalars are always text.
    pub plain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: Node,
    pub value: Node,
}

impl Scalar {
    /// YAML 1.2 core schema null: an empty plain scalar, `~` or `null`.
    pub fn is_null(&self) -> bool {
        self.plain && matches!(self.text.as_str(), "" | "~" | "null" | "Null" | "NULL")
    }
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s) if s.is_null())
    }

    /// The plain-scalar text, if this node is a plain scalar.
    pub fn plain_text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s) if s.plain => Some(&s.text),
            _ => None,
        }
    }

    /// How many nodes this subtree holds; used to bound alias expansion.
    fn size(&self) -> usize {
        match &self.value {
            Value::Scalar(_) => 1,
            Value::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|e| e.key.size() + e.value.size())
                    .sum::<usize>()
            }
        }
    }
}

/// Why a document could not be loaded; always a single error, because the
/// parser cannot continue past malformed YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadError {
    pub pos: Pos,
    pub message: String,
}

impl LoadError {
    fn new(pos: Pos, message: impl Into<String>) -> Self {
        LoadError {
            pos,
            message: message.into(),
        }
    }

    fn from_scan(err: &ScanError) -> Self {
        LoadError::new(
            Pos::of(err.marker()),
            format!("YAML syntax error: {}", err.info()),
        )
    }
}

/// Deeper nesting than this is not a manifest; the limit keeps the recursive
/// helpers (size, clone, drop) far from the stack's end on hostile input.
const MAX_DEPTH: usize = 128;

/// Anchors and aliases can describe exponentially large trees in a few
/// lines ("billion laughs"); no real manifest comes near this many nodes.
const MAX_NODES: usize = 200_000;

/// Loads `text` as a single YAML document. `Ok(None)` means the document is
/// empty (or only comments).
pub(crate) fn load(text: &str) -> Result<Option<Node>, LoadError> {
    let mut loader = Loader::default();
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| LoadError::from_scan(&e))?;
        if loader.on_event(event, span)? {
            break;
        }
    }
    Ok(loader.root)
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<Entry>,
        key: Option<Node>,
    },
}

#[derive(Default)]
struct Loader {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
}

impl Loader {
    /// Feeds one event; returns `true` once the stream has ended.
    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<bool, LoadError> {
        let pos = Pos::of(&span.start);
        match event {
            Event::StreamEnd => return Ok(true),
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(LoadError::new(
                        pos,
                        "a second YAML document starts here; a manifest is a single document",
                    ));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let mut plain = style == ScalarStyle::Plain;
                if let Some(tag) = tag {
                    check_tag(&tag, pos)?;
                    if tag.suffix == "str" {
                        plain = false;
                    }
                }
                let node = Node {
                    pos,
                    value: Value::Scalar(Scalar {
                        text: text.into_owned(),
                        plain,
                    }),
                };
                self.count(1, pos)?;
                self.complete(node, anchor, pos)?;
            }
            Event::SequenceStart(anchor, tag) => {
                if let Some(tag) = tag {
                    check_tag(&tag, pos)?;
                }
                self.open(
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    },
                    pos,
                )?;
            }
            Event::MappingStart(anchor, tag) => {
                if let Some(tag) = tag {
                    check_tag(&tag, pos)?;
                }
                self.open(
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    },
                    pos,
                )?;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => (
                        Node {
                            pos,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            pos,
                            value: Value::Map(merge_keys(entries)?),
                        },
                        anchor,
                    ),
                    None => {
                        return Err(LoadError::new(pos, "YAML syntax error: unbalanced end"));
                    }
                };
                self.complete(node, anchor, pos)?;
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(LoadError::new(pos, "alias names an unknown anchor"));
                };
                let (node, size) = (node.clone(), *size);
                self.count(size, pos)?;
                self.complete(node, 0, pos)?;
            }
        }
        Ok(false)
    }

    fn open(&mut self, frame: Frame, pos: Pos) -> Result<(), LoadError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(LoadError::new(
                pos,
                format!("nesting is deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.count(1, pos)?;
        self.stack.push(frame);
        Ok(())
    }

    fn count(&mut self, nodes: usize, pos: Pos) -> Result<(), LoadError> {
        self.nodes = self.nodes.saturating_add(nodes);
        if self.nodes > MAX_NODES {
            return Err(LoadError::new(
                pos,
                format!("the document expands to more than {MAX_NODES} values (through aliases?)"),
            ));
        }
        Ok(())
    }

    /// Hands a finished node to its parent, or makes it the document root.
    fn complete(&mut self, node: Node, anchor: usize, pos: Pos) -> Result<(), LoadError> {
        if anchor != 0 {
            let size = node.size();
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push(Entry {
                    key: k,
                    value: node,
                }),
            },
            None => {
                if self.root.is_some() {
                    return Err(LoadError::new(
                        pos,
                        "a second YAML document starts here; a manifest is a single document",
                    ));
                }
                self.root = Some(node);
            }
        }
        Ok(())
    }
}

/// Only the core schema's tags (`!!str`, `!!int`, …) mean anything to a
/// manifest; an application tag such as `!Ref` would be silently ignored
/// otherwise, so it is refused.
fn check_tag(tag: &Tag, pos: Pos) -> Result<(), LoadError> {
    if tag.is_yaml_core_schema() {
        Ok(())
    } else {
        Err(LoadError::new(
            pos,
            format!("the YAML tag {tag} is not supported in a manifest"),
        ))
    }
}

/// Applies `<<` merge keys (as written with anchors to share settings between
/// components): keys written in the mapping win over merged ones, and among
/// merged mappings the first one listed wins.
fn merge_keys(entries: Vec<Entry>) -> Result<Vec<Entry>, LoadError> {
    if !entries.iter().any(|e| is_merge_key(&e.key)) {
        return Ok(entries);
    }
    let mut own = Vec::with_capacity(entries.len());
    let mut merged = Vec::new();
    for entry in entries {
        if !is_merge_key(&entry.key) {
            own.push(entry);
            continue;
        }
        let sources = match entry.value.value {
            Value::Map(inner) => vec![inner],
            Value::Seq(items) => {
                let mut maps = Vec::with_capacity(items.len());
                for item in items {
                    match item.value {
                        Value::Map(inner) => maps.push(inner),
                        _ => return Err(merge_error(item.pos)),
                    }
                }
                maps
            }
            Value::Scalar(_) => return Err(merge_error(entry.value.pos)),
        };
        merged.extend(sources.into_iter().flatten());
    }
    let mut out = own;
    for entry in merged {
        let present = out.iter().any(|e| same_key(&e.key, &entry.key));
        if !present {
            out.push(entry);
        }
    }
    Ok(out)
}

fn merge_error(pos: Pos) -> LoadError {
    LoadError::new(
        pos,
        "a merge key (<<) must be given a mapping or a list of mappings (usually an alias like *defaults)",
    )
}

fn is_merge_key(node: &Node) -> bool {
    node.plain_text() == Some("<<")
}

fn same_key(a: &Node, b: &Node) -> bool {
    match (&a.value, &b.value) {
        (Value::Scalar(x), Value::Scalar(y)) => x.text == y.text,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_keys(node: &Node) -> Vec<(String, Pos)> {
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .map(|e| match &e.key.value {
                    Value::Scalar(s) => (s.text.clone(), e.key.pos),
                    _ => (String::from("?"), e.key.pos),
                })
                .collect(),
            _ => panic!("not a map: {node:?}"),
        }
    }

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        let root = load("a: 1\nb:\n  - x\n  - y: 2\n").unwrap().unwrap();
        assert_eq!(root.pos, Pos { line: 1, column: 1 });
        let keys = map_keys(&root);
        assert_eq!(keys[1], ("b".into(), Pos { line: 2, column: 1 }));
        let Value::Map(entries) = &root.value else {
            unreachable!()
        };
        let Value::Seq(items) = &entries[1].value.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Pos { line: 3, column: 5 });
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
    }

    #[test]
    fn keeps_duplicate_keys_for_the_schema_to_report() {
        let root = load("a: 1\na: 2\n").unwrap().unwrap();
        assert_eq!(map_keys(&root).len(), 2);
    }

    #[test]
    fn quoted_and_tagged_scalars_are_not_plain() {
        let root = load("[1, '1', \"1\", !!str 1]").unwrap().unwrap();
        let Value::Seq(items) = root.value else {
            panic!()
        };
        let plain: Vec<bool> = items
            .iter()
            .map(|n| matches!(&n.value, Value::Scalar(s) if s.plain))
            .collect();
        assert_eq!(plain, [true, false, false, false]);
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = load("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("YAML syntax error"), "{err:?}");
        assert!(err.pos.line >= 1);
    }

    #[test]
    fn empty_documents_load_as_none() {
        assert_eq!(load("").unwrap(), None);
        assert_eq!(load("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn second_document_is_refused() {
        let err = load("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2);
    }

    #[test]
    fn aliases_expand_and_merge_keys_apply() {
        let root = load("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n")
            .unwrap()
            .unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        let keys: Vec<String> = map_keys(&entries[1].value)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["y", "x"]);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = load(&text).unwrap_err();
        assert!(err.message.contains("more than"), "{err:?}");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = "[".repeat(10_000);
        assert!(load(&text).is_err());
    }

    #[test]
    fn application_tags_are_refused() {
        let err = load("a: !Ref b\n").unwrap_err();
        assert!(err.message.contains("!Ref"), "{err:?}");
    }
}
