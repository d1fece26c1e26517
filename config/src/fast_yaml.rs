//! A fast reader for the block-style YAML that configs are written in, tried before serde-saphyr.
//!
//! serde-saphyr reads about 8 MB/s here, so a 10,000-route VirtualService (800 KiB) took 100 ms to
//! parse on every reload. This reader understands a strict subset — block mappings and sequences,
//! one-line flow collections, plain and quoted one-line scalars, literal and folded block scalars,
//! comments — builds a small tree borrowing from the text, and deserializes from it. Whatever lies
//! outside the subset (anchors, aliases, tags, multi-line plain or quoted scalars, tabs, duplicate
//! keys, a scalar whose type is not plain to see, any syntax error) makes it give up with
//! [`Unsupported`], and the caller reads the document with serde-saphyr, which either accepts it or
//! explains what is wrong. So this reader never has to produce an error message, and it must never
//! accept a document serde-saphyr would refuse or read it differently: the fuzz target
//! `fast_yaml` and a debug-build cross-check on every document loaded hold it to that.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

/// The document is outside this reader's subset, or does not fit the type: read it the careful way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("outside the fast YAML subset")
    }
}

impl std::error::Error for Unsupported {}

impl de::Error for Unsupported {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Unsupported
    }
}

type Result<T> = std::result::Result<T, Unsupported>;

/// Deserializes one YAML document (the text between `---` markers) if it lies inside the subset.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T> {
    let tree = parse(text)?;
    T::deserialize(De {
        nodes: &tree.nodes,
        node: &tree.root,
    })
}

/// Reads `text` with serde-saphyr (as the loader does) and compares with what the fast reader
/// made of it: the differential check of debug builds and of the `fast_yaml` fuzz target.
pub fn check_against_serde_saphyr<T: DeserializeOwned + fmt::Debug>(
    text: &str,
    fast: &T,
) -> std::result::Result<(), String> {
    match serde_saphyr::from_str_with_options::<T>(text, crate::load::parse_options()) {
        Ok(careful) if format!("{careful:?}") == format!("{fast:?}") => Ok(()),
        Ok(careful) => Err(format!(
            "fast YAML reader disagrees with serde-saphyr: {fast:?} against {careful:?} on:\n{text}"
        )),
        Err(e) => Err(format!(
            "fast YAML reader accepted what serde-saphyr refuses ({e}):\n{text}"
        )),
    }
}

/// Nesting deeper than this gives up, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 64;
/// YAML's limit on an implicit key's length.
const MAX_KEY: usize = 1024;

/// A parsed node, borrowing its text where no unescaping was needed. Collections refer to their
/// children in the tree's one node list, so a 10,000-route document costs a few allocations, not
/// one per collection.
#[derive(Debug, PartialEq)]
pub(crate) enum Node<'a> {
    /// `plain` scalars are the unquoted ones, whose type is read from the text.
    Scalar { text: Cow<'a, str>, plain: bool },
    /// `len` items at `first` in [`Tree::nodes`].
    Seq { first: u32, len: u32 },
    /// `len` entries: `2 * len` nodes at `first` in [`Tree::nodes`], each key before its value.
    Map { first: u32, len: u32 },
}

/// A parsed document: its root and every other node.
#[derive(Debug)]
pub(crate) struct Tree<'a> {
    nodes: Vec<Node<'a>>,
    root: Node<'a>,
}

/// Where collections are put together: children wait on `stack` until their collection ends,
/// then move to `nodes` side by side.
struct Builder<'a> {
    nodes: Vec<Node<'a>>,
    stack: Vec<Node<'a>>,
}

impl<'a> Builder<'a> {
    /// The sequence of the items pushed since `mark`.
    fn seq(&mut self, mark: usize) -> Result<Node<'a>> {
        let (first, len) = self.take(mark)?;
        Ok(Node::Seq { first, len })
    }

    /// The mapping of the key-value pairs pushed since `mark`; merge keys and duplicate keys are
    /// left to serde-saphyr.
    fn map(&mut self, mark: usize) -> Result<Node<'a>> {
        let pairs = &self.stack[mark..];
        let merge = pairs
            .iter()
            .step_by(2)
            .any(|k| matches!(k, Node::Scalar { text, plain: true } if text == "<<"));
        if merge || has_duplicate_keys(pairs) {
            return Err(Unsupported);
        }
        let (first, len) = self.take(mark)?;
        Ok(Node::Map {
            first,
            len: len / 2,
        })
    }

    fn take(&mut self, mark: usize) -> Result<(u32, u32)> {
        let first = u32::try_from(self.nodes.len()).map_err(|_| Unsupported)?;
        let len = u32::try_from(self.stack.len() - mark).map_err(|_| Unsupported)?;
        self.nodes.extend(self.stack.drain(mark..));
        Ok((first, len))
    }
}

