//! Config errors that always say where: file, line, column and field path.

use std::fmt;
use std::path::PathBuf;

/// One problem found in the configuration.
///
/// Every error a user can see names the file and, wherever the input allows it, the line, column and
/// field path, so an operator can jump straight to the offending YAML node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in; empty for problems of the whole config (e.g. no `Proxy`).
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// Field path such as `spec.ingress[0].port.number`, empty when the problem is the whole document.
    pub path: String,
    /// What is wrong and, where we can tell, how to fix it.
    pub message: String,
}

impl ConfigError {
    /// An error about the configuration as a whole, not tied to one node.
    pub fn global(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: 0,
            column: 0,
            path: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.as_os_str().is_empty() {
            write!(f, "config")?;
        } else {
            write!(f, "{}", self.file.display())?;
        }
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column.max(1))?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// All the problems found in one load; a config with any of them is rejected whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Levenshtein distance, for "did you mean" hints on misspelt field and enum names.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(!a[i - 1].eq_ignore_ascii_case(&b[j - 1]));
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Adds a "did you mean" hint to serde's `unknown field`/`unknown variant` messages.
///
/// serde formats these as ``unknown field `x`, expected one of `a`, `b` `` (or ``expected `a` ``), and
/// the list of valid names is only available in that text.
pub(crate) fn with_suggestion(message: &str) -> String {
    let Some((_, rest)) = message.split_once("unknown field `").or_else(|| message.split_once("unknown variant `")) else {
        return message.to_string();
    };
    let Some((unknown, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    // serde writes the valid names after "expected one of" or "expected", with or without backticks.
    let list = rest.split_once("expected one of ").or_else(|| rest.split_once("expected ")).map(|(_, l)| l).unwrap_or("");
    let candidates = list.split(", ").map(|c| c.trim().trim_matches('`'));
    match closest(unknown, candidates) {
        Some(best) => format!("{message} (did you mean `{best}`?)"),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_field() {
        let m = with_suggestion("unknown field `defaultEndpont`, expected one of `port`, `bind`, `defaultEndpoint`");
        assert!(m.ends_with("(did you mean `defaultEndpoint`?)"), "{m}");
    }

    #[test]
    fn no_suggestion_when_far() {
        let m = with_suggestion("unknown field `zzzzzzzz`, expected one of `port`, `bind`");
        assert!(!m.contains("did you mean"), "{m}");
    }

    #[test]
    fn suggests_without_backticks() {
        let m = with_suggestion("unknown field `wrokers`, expected one of workload, workers, admin");
        assert!(m.ends_with("(did you mean `workers`?)"), "{m}");
    }

    #[test]
    fn suggests_variant() {
        let m = with_suggestion("unknown variant `STATC`, expected one of `STATIC`, `DNS`");
        assert!(m.contains("did you mean `STATIC`"), "{m}");
    }

    #[test]
    fn display_has_file_line_col_path() {
        let e = ConfigError {
            file: "a.yaml".into(),
            line: 3,
            column: 5,
            path: "spec.workers".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "a.yaml:3:5: spec.workers: bad");
    }
}
