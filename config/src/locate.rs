//! Where each YAML node is: splits a file into documents and maps field paths to line and column.
//!
//! serde tells us *that* a value is wrong; validation done after deserializing only knows the field
//! path. This index, built from the parser's events, turns `spec.ingress[1].port.number` back into
//! `file:12:9` so every error points at the node to fix.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// One YAML document of a file: its text span and the position of every node in it.
#[derive(Debug, Clone)]
pub struct Document {
    /// 1-based line where the document starts in the file (its `---` line when explicit).
    pub first_line: usize,
    /// Byte range of the document's text in the file, from the start of `first_line`.
    pub text: std::ops::Range<usize>,
    /// Field path (`spec.egress[0].port`) → (line, column), both 1-based, in file coordinates.
    positions: HashMap<String, (usize, usize)>,
    /// The document holds no node at all (a stray `---`, only comments).
    pub empty: bool,
}

impl Document {
    /// Position of the node at `path`, or of its nearest ancestor that exists.
    pub fn position(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => {
                    return self
                        .positions
                        .get("")
                        .copied()
                        .unwrap_or((self.first_line, 1))
                }
            }
        }
    }
}

/// A YAML syntax error, with its 1-based position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Splits `text` into documents and indexes the position of every node.
pub fn index(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_offset = |line: usize| {
        line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(text.len())
    };

    let mut docs: Vec<Document> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut nodes_in_doc = 0usize;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| SyntaxError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_string(),
        })?;
        let pos = (span.start.line(), span.start.col() + 1);
        let (is_node, opens) = match &event {
            Event::DocumentStart(..) => {
                let first_line = span.start.line().max(1);
                if let Some(prev) = docs.last_mut() {
                    prev.text.end = line_offset(first_line).max(prev.text.start);
                    prev.empty = nodes_in_doc == 0;
                }
                docs.push(Document {
                    first_line,
                    text: line_offset(first_line)..text.len(),
                    positions: HashMap::new(),
                    empty: false,
                });
                nodes_in_doc = 0;
                stack.clear();
                continue;
            }
            Event::Scalar(value, style, ..) => {
                // A document holding only a plain null (`---` alone, or only comments) is empty.
                let trivial = stack.is_empty()
                    && matches!(value.as_ref(), "" | "~" | "null")
                    && matches!(style, serde_saphyr::granit_parser::ScalarStyle::Plain);
                (!trivial, false)
            }
            Event::Alias(..) => (true, false),
            Event::SequenceStart(..) | Event::MappingStart(..) => (true, true),
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
                continue;
            }
            _ => continue,
        };
        if !is_node {
            continue;
        }
        nodes_in_doc += 1;
        let Some(doc) = docs.last_mut() else { continue };
        let path = match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // This node is a key.
                    let k = match &event {
                        Event::Scalar(v, ..) => v.to_string(),
                        _ => "?".to_string(),
                    };
                    let full = join(path, &k);
                    doc.positions.entry(full).or_insert(pos);
                    *key = Some(k);
                    if opens {
                        // A complex key: index its insides under a placeholder, never reported.
                        stack.push(Frame::Map {
                            path: "?".into(),
                            key: None,
                        });
                    }
                    continue;
                }
                Some(k) => join(path, &k),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                p
            }
        };
        doc.positions.entry(path.clone()).or_insert(pos);
        if opens {
            stack.push(match event {
                Event::MappingStart(..) => Frame::Map { path, key: None },
                _ => Frame::Seq { path, index: 0 },
            });
        }
    }
    if let Some(last) = docs.last_mut() {
        last.empty = nodes_in_doc == 0;
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_nested_fields() {
        let text = "a: 1\nspec:\n  ingress:\n  - port:\n      number: 80\n  - bind: x\n";
        let docs = index(text).unwrap();
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(d.position("spec.ingress[0].port.number"), (5, 7));
        assert_eq!(d.position("spec.ingress[1].bind"), (6, 5));
        assert_eq!(d.position("spec.ingress[1].nothere"), (6, 5));
        assert_eq!(d.position("a"), (1, 1));
    }

    #[test]
    fn splits_documents() {
        let text = "a: 1\n---\nb: 2\nc: 3\n---\n# only a comment\n---\nd: 4\n";
        let docs = index(text).unwrap();
        assert_eq!(docs.len(), 4);
        assert_eq!(&text[docs[0].text.clone()], "a: 1\n");
        assert_eq!(&text[docs[1].text.clone()], "---\nb: 2\nc: 3\n");
        assert!(docs[2].empty);
        assert_eq!(docs[3].first_line, 7);
        assert_eq!(docs[3].position("d"), (8, 1));
        assert_eq!(docs[1].position("c"), (4, 1));
    }

    #[test]
    fn syntax_error_has_position() {
        let err = index("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.line >= 1, "{err:?}");
    }
}