impl Node<'_> {
    fn null() -> Self {
        Node::Scalar {
            text: Cow::Borrowed(""),
            plain: true,
        }
    }

    /// YAML 1.2 core schema nulls: an empty value, `~`, `null`, `Null`, `NULL`.
    fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true } if matches!(&**text, "" | "~" | "null" | "Null" | "NULL"))
    }
}

/// One line: its indentation in spaces, what follows it, and the whole line (for block scalars).
#[derive(Clone, Copy)]
struct Line<'a> {
    indent: usize,
    content: &'a str,
    raw: &'a str,
}

impl Line<'_> {
    /// Blank or comment-only: ignored between nodes.
    fn is_blank(&self) -> bool {
        self.content.is_empty() || self.content.starts_with('#')
    }
}

/// Parses one document into a tree.
pub(crate) fn parse(text: &str) -> Result<Tree<'_>> {
    check_characters(text)?;
    let mut lines = Vec::with_capacity(text.len() / 24 + 1);
    // A final line break ends the last line; it does not start an empty one.
    let body = text.strip_suffix('\n').unwrap_or(text);
    for raw in body.split('\n') {
        let raw = match raw.strip_suffix('\r') {
            Some(r) => r,
            None => raw,
        };
        if raw.contains('\r') {
            return Err(Unsupported);
        }
        let content = raw.trim_start_matches(' ');
        let indent = raw.len() - content.len();
        let content = content.trim_end_matches(' ');
        let marker = |m: &str| {
            content
                .strip_prefix(m)
                .is_some_and(|r| r.is_empty() || r.starts_with(' '))
        };
        if indent == 0 && (marker("---") || marker("...")) && !lines.is_empty() {
            // Document markers past the first line are the splitter's business, not ours.
            return Err(Unsupported);
        }
        lines.push(Line {
            indent,
            content,
            raw,
        });
    }
    let mut p = Parser {
        lines,
        pos: 0,
        depth: 0,
        b: Builder {
            // About one node per five bytes in route-heavy documents; capacity never touched
            // costs no memory.
            nodes: Vec::with_capacity(text.len() / 4),
            stack: Vec::new(),
        },
    };
    if let Some(line) = p.lines.first() {
        if line.indent == 0 && line.content.starts_with("---") {
            // The explicit start of this document; content after the marker is left to serde-saphyr.
            if !(line.content == "---" || line.content.starts_with("--- #")) {
                return Err(Unsupported);
            }
            p.pos = 1;
        } else if line.indent == 0 && line.content.starts_with("...") {
            return Err(Unsupported);
        }
    }
    let root = p.block_node(None, false)?;
    p.skip_blank();
    if p.pos < p.lines.len() {
        return Err(Unsupported);
    }
    Ok(Tree {
        nodes: p.b.nodes,
        root,
    })
}

/// Only LF (with an optional CR before it) and printable characters; no tabs, no BOM, none of the
/// characters that YAML treats specially or forbids.
fn check_characters(text: &str) -> Result<()> {
    let bad_ascii = |b: u8| (b < 0x20 && b != b'\n' && b != b'\r') || b == 0x7f;
    if text.bytes().any(bad_ascii) {
        return Err(Unsupported);
    }
    if !text.is_ascii()
        && text.chars().any(|c| {
            matches!(
                c,
                '\u{80}'
                    ..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            )
        })
    {
        return Err(Unsupported);
    }
    Ok(())
}

/// A block sequence entry: `-` alone or followed by a space.
fn is_seq_entry(content: &str) -> bool {
    content == "-" || content.starts_with("- ")
}

/// Characters that may not start a plain scalar here (or that start something this reader leaves
/// to serde-saphyr: anchors, aliases, tags, directives, explicit keys).
fn special_start(b: u8) -> bool {
    matches!(
        b,
        b'&' | b'*'
            | b'!'
            | b'%'
            | b'@'
            | b'`'
            | b'?'
            | b'|'
            | b'>'
            | b','
            | b'['
            | b']'
            | b'{'
            | b'}'
            | b'#'
            | b'"'
            | b'\''
            | b':'
            | b'-'
    )
}

