//! Where each value of a YAML file sits, so that errors found *after* deserialising
//! (a dangling reference, a duplicate name) can still point at a line and column.
//!
//! serde gives positions only for the errors it finds itself. We therefore walk the YAML
//! event stream once more with saphyr's parser and record the position of every node under
//! the same path syntax serde_norway uses in its messages (`routes[2].retry.attempts`).

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span, SpannedEventReceiver};

/// A 1-based line and column in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Node positions of one YAML document, keyed by field path.
#[derive(Debug, Default, Clone)]
pub struct PositionIndex {
    start: Pos,
    nodes: HashMap<String, Pos>,
}

impl PositionIndex {
    /// Position of `path`, or of its closest ancestor that exists, or of the document.
    pub fn locate(&self, path: &str) -> Pos {
        let mut path = path;
        loop {
            if let Some(pos) = self.nodes.get(path) {
                return *pos;
            }
            match parent(path) {
                Some(p) => path = p,
                None => return self.start,
            }
        }
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> None.
fn parent(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

fn pos(span: Span) -> Pos {
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

#[derive(Default)]
struct Collector<'a> {
    events: Vec<(Event<'a>, Span)>,
}

impl<'a> SpannedEventReceiver<'a> for Collector<'a> {
    fn on_event(&mut self, ev: Event<'a>, span: Span) {
        self.events.push((ev, span));
    }
}

/// Indexes every document of `text`. Returns one index per document; a text that the
/// parser refuses yields no index (serde reports the syntax error with its own position).
pub fn index_documents(text: &str) -> Vec<PositionIndex> {
    let mut collector = Collector::default();
    if Parser::new_from_str(text)
        .load(&mut collector, true)
        .is_err()
    {
        return Vec::new();
    }
    let events = collector.events;
    let mut docs = Vec::new();
    let mut i = 0;
    while i < events.len() {
        if let Event::DocumentStart(_) = events[i].0 {
            let mut index = PositionIndex {
                start: pos(events[i].1),
                nodes: HashMap::new(),
            };
            i += 1;
            if i < events.len() && !matches!(events[i].0, Event::DocumentEnd) {
                walk(&events, &mut i, String::new(), &mut index.nodes);
            }
            docs.push(index);
        }
        i += 1;
    }
    docs
}

/// Records the node at `events[*i]` (and its children) under `path`, leaving `*i` just past it.
fn walk(events: &[(Event<'_>, Span)], i: &mut usize, path: String, out: &mut HashMap<String, Pos>) {
    let Some((event, span)) = events.get(*i) else {
        return;
    };
    *i += 1;
    match event {
        Event::SequenceStart(..) => {
            let mut index = 0;
            while *i < events.len() && !matches!(events[*i].0, Event::SequenceEnd) {
                walk(events, i, format!("{path}[{index}]"), out);
                index += 1;
            }
            *i += 1;
        }
        Event::MappingStart(..) => {
            while *i < events.len() && !matches!(events[*i].0, Event::MappingEnd) {
                let key = match &events[*i].0 {
                    Event::Scalar(key, ..) => key.to_string(),
                    _ => "?".to_string(),
                };
                // Skip the key node (a complex key is indexed under a throwaway path).
                walk(events, i, String::from("\u{0}"), &mut HashMap::new());
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                walk(events, i, child, out);
            }
            *i += 1;
        }
        _ => {}
    }
    out.entry(if path.is_empty() { ".".into() } else { path })
        .or_insert(pos(*span));
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
apiVersion: sidemesh.io/v1
routes:
  - name: a
    retry:
      attempts: 0
  - name: b
    backends: [{service: x}, {service: y, weight: 0}]
---
kind: Mesh
";

    #[test]
    fn positions_follow_serde_paths() {
        let docs = index_documents(DOC);
        assert_eq!(docs.len(), 2);
        let first = &docs[0];
        assert_eq!(
            first.locate("routes[0].retry.attempts"),
            Pos {
                line: 5,
                column: 17
            }
        );
        assert_eq!(
            first.locate("routes[1].name"),
            Pos {
                line: 6,
                column: 11
            }
        );
        assert_eq!(
            first.locate("routes[1].backends[1].weight"),
            Pos {
                line: 7,
                column: 51
            }
        );
        // Missing leaves fall back to their closest ancestor.
        assert_eq!(
            first.locate("routes[1].backends[1].port"),
            Pos {
                line: 7,
                column: 30
            }
        );
        assert_eq!(docs[1].locate("kind"), Pos { line: 9, column: 7 });
    }

    #[test]
    fn unparsable_text_has_no_index() {
        assert!(index_documents("a: [1, 2").is_empty());
    }
}
