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

/// Edit distance counting a swap of two adjacent letters as one edit (optimal string alignment),
/// for "did you mean" hints: `TPC` is one edit from `TCP`, not two.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_lowercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
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
    let Some((_, rest)) = message
        .split_once("unknown field `")
        .or_else(|| message.split_once("unknown variant `"))
    else {
        return message.to_string();
    };
    let Some((unknown, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    // serde writes the valid names after "expected one of" or "expected", with or without backticks.
    let list = rest
        .split_once("expected one of ")
        .or_else(|| rest.split_once("expected "))
        .map(|(_, l)| l)
        .unwrap_or("");
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
        let m = with_suggestion(
            "unknown field `defaultEndpont`, expected one of `port`, `bind`, `defaultEndpoint`",
        );
        assert!(m.ends_with("(did you mean `defaultEndpoint`?)"), "{m}");
    }

    #[test]
    fn no_suggestion_when_far() {
        let m = with_suggestion("unknown field `zzzzzzzz`, expected one of `port`, `bind`");
        assert!(!m.contains("did you mean"), "{m}");
    }

    #[test]
    fn suggests_without_backticks() {
        let m =
            with_suggestion("unknown field `wrokers`, expected one of workload, workers, admin");
        assert!(m.ends_with("(did you mean `workers`?)"), "{m}");
    }

    #[test]
    fn transposition_is_one_edit() {
        assert_eq!(edit_distance("TPC", "TCP"), 1);
        assert_eq!(closest("TPC", ["HTTP", "GRPC", "TCP"]), Some("TCP"));
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