/// A plain scalar may start with `-` when the next character is not a space (nor, inside a flow
/// collection, a flow indicator): `-1`, `-foo`.
fn dash_scalar(s: &str, flow: bool) -> bool {
    let b = s.as_bytes();
    b.first() == Some(&b'-')
        && match b.get(1) {
            None | Some(b' ') => false,
            Some(b',' | b'[' | b']' | b'{' | b'}') => !flow,
            Some(_) => true,
        }
}

/// Whether two keys of one mapping are the same text (style aside, which serde-saphyr may or
/// may not tell apart): such a mapping is left to it.
fn has_duplicate_keys(pairs: &[Node<'_>]) -> bool {
    let text = |n: &Node<'_>| match n {
        Node::Scalar { text, .. } => text.to_string(),
        _ => String::new(),
    };
    fn key<'n>(n: &'n Node<'_>) -> Option<&'n str> {
        match n {
            Node::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
    let n = pairs.len() / 2;
    if n <= 16 {
        return (0..n).any(|i| (0..i).any(|j| key(&pairs[2 * i]) == key(&pairs[2 * j])));
    }
    let mut keys: Vec<String> = pairs.iter().step_by(2).map(text).collect();
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// What may follow a node on its line: nothing, or spaces and a comment.
fn only_comment(tail: &str) -> bool {
    let rest = tail.trim_start_matches(' ');
    rest.is_empty() || (rest.starts_with('#') && rest.len() < tail.len())
}

/// Cuts a trailing ` # comment` off a plain scalar's line.
fn strip_comment(s: &str) -> &str {
    match s.find(" #") {
        Some(i) => s[..i].trim_end_matches(' '),
        None => s,
    }
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    depth: usize,
    b: Builder<'a>,
}

impl<'a> Parser<'a> {
    fn skip_blank(&mut self) {
        while self.lines.get(self.pos).is_some_and(|l| l.is_blank()) {
            self.pos += 1;
        }
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Unsupported);
        }
        Ok(())
    }

    /// A node on the lines that follow: deeper than `parent`, or a sequence at the parent's own
    /// indentation when the parent is a mapping key. Nothing there is a null.
    fn block_node(&mut self, parent: Option<usize>, in_map: bool) -> Result<Node<'a>> {
        self.skip_blank();
        let Some(line) = self.lines.get(self.pos).copied() else {
            return Ok(Node::null());
        };
        let deeper = parent.is_none_or(|p| line.indent > p);
        let same_level_seq = in_map && parent == Some(line.indent) && is_seq_entry(line.content);
        if !deeper && !same_level_seq {
            return Ok(Node::null());
        }
        self.enter()?;
        let node = if is_seq_entry(line.content) {
            self.block_seq(line.indent)?
        } else if split_key(line.content).is_some() {
            self.block_map(line.indent, line.content)?
        } else {
            // A scalar or flow collection alone on its line (or anything else): rare in configs.
            return Err(Unsupported);
        };
        self.depth -= 1;
        Ok(node)
    }

    /// A block mapping whose keys sit at column `indent`; `first` is its first entry's text, which
    /// starts mid-line for a mapping inside a sequence entry (`- name: x`).
    fn block_map(&mut self, indent: usize, first: &'a str) -> Result<Node<'a>> {
        let mark = self.b.stack.len();
        let mut text = first;
        loop {
            let (key, rest) = split_key(text).ok_or(Unsupported)??;
            self.b.stack.push(key);
            let value = self.inline_value(rest, indent, true)?;
            self.b.stack.push(value);
            self.skip_blank();
            match self.lines.get(self.pos) {
                None => break,
                Some(l) if l.indent < indent => break,
                Some(l) if l.indent == indent && !is_seq_entry(l.content) => text = l.content,
                Some(_) => return Err(Unsupported),
            }
        }
        self.b.map(mark)
    }

    /// A block sequence whose `-` sit at column `indent`.
    fn block_seq(&mut self, indent: usize) -> Result<Node<'a>> {
        let mark = self.b.stack.len();
        loop {
            let line = self.lines[self.pos];
            let after = line.content.get(1..).unwrap_or("");
            let rest = after.trim_start_matches(' ');
            let column = indent + 1 + (after.len() - rest.len());
            let item = if rest.is_empty() || rest.starts_with('#') {
                self.pos += 1;
                self.block_node(Some(indent), false)?
            } else if is_seq_entry(rest) {
                return Err(Unsupported);
            } else if split_key(rest).is_some() {
                self.enter()?;
                let map = self.block_map(column, rest)?;
                self.depth -= 1;
                map
            } else {
                self.inline_value(rest, indent, false)?
            };
            self.b.stack.push(item);
            self.skip_blank();
            match self.lines.get(self.pos) {
                None => break,
                Some(l) if l.indent == indent && is_seq_entry(l.content) => {}
                Some(l) if l.indent <= indent => break,
                Some(_) => return Err(Unsupported),
            }
        }
        self.b.seq(mark)
    }

    /// The value after `key:` or `- ` on the current line (`rest`, without leading spaces); the
    /// node it starts is owned by the mapping or sequence at column `owner`. Moves past the lines
    /// the value takes.
    fn inline_value(&mut self, rest: &'a str, owner: usize, in_map: bool) -> Result<Node<'a>> {
        let Some(&first) = rest.as_bytes().first() else {
            self.pos += 1;
            return self.block_node(Some(owner), in_map);
        };
        match first {
            b'#' => {
                self.pos += 1;
                self.block_node(Some(owner), in_map)
            }
            b'|' | b'>' => self.block_scalar(rest, owner),
            b'[' | b'{' | b'"' | b'\'' => {
                let mut at = 0;
                self.enter()?;
                let node = flow_node(&mut self.b, rest, &mut at, self.depth)?;
                self.depth -= 1;
                if !only_comment(&rest[at..]) {
                    return Err(Unsupported);
                }
                self.pos += 1;
                Ok(node)
            }
            b if special_start(b) && !dash_scalar(rest, false) => Err(Unsupported),
            _ => {
                let value = strip_comment(rest);
                if value.contains(": ") || value.ends_with(':') {
                    return Err(Unsupported);
                }
                self.pos += 1;
                Ok(Node::Scalar {
                    text: Cow::Borrowed(value),
                    plain: true,
                })
            }
        }
    }

    /// A literal (`|`) or folded (`>`) scalar with optional chomping (`-`, `+`); its content is
    /// the following lines indented deeper than `owner`.
    fn block_scalar(&mut self, header: &str, owner: usize) -> Result<Node<'a>> {
        let literal = header.starts_with('|');
        let (chomp, tail) = match header.as_bytes().get(1) {
            Some(b'-') => (Chomp::Strip, &header[2..]),
            Some(b'+') => (Chomp::Keep, &header[2..]),
            _ => (Chomp::Clip, &header[1..]),
        };
        if !only_comment(tail) {
            return Err(Unsupported);
        }
        self.pos += 1;
        let start = self.pos;
        let indent = self.lines[start..]
            .iter()
            .find(|l| !l.content.is_empty())
            .map(|l| l.indent)
            .ok_or(Unsupported)?;
        if indent <= owner {
            return Err(Unsupported);
        }
        let mut end = start;
        while let Some(l) = self.lines.get(end) {
            if l.content.is_empty() {
                if l.indent > indent {
                    return Err(Unsupported);
                }
            } else if l.indent < indent {
                break;
            }
            end += 1;
        }
        // Lines of the scalar, and the empty lines trailing it (they matter only to `+`).
        let mut last = end;
        while last > start && self.lines[last - 1].content.is_empty() {
            last -= 1;
        }
        let trailing = end - last;
        let mut out = String::new();
        let mut empties = 0usize;
        let mut wrote = false;
        for l in &self.lines[start..last] {
            if l.content.is_empty() {
                empties += 1;
                continue;
            }
            let text = &l.raw[indent..];
            if literal {
                for _ in 0..empties {
                    out.push('\n');
                }
                if wrote {
                    out.push('\n');
                }
            } else {
                if l.indent > indent {
                    return Err(Unsupported);
                }
                if wrote {
                    if empties == 0 {
                        out.push(' ');
                    }
                    for _ in 0..empties {
                        out.push('\n');
                    }
                } else {
                    for _ in 0..empties {
                        out.push('\n');
                    }
                }
            }
            out.push_str(text);
            wrote = true;
            empties = 0;
        }
        match chomp {
            Chomp::Strip => {}
            Chomp::Clip => out.push('\n'),
            Chomp::Keep => {
                out.push('\n');
                for _ in 0..trailing {
                    out.push('\n');
                }
            }
        }
        self.pos = end;
        Ok(Node::Scalar {
            text: Cow::Owned(out),
            plain: false,
        })
    }
}

