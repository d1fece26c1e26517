//! Where each YAML node is: splits a file into documents and maps field paths to line and column.
//!
//! serde tells us *that* a value is wrong; validation done after deserializing only knows the field
//! path. This index, built from the parser's events, turns `spec.ingress[1].port.number` back into
//! `file:12:9` so every error points at the node to fix.
//!
//! Indexing costs as much as parsing the YAML again, so it is done only for a document that has
//! an error to report: [`split`] cuts a file into documents by their `---` markers alone, and a
//! document indexes itself the first time a position is asked of it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde_saphyr::granit_parser::{Event, Parser};

/// One YAML document of a file: its text span and the position of every node in it.
#[derive(Debug, Clone)]
pub struct Document {
    /// 1-based line where the document starts in the file (its `---` line when explicit).
    pub first_line: usize,
    /// Byte range of the document's text in the file, from the start of `first_line`.
    pub text: std::ops::Range<usize>,
    /// Field path (`spec.egress[0].port`) → (line, column), both 1-based, in file coordinates;
    /// built on first use.
    positions: OnceLock<HashMap<String, (usize, usize)>>,
    /// The whole file's text, for indexing on demand.
    source: Option<Arc<str>>,
    /// The document holds no node at all (a stray `---`, only comments).
    pub empty: bool,
}

impl Document {
    /// The document's own text.
    pub fn body<'a>(&'a self, file_text: &'a str) -> &'a str {
        &file_text[self.text.clone()]
    }

    fn positions(&self) -> &HashMap<String, (usize, usize)> {
        self.positions.get_or_init(|| {
            let Some(source) = &self.source else {
                return HashMap::new();
            };
            let body = &source[self.text.clone()];
            let shift = self.first_line - 1;
            match index(body) {
                Ok(docs) => docs
                    .into_iter()
                    .flat_map(|d| d.positions.into_inner().unwrap_or_default())
                    .map(|(k, (line, col))| (k, (line + shift, col)))
                    .collect(),
                Err(_) => HashMap::new(),
            }
        })
    }

    /// The YAML syntax error in this document, if it has one, in file coordinates.
    pub fn syntax_error(&self) -> Option<SyntaxError> {
        let source = self.source.as_ref()?;
        index(&source[self.text.clone()])
            .err()
            .map(|e| SyntaxError {
                line: e.line + self.first_line - 1,
                ..e
            })
    }

    /// Position of the node at `path`, or of its nearest ancestor that exists.
    pub fn position(&self, path: &str) -> (usize, usize) {
        let positions = self.positions();
        let mut p = path;
        loop {
            if let Some(pos) = positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return positions.get("").copied().unwrap_or((self.first_line, 1)),
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

/// Splits `source` into documents at its document markers (`---` or `...` at the start of a
/// line, which YAML reserves there in any context), without parsing it.
pub fn split(source: &Arc<str>) -> Vec<Document> {
    let text: &str = source;
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut first_line = 1usize;
    let mut content = false;
    let mut offset = 0usize;
    let mut marker_open = false;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = |m: &str| {
            bare.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if marker("---") || marker("...") {
            if content || marker_open {
                docs.push(Document {
                    first_line,
                    text: start..offset,
                    positions: OnceLock::new(),
                    source: Some(source.clone()),
                    empty: !content,
                });
            }
            let starts = marker("---");
            // `...` ends a document; what follows until the next `---` is not part of one.
            start = offset;
            first_line = n + 1;
            content = starts && !bare[3..].trim().is_empty() && !bare[3..].trim().starts_with('#');
            marker_open = starts;
            if !starts {
                start = offset + line.len();
                first_line = n + 2;
            }
        } else {
            let t = bare.trim_start();
            if !t.is_empty() && !t.starts_with('#') {
                content = true;
            }
        }
        offset += line.len();
    }
    if content || marker_open {
        docs.push(Document {
            first_line,
            text: start..text.len(),
            positions: OnceLock::new(),
            source: Some(source.clone()),
            empty: !content,
        });
    }
    docs
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
                    positions: OnceLock::from(HashMap::new()),
                    source: None,
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
        let Some(positions) = docs.last_mut().and_then(|d| d.positions.get_mut()) else {
            continue;
        };
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
                    positions.entry(full).or_insert(pos);
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
        positions.entry(path.clone()).or_insert(pos);
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
    fn split_matches_the_parser() {
        let text = "a: 1\n---\nb: 2\nc: 3\n---\n# only a comment\n---\nd: 4\n...\n--- {e: 5}\n";
        let source: Arc<str> = Arc::from(text);
        let docs = split(&source);
        assert_eq!(docs.len(), 5);
        assert_eq!(docs[0].body(text), "a: 1\n");
        assert_eq!(docs[1].body(text), "---\nb: 2\nc: 3\n");
        assert!(docs[2].empty);
        assert_eq!((docs[3].first_line, docs[3].body(text)), (7, "---\nd: 4\n"));
        assert_eq!(docs[3].position("d"), (8, 1));
        assert_eq!(docs[1].position("c"), (4, 1));
        assert_eq!(docs[4].body(text), "--- {e: 5}\n");
        assert!(!docs[4].empty);
        // A block scalar's content is indented, so a `---` inside one cannot be at column 0.
        let text = "a: |\n  ---\n  x\nb: 2\n";
        assert_eq!(split(&Arc::from(text)).len(), 1);
    }

    #[test]
    fn syntax_error_has_position() {
        let err = index("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.line >= 1, "{err:?}");
    }
}
