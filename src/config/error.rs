//! Config errors that point at the file, line, column and key path.

use std::fmt;
use std::ops::Range;

use toml::de::DeTable;

/// One problem in the config, before it is located in the text.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Key path such as `routes[2].upstream`; empty for the whole file.
    pub path: String,
    pub message: String,
    /// Byte range in the file, when the parser knew it.
    pub span: Option<Range<usize>>,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            span: None,
        }
    }
}

/// Every problem found in one config file, each with its line and column.
#[derive(Debug)]
pub struct ConfigErrors {
    file: String,
    problems: Vec<(Option<(usize, usize)>, Problem)>,
}

impl ConfigErrors {
    /// An error about the file as a whole (unreadable, for instance).
    pub fn whole_file(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            problems: vec![(None, Problem::at("", message))],
        }
    }

    /// Locates each problem in `text`: its own span, else the span of the
    /// deepest key of its path that exists in the file.
    /// In the order of the file.
    pub fn locate(file: &str, text: &str, problems: Vec<Problem>) -> Self {
        let doc = DeTable::parse(text).ok();
        let mut problems: Vec<_> = problems
            .into_iter()
            .map(|p| {
                let span = p.span.clone().or_else(|| {
                    let doc = doc.as_ref()?;
                    span_of_path(doc.get_ref(), doc.span(), &p.path)
                });
                (span.map(|s| line_col(text, s.start)), p)
            })
            .collect();
        problems.sort_by_key(|(pos, _)| pos.unwrap_or((usize::MAX, 0)));
        Self {
            file: file.to_owned(),
            problems,
        }
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (pos, p)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", self.file)?;
            if let Some((line, col)) = pos {
                write!(f, ":{line}:{col}")?;
            }
            if !p.path.is_empty() {
                write!(f, ": {}", p.path)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Walks `routes[2].upstream` through the parsed document; returns the span
/// of the deepest part that exists.
fn span_of_path(root: &DeTable<'_>, root_span: Range<usize>, path: &str) -> Option<Range<usize>> {
    let mut segments = path_segments(path).into_iter();
    let first = segments.next()?;
    let (_, mut value) = root.iter().find(|(k, _)| k.get_ref() == &first)?;
    let mut span = value.span();
    for seg in segments {
        let next = match seg.parse::<usize>() {
            Ok(i) => value.get_ref().get(i),
            Err(_) => value.get_ref().get(seg.as_str()),
        };
        match next {
            Some(v) => {
                span = v.span();
                value = v;
            }
            None => break,
        }
    }
    if span.is_empty() && span.start == 0 {
        return Some(root_span);
    }
    Some(span)
}

/// `routes[2].retry.attempts` -> ["routes", "2", "retry", "attempts"];
/// a quoted segment (`upstreams."a.b".url`) keeps its dots.
fn path_segments(path: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => cur.extend(chars.next()),
            '.' | '[' | ']' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 11), (2, 6));
    }

    #[test]
    fn locates_nested_keys_and_array_items() {
        let text = "[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nupstream = \"x\"\n";
        let errs = ConfigErrors::locate(
            "f.toml",
            text,
            vec![Problem::at("routes[1].upstream", "unknown upstream")],
        );
        assert_eq!(
            errs.to_string(),
            "f.toml:6:12: routes[1].upstream: unknown upstream"
        );
    }

    #[test]
    fn quoted_segments_keep_their_dots() {
        let segs = path_segments(r#"upstreams."azure.east".url"#);
        assert_eq!(segs, ["upstreams", "azure.east", "url"]);
        let text = "[upstreams.\"azure.east\"]\nurl = \"x\"\n";
        let path = r#"upstreams."azure.east".url"#;
        let errs = ConfigErrors::locate("f.toml", text, vec![Problem::at(path, "bad")]);
        assert_eq!(
            errs.to_string(),
            r#"f.toml:2:7: upstreams."azure.east".url: bad"#
        );
    }
}