#[derive(Clone, Copy)]
enum Chomp {
    Strip,
    Clip,
    Keep,
}

/// A block mapping key at the start of `text`: `Some(Ok((key, rest after ": ")))` when `text` is a
/// key-value line, `None` when it is not one, `Some(Err)` when it looks like one this reader leaves
/// to serde-saphyr.
fn split_key(text: &str) -> Option<Result<(Node<'_>, &str)>> {
    let first = *text.as_bytes().first()?;
    if first == b'[' || first == b'{' {
        // A flow collection; one used as a key is left to serde-saphyr by the caller's tail check.
        return None;
    }
    if first == b'"' || first == b'\'' {
        let mut at = 0;
        let key = match quoted(text, &mut at) {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        let rest = &text[at..];
        let rest = rest.strip_prefix(':')?;
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        return Some(Ok((key, rest.trim_start_matches(' '))));
    }
    let end = text
        .find(": ")
        .or_else(|| text.ends_with(':').then(|| text.len() - 1))?;
    if text[..end].contains(" #") {
        return None;
    }
    if (special_start(first) && !dash_scalar(text, false)) || end > MAX_KEY {
        return Some(Err(Unsupported));
    }
    let key = text[..end].trim_end_matches(' ');
    let rest = text[end + 1..].trim_start_matches(' ');
    Some(Ok((
        Node::Scalar {
            text: Cow::Borrowed(key),
            plain: true,
        },
        rest,
    )))
}

fn skip_spaces(s: &str, at: &mut usize) {
    while s.as_bytes().get(*at) == Some(&b' ') {
        *at += 1;
    }
}

/// A flow node (`[...]`, `{...}`, a quoted or plain scalar) starting at `at`, all on one line.
fn flow_node<'a>(
    b: &mut Builder<'a>,
    s: &'a str,
    at: &mut usize,
    depth: usize,
) -> Result<Node<'a>> {
    if depth > MAX_DEPTH {
        return Err(Unsupported);
    }
    skip_spaces(s, at);
    match s.as_bytes().get(*at) {
        Some(b'[') => {
            *at += 1;
            let mark = b.stack.len();
            loop {
                skip_spaces(s, at);
                if s.as_bytes().get(*at) == Some(&b']') {
                    *at += 1;
                    return b.seq(mark);
                }
                let item = flow_node(b, s, at, depth + 1)?;
                b.stack.push(item);
                skip_spaces(s, at);
                match s.as_bytes().get(*at) {
                    Some(b',') => *at += 1,
                    Some(b']') => {}
                    _ => return Err(Unsupported),
                }
            }
        }
        Some(b'{') => {
            *at += 1;
            let mark = b.stack.len();
            loop {
                skip_spaces(s, at);
                if s.as_bytes().get(*at) == Some(&b'}') {
                    *at += 1;
                    return b.map(mark);
                }
                let key = match s.as_bytes().get(*at) {
                    Some(b'"' | b'\'') => quoted(s, at)?,
                    _ => plain_flow(s, at)?,
                };
                b.stack.push(key);
                skip_spaces(s, at);
                if s.as_bytes().get(*at) != Some(&b':') {
                    return Err(Unsupported);
                }
                *at += 1;
                skip_spaces(s, at);
                let value = match s.as_bytes().get(*at) {
                    Some(b',' | b'}') => Node::null(),
                    _ => flow_node(b, s, at, depth + 1)?,
                };
                b.stack.push(value);
                skip_spaces(s, at);
                match s.as_bytes().get(*at) {
                    Some(b',') => *at += 1,
                    Some(b'}') => {}
                    _ => return Err(Unsupported),
                }
            }
        }
        Some(b'"' | b'\'') => quoted(s, at),
        _ => plain_flow(s, at),
    }
}

/// A plain scalar inside a flow collection: up to a flow indicator, `: ` or ` #`.
fn plain_flow<'a>(s: &'a str, at: &mut usize) -> Result<Node<'a>> {
    let bytes = s.as_bytes();
    let start = *at;
    match bytes.get(start) {
        Some(&b) if !special_start(b) || dash_scalar(&s[start..], true) => {}
        _ => return Err(Unsupported),
    }
    let mut i = start;
    while let Some(&b) = bytes.get(i) {
        match b {
            b',' | b'[' | b']' | b'{' | b'}' => break,
            b':' if matches!(bytes.get(i + 1), None | Some(b' ' | b',' | b']' | b'}')) => break,
            b'#' if bytes[i - 1] == b' ' => return Err(Unsupported),
            _ => i += 1,
        }
    }
    *at = i;
    let text = s[start..i].trim_end_matches(' ');
    Ok(Node::Scalar {
        text: Cow::Borrowed(text),
        plain: true,
    })
}

/// A single- or double-quoted scalar that closes on this line.
fn quoted<'a>(s: &'a str, at: &mut usize) -> Result<Node<'a>> {
    let bytes = s.as_bytes();
    let quote = bytes[*at];
    let start = *at + 1;
    // Fast path: no escapes before the closing quote.
    let mut i = start;
    while let Some(&b) = bytes.get(i) {
        if b == quote || (quote == b'"' && b == b'\\') {
            break;
        }
        i += 1;
    }
    if bytes.get(i) == Some(&quote) && bytes.get(i + 1) != Some(&quote) {
        *at = i + 1;
        return Ok(Node::Scalar {
            text: Cow::Borrowed(&s[start..i]),
            plain: false,
        });
    }
    let mut out = String::with_capacity(i - start + 8);
    out.push_str(&s[start..i]);
    let mut chars = s[i..].char_indices();
    while let Some((off, c)) = chars.next() {
        if c == quote as char {
            if quote == b'\'' && s[i + off + 1..].starts_with('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            *at = i + off + 1;
            return Ok(Node::Scalar {
                text: Cow::Owned(out),
                plain: false,
            });
        }
        if quote == b'"' && c == '\\' {
            let (_, e) = chars.next().ok_or(Unsupported)?;
            let hex = |n: usize, chars: &mut std::str::CharIndices<'_>| -> Result<char> {
                let mut v = 0u32;
                for _ in 0..n {
                    let (_, d) = chars.next().ok_or(Unsupported)?;
                    v = v * 16 + d.to_digit(16).ok_or(Unsupported)?;
                }
                char::from_u32(v).ok_or(Unsupported)
            };
            let decoded = match e {
                '0' => '\0',
                'a' => '\u{7}',
                'b' => '\u{8}',
                't' => '\t',
                'n' => '\n',
                'v' => '\u{b}',
                'f' => '\u{c}',
                'r' => '\r',
                'e' => '\u{1b}',
                ' ' => ' ',
                '"' => '"',
                '/' => '/',
                '\\' => '\\',
                'N' => '\u{85}',
                '_' => '\u{a0}',
                'L' => '\u{2028}',
                'P' => '\u{2029}',
                'x' => hex(2, &mut chars)?,
                'u' => hex(4, &mut chars)?,
                'U' => hex(8, &mut chars)?,
                _ => return Err(Unsupported),
            };
            out.push(decoded);
            continue;
        }
        out.push(c);
    }
    // The line ended inside the quotes: a multi-line scalar.
    Err(Unsupported)
}

/// A plain decimal integer without sign or leading zeros.
fn plain_uint(text: &str) -> Option<u64> {
    let ok = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if ok {
        text.parse().ok()
    } else {
        None
    }
}

/// `-?digits(.digits)?([eE][-+]?digits)?`: a float whose reading no YAML schema disputes.
fn plain_float(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let s = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > s
    };
    if !digits(&mut i) {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    (i == b.len()).then(|| text.parse().ok()).flatten()
}

/// A node and the tree it is in: what serde deserializes from.
#[derive(Clone, Copy)]
struct De<'de, 'a> {
    nodes: &'de [Node<'a>],
    node: &'de Node<'a>,
}

impl<'de, 'a> De<'de, 'a> {
    fn children(&self, first: u32, len: usize) -> Result<&'de [Node<'a>]> {
        let first = first as usize;
        self.nodes.get(first..first + len).ok_or(Unsupported)
    }
}

struct SeqAccess<'de, 'a> {
    nodes: &'de [Node<'a>],
    items: std::slice::Iter<'de, Node<'a>>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de, '_> {
    type Error = Unsupported;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>> {
        match self.items.next() {
            Some(node) => seed
                .deserialize(De {
                    nodes: self.nodes,
                    node,
                })
                .map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'de, 'a> {
    nodes: &'de [Node<'a>],
    entries: std::slice::ChunksExact<'de, Node<'a>>,
    value: Option<&'de Node<'a>>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de, '_> {
    type Error = Unsupported;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        match self.entries.next() {
            Some([key, value]) => {
                self.value = Some(value);
                seed.deserialize(De {
                    nodes: self.nodes,
                    node: key,
                })
                .map(Some)
            }
            _ => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        let node = self.value.take().ok_or(Unsupported)?;
        seed.deserialize(De {
            nodes: self.nodes,
            node,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

impl<'de, 'a> de::Deserializer<'de> for De<'de, 'a> {
    type Error = Unsupported;

    /// Only where the type is plain to see: collections and quoted strings; a plain scalar's
    /// type (bool, number, null, string) is left to serde-saphyr's resolver.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { text, plain: false } => visitor.visit_str(text),
            Node::Scalar { .. } => Err(Unsupported),
            Node::Seq { .. } => self.deserialize_seq(visitor),
            Node::Map { .. } => self.deserialize_map(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { text, plain: true } if text == "true" => visitor.visit_bool(true),
            Node::Scalar { text, plain: true } if text == "false" => visitor.visit_bool(false),
            _ => Err(Unsupported),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { text, plain: true } => {
                visitor.visit_u64(plain_uint(text).ok_or(Unsupported)?)
            }
            _ => Err(Unsupported),
        }
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { text, plain: true } => {
                visitor.visit_f64(plain_float(text).ok_or(Unsupported)?)
            }
            _ => Err(Unsupported),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
        Err(Unsupported)
    }

    /// Any non-null scalar: serde-saphyr gives a plain `123` or `true` to a string field as text.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { .. } if self.node.is_null() => Err(Unsupported),
            Node::Scalar { text, .. } => visitor.visit_str(text),
            _ => Err(Unsupported),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.node.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Seq { first, len } => visitor.visit_seq(SeqAccess {
                nodes: self.nodes,
                items: self.children(*first, *len as usize)?.iter(),
            }),
            _ => Err(Unsupported),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value> {
        Err(Unsupported)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Map { first, len } => visitor.visit_map(MapAccess {
                nodes: self.nodes,
                entries: self.children(*first, 2 * *len as usize)?.chunks_exact(2),
                value: None,
            }),
            _ => Err(Unsupported),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        match self.node {
            Node::Scalar { .. } if self.node.is_null() => Err(Unsupported),
            Node::Scalar { text, .. } => {
                let name: &'de str = text;
                visitor.visit_enum(name.into_deserializer())
            }
            _ => Err(Unsupported),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.node {
            Node::Scalar { text, .. } => visitor.visit_str(text),
            _ => Err(Unsupported),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::model::{Resource, VirtualServiceSpec};

    /// Every kind of field the config model has.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Fields {
        #[serde(default)]
        s: Option<String>,
        #[serde(default)]
        v: Vec<String>,
        #[serde(default)]
        n: Option<u32>,
        #[serde(default)]
        f: Option<f64>,
        #[serde(default)]
        b: Option<bool>,
        #[serde(default)]
        m: BTreeMap<String, String>,
        #[serde(default)]
        k: BTreeMap<u32, String>,
        #[serde(default)]
        e: Option<Mode>,
        #[serde(default)]
        nested: Vec<Fields>,
        #[serde(default)]
        any: Option<crate::model::NotSupported>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Mode {
        #[serde(rename = "STRICT")]
        Strict,
        #[serde(rename = "PERMISSIVE", alias = "LAX")]
        Permissive,
    }

    fn careful<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
        serde_saphyr::from_str_with_options(text, crate::load::parse_options())
            .map_err(|e| e.to_string())
    }

    /// The fast reader either gives up or agrees with serde-saphyr; `fast` says which is expected.
    fn agree<T: DeserializeOwned + fmt::Debug>(text: &str, fast: bool) {
        let ours: Result<T> = from_str(text);
        let theirs: std::result::Result<T, String> = careful(text);
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{text:?}"),
            (Ok(a), Err(e)) => {
                panic!("{text:?}: fast reader gave {a:?}, serde-saphyr refused: {e}")
            }
            (Err(_), _) => {}
        }
        assert_eq!(
            ours.is_ok(),
            fast,
            "{text:?}: fast path taken? {ours:?} / {theirs:?}"
        );
    }

    #[test]
    fn takes_the_common_forms() {
        for text in [
            "s: x",
            "s: x # comment",
            "s: a#b",
            "s: 'it''s'",
            "s: \"\\x41\\u00e9\\t\\\"\"",
            "s: \"a: b\"",
            "s: 123",
            "s: true",
            "s: 1.5",
            "s: http://example.com:8080/x?y=z",
            "s: -1",
            "s: /a[0],b{c}",
            "s: null",
            "s: ~",
            "s:",
            "s: ''",
            "s: x  ",
            "s: |\n  line one\n  line two\n",
            "s: |-\n  a\n\n  b\n",
            "s: |+\n  a\n\n\nn: 1\n",
            "s: |\n  a\n    indented\n  b\n",
            "s: |\n\n  after an empty line\n",
            "s: >\n  folded\n  text\n\n  para\n",
            "s: >-\n  a\n  b\n",
            "s: | # comment\n  x\n",
            "s: |-   # comment\n  x\n",
            "v: [a]     # comment",
            "s: 'x'  # comment",
            "v: [a, b, c]",
            "v: [a, b,]",
            "v: [ ]",
            "v: []",
            "v: ['a, b', \"c\"]",
            "v:\n- a\n- b\n",
            "v:\n  - a\n  - b\n",
            "v:\n  # a comment\n  - a\n\n  - b # trailing\n",
            "n: 0",
            "n: 8080",
            "f: 1.5",
            "f: 10",
            "f: -0.25e3",
            "b: true",
            "b: false",
            "m: {a: x, b: 'y'}",
            "m: {a: 1, \"b c\": true}",
            "m: {\"a\":x}",
            "m:\n  a: x\n  b: y\n",
            "m: {}",
            "k: {80: x, 443: y}",
            "k:\n  80: x\n",
            "e: STRICT",
            "e: 'PERMISSIVE'",
            "e: LAX",
            "e:",
            "nested:\n- s: a\n  n: 1\n- s: b\n  nested:\n  - s: c\n",
            "nested: [{s: a, n: 1}, {s: b, v: [x]}]",
            "nested:\n  - {s: a}\n  - s: b\n    v:\n    - x\n",
            "nested:\n-\n  s: a\n",
            "any: {whatever: [1, 2, {x: y}]}",
            "---\ns: x\n",
            "--- # the first document\ns: x\n",
            "# leading comment\n\ns: x\n# trailing comment\n",
            "s: x\r\nn: 1\r\n",
            "s: é ü 日本",
        ] {
            agree::<Fields>(text, true);
        }
    }

    #[test]
    fn leaves_the_rest_to_serde_saphyr() {
        for text in [
            "s: &a x",
            "s: *a",
            "s: !!str 5",
            "s: a\n  b\n",
            "s: \"a\n  b\"",
            "s: 'a\n\n  b'",
            "s: a: b",
            "s: @x",
            "s: `x",
            "s: %x",
            "s: - x",
            "s: [a]",
            "s: \tx",
            "s:\n  x\n",
            "v: a",
            "v:",
            "v: ~",
            "v: [a: b]",
            "v: [a, , b]",
            "v: [a\n, b]",
            "v: [a] x",
            "v: [a]#x",
            "s: |#x\n  y\n",
            "n: 010",
            "n: 0x10",
            "n: 1_0",
            "n: +5",
            "n: '5'",
            "n: 5.0",
            "n: -0",
            "n: 4294967296",
            "n: 99999999999999999999999",
            "f: .5",
            "f: 1.",
            "f: .inf",
            "f: .nan",
            "b: True",
            "b: yes",
            "b: 'true'",
            "m: {a: }",
            "m: {a: null}",
            "m: {a: x, a: y}",
            "m:\n  a: x\n  a: y\n",
            "m: {a}",
            "m: {a:b}",
            "m: {<<: {a: b}}",
            "s: x\ns: y\n",
            "s: x\n  n: 1\n",
            "s: x\n- y\n",
            "? s\n: x\n",
            "e: [STRICT]",
            "s: |2\n  x\n",
            "s: |\n  x\n   \n",
            "s: >\n  a\n    b\n",
            "s: |\nn: 1\n",
            "s: x\n...\n",
            "%YAML 1.2\n---\ns: x\n",
            "s: x\n---\nn: 1\n",
            "--- s: x\n",
            "\u{feff}s: x",
            "s: a\u{85}b",
            "s: \"\\q\"",
            "s: \"\\x4\"",
            "s: \"\\ud800\"",
            "nested:\n- - a\n",
            "- a\n",
            "just a scalar\n",
            "[a, b]\n",
            "s: x\ry: z",
            "unknown: x",
        ] {
            agree::<Fields>(text, false);
        }
    }

    #[test]
    fn deep_nesting_gives_up_instead_of_overflowing() {
        let deep = format!("any: {}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(from_str::<Fields>(&deep), Err(Unsupported));
        let mut block = String::new();
        for i in 0..200 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        assert!(parse(&block).is_err());
    }

    #[test]
    fn a_large_virtual_service_matches_serde_saphyr() {
        let mut text = String::from(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: app }\nspec:\n  hosts: [app]\n  http:\n",
        );
        for i in 0..200 {
            text.push_str(&format!(
                "  - match: [{{ uri: {{ exact: /r{i} }} }}]\n    route: [{{ destination: {{ host: app }} }}]\n"
            ));
            text.push_str(&format!(
                "  - name: \"r-{i}\"\n    match:\n    - headers:\n        x-v: {{ prefix: v{i} }}\n    route:\n    - destination:\n        host: app\n        subset: v1\n      weight: 90\n    - destination: {{ host: app, port: {{ number: 80 }} }}\n      weight: 10\n    timeout: 1.5s\n"
            ));
        }
        agree::<Resource<VirtualServiceSpec>>(&text, true);
    }
}
