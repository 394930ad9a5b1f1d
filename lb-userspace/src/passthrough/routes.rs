//! SNI route table: maps the server name of a TLS ClientHello to whatever a pattern routes to.
//!
//! Patterns and their matching rules, shared by [`Routes`] and [`matches_any`]:
//! - A pattern is an exact host name (`www.example.com`) or a wildcard (`*.example.com`): `*`
//!   only as the whole first label, followed by a valid host name. Host names follow
//!   [`normalize_host_name`]: ASCII letters, digits and hyphens in dot-separated labels of
//!   1–63 characters, 253 characters at most; one trailing dot is ignored.
//! - Matching is case-insensitive: patterns and names are lowercased before use.
//! - An exact pattern matches only that name, and beats any wildcard.
//! - `*.example.com` matches every name with one or more labels before `.example.com`
//!   (`a.example.com` and `a.b.example.com`), but not `example.com` itself. This is broader
//!   than a certificate wildcard, which covers a single label.
//! - Among wildcards the longest suffix, the most specific, wins: for `x.eu.example.com`,
//!   `*.eu.example.com` beats `*.example.com`.
//! - A name that is not a valid host name matches nothing.
//!
//! [`Routes::lookup`] costs one hash lookup for the exact name plus at most one per label of
//! the name, however many patterns there are.

use std::{borrow::Cow, collections::HashMap};

use super::hello::normalize_host_name;

/// Why a pattern cannot be added to a [`Routes`] table.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The pattern is not a host name or a `*.` wildcard; the text says why.
    #[error("{0}")]
    Invalid(String),
    /// The pattern (as normalised) is already in the table.
    #[error("duplicate route pattern \"{0}\"")]
    Duplicate(String),
}

/// A validated, normalised pattern.
enum Pattern<'a> {
    /// Matches this name only.
    Exact(Cow<'a, str>),
    /// Matches names ending in `.` followed by this suffix.
    Wildcard(Cow<'a, str>),
}

impl Pattern<'_> {
    /// Whether this pattern matches `name`, which is already normalised.
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact.as_ref(),
            Self::Wildcard(suffix) => is_below(name, suffix),
        }
    }
}

/// Whether normalised `name` has one or more labels before `.suffix`.
fn is_below(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .and_then(|head| head.strip_suffix('.'))
        .is_some_and(|labels| !labels.is_empty())
}

/// Validates and normalises a pattern; the error text names the pattern and says what is
/// wrong with it.
fn parse_pattern(pattern: &str) -> Result<Pattern<'_>, String> {
    if pattern.is_empty() {
        return Err("route pattern is empty; write a host name such as \"www.example.com\" \
                    or a wildcard such as \"*.example.com\""
            .to_owned());
    }
    let (suffix, is_wildcard) = match pattern.strip_prefix("*.") {
        Some(suffix) => (suffix, true),
        None => (pattern, false),
    };
    if suffix.contains('*') {
        return Err(format!(
            "route pattern \"{pattern}\": \"*\" is only allowed as the whole first label \
             followed by a host name, as in \"*.example.com\""
        ));
    }
    let Some(name) = normalize_host_name(suffix) else {
        return Err(format!(
            "route pattern \"{pattern}\" is not a valid host name: use ASCII letters, digits, \
             hyphens and dots, with labels of 1-63 characters and at most 253 in all"
        ));
    };
    Ok(if is_wildcard { Pattern::Wildcard(name) } else { Pattern::Exact(name) })
}

/// Checks a route pattern, for configuration validation; the error text names the pattern
/// and says what is wrong with it.
pub fn is_valid_pattern(pattern: &str) -> Result<(), String> {
    parse_pattern(pattern).map(|_| ())
}

/// Whether `name` matches any of `patterns` (allow and deny lists), with the same rules as
/// [`Routes::lookup`]. Invalid patterns match nothing. This scans the list, which suits
/// short lists; use [`Routes`] for many patterns.
pub fn matches_any(patterns: &[String], name: &str) -> bool {
    let Some(name) = normalize_host_name(name) else {
        return false;
    };
    patterns
        .iter()
        .any(|pattern| parse_pattern(pattern).is_ok_and(|pattern| pattern.matches(&name)))
}

/// Route table from SNI patterns to values of type `T`.
#[derive(Clone, Debug)]
pub struct Routes<T> {
    /// Exact patterns, keyed by the normalised name.
    exact: HashMap<String, T>,
    /// Wildcard patterns, keyed by the suffix after `*.`, with the normalised pattern text
    /// that [`Routes::lookup`] reports.
    wildcard: HashMap<String, (String, T)>,
}

impl<T> Default for Routes<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Routes<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self { exact: HashMap::new(), wildcard: HashMap::new() }
    }

    /// Adds a route. The pattern is normalised (lowercased, trailing dot removed), so
    /// `WWW.Example.com.` and `www.example.com` are the same pattern and the second is a
    /// duplicate. Returns the pattern as normalised: the text [`Routes::lookup`] reports
    /// for the names it matches.
    pub fn insert(&mut self, pattern: &str, value: T) -> Result<String, RouteError> {
        match parse_pattern(pattern).map_err(RouteError::Invalid)? {
            Pattern::Exact(name) => {
                let name = name.into_owned();
                if self.exact.contains_key(&name) {
                    return Err(RouteError::Duplicate(name));
                }
                self.exact.insert(name.clone(), value);
                Ok(name)
            }
            Pattern::Wildcard(suffix) => {
                let text = format!("*.{suffix}");
                if self.wildcard.contains_key(suffix.as_ref()) {
                    return Err(RouteError::Duplicate(text));
                }
                self.wildcard.insert(suffix.into_owned(), (text.clone(), value));
                Ok(text)
            }
        }
    }

    /// Finds the route for a server name: the matching pattern (normalised, as in
    /// `*.example.com`) and its value, or `None` when nothing matches or `name` is not a
    /// valid host name.
    pub fn lookup(&self, name: &str) -> Option<(&str, &T)> {
        let name = normalize_host_name(name)?;
        if let Some((pattern, value)) = self.exact.get_key_value(name.as_ref()) {
            return Some((pattern.as_str(), value));
        }
        // Suffixes from the longest to the shortest, so the most specific wildcard wins.
        // The name is valid, so no label is empty and every suffix has one before it.
        name.match_indices('.')
            .find_map(|(dot, _)| self.wildcard.get(name.get(dot + 1..)?))
            .map(|(pattern, value)| (pattern.as_str(), value))
    }

    /// Number of patterns in the table.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether the table has no patterns.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> Routes<usize> {
        let mut routes = Routes::new();
        for (index, pattern) in patterns.iter().enumerate() {
            routes.insert(pattern, index).unwrap();
        }
        routes
    }

    fn route<'a>(routes: &'a Routes<usize>, name: &str) -> Option<(&'a str, usize)> {
        routes.lookup(name).map(|(pattern, value)| (pattern, *value))
    }

    #[test]
    fn exact_match_is_case_insensitive() {
        let routes = table(&["www.example.com", "API.Example.com."]);
        assert_eq!(route(&routes, "www.example.com"), Some(("www.example.com", 0)));
        assert_eq!(route(&routes, "WWW.EXAMPLE.COM"), Some(("www.example.com", 0)));
        assert_eq!(route(&routes, "www.example.com."), Some(("www.example.com", 0)));
        assert_eq!(route(&routes, "api.example.com"), Some(("api.example.com", 1)));
        assert_eq!(route(&routes, "example.com"), None);
        assert_eq!(route(&routes, "x.www.example.com"), None);
    }

    #[test]
    fn wildcard_matches_one_or_more_labels_but_not_the_apex() {
        let routes = table(&["*.example.com"]);
        assert_eq!(route(&routes, "a.example.com"), Some(("*.example.com", 0)));
        assert_eq!(route(&routes, "a.b.example.com"), Some(("*.example.com", 0)));
        assert_eq!(route(&routes, "A.B.Example.COM"), Some(("*.example.com", 0)));
        assert_eq!(route(&routes, "example.com"), None);
        assert_eq!(route(&routes, "badexample.com"), None);
        assert_eq!(route(&routes, "a.example.org"), None);
        assert_eq!(route(&routes, "com"), None);
        // A name the hello parser found invalid arrives empty: no route, no wildcard.
        assert_eq!(route(&routes, ""), None);
    }

    #[test]
    fn exact_beats_wildcard() {
        let routes = table(&["*.example.com", "www.example.com", "*.www.example.com"]);
        assert_eq!(route(&routes, "www.example.com"), Some(("www.example.com", 1)));
        assert_eq!(route(&routes, "web.example.com"), Some(("*.example.com", 0)));
        assert_eq!(route(&routes, "a.www.example.com"), Some(("*.www.example.com", 2)));
    }

    #[test]
    fn longest_wildcard_suffix_wins() {
        let routes = table(&["*.com", "*.example.com", "*.eu.example.com"]);
        assert_eq!(route(&routes, "x.eu.example.com"), Some(("*.eu.example.com", 2)));
        assert_eq!(route(&routes, "y.x.eu.example.com"), Some(("*.eu.example.com", 2)));
        assert_eq!(route(&routes, "eu.example.com"), Some(("*.example.com", 1)));
        assert_eq!(route(&routes, "x.us.example.com"), Some(("*.example.com", 1)));
        assert_eq!(route(&routes, "example.com"), Some(("*.com", 0)));
        assert_eq!(route(&routes, "example.org"), None);
    }

    #[test]
    fn invalid_names_match_nothing() {
        let routes = table(&["*.example.com", "example.com"]);
        for name in ["", ".", ".example.com", "a..example.com", "a_b.example.com", "*.example.com"]
        {
            assert_eq!(route(&routes, name), None, "{name:?}");
        }
    }

    #[test]
    fn invalid_patterns_are_rejected() {
        let long_label = format!("{}.com", "a".repeat(64));
        for pattern in [
            "",
            "*",
            "*.",
            "**.x",
            "*x.example.com",
            "a.*.com",
            "a.*",
            "*.*.example.com",
            "www.*",
            ".",
            ".example.com",
            "a..example.com",
            "a_b.example.com",
            "exa mple.com",
            "café.example",
            "example.com/",
            long_label.as_str(),
        ] {
            let error = is_valid_pattern(pattern).unwrap_err();
            assert!(error.contains("route pattern"), "{error}");
            let mut routes = Routes::new();
            assert_eq!(routes.insert(pattern, ()), Err(RouteError::Invalid(error)), "{pattern:?}");
            assert!(routes.is_empty());
        }
        for pattern in ["example.com", "*.example.com", "*.com", "localhost", "Www.Example.com."] {
            assert_eq!(is_valid_pattern(pattern), Ok(()), "{pattern:?}");
        }
    }

    #[test]
    fn insert_reports_the_pattern_as_lookup_does() {
        let mut routes = Routes::new();
        assert_eq!(routes.insert("WWW.Example.com.", 0), Ok("www.example.com".to_owned()));
        assert_eq!(routes.insert("*.EU.example.COM.", 1), Ok("*.eu.example.com".to_owned()));
        assert_eq!(route(&routes, "www.example.com"), Some(("www.example.com", 0)));
        assert_eq!(route(&routes, "x.eu.example.com"), Some(("*.eu.example.com", 1)));
    }

    #[test]
    fn duplicates_are_rejected_after_normalisation() {
        let mut routes = table(&["www.example.com", "*.example.com"]);
        assert_eq!(
            routes.insert("WWW.example.com.", 9),
            Err(RouteError::Duplicate("www.example.com".to_owned()))
        );
        assert_eq!(
            routes.insert("*.EXAMPLE.com", 9),
            Err(RouteError::Duplicate("*.example.com".to_owned()))
        );
        // An exact name and a wildcard on it are different patterns.
        routes.insert("example.com", 2).unwrap();
        assert_eq!(routes.len(), 3);
        assert_eq!(route(&routes, "www.example.com"), Some(("www.example.com", 0)));
    }

    #[test]
    fn error_messages_name_the_pattern() {
        assert_eq!(
            RouteError::Duplicate("*.example.com".to_owned()).to_string(),
            "duplicate route pattern \"*.example.com\""
        );
        assert!(is_valid_pattern("a.*.com").unwrap_err().contains("\"a.*.com\""));
    }

    #[test]
    fn matches_any_uses_the_same_rules() {
        let list: Vec<String> =
            ["www.example.com", "*.internal.example", "bad_pattern", "*"].map(String::from).into();
        assert!(matches_any(&list, "WWW.example.com."));
        assert!(matches_any(&list, "a.internal.example"));
        assert!(matches_any(&list, "a.b.internal.example"));
        assert!(!matches_any(&list, "internal.example"));
        assert!(!matches_any(&list, "api.example.com"));
        assert!(!matches_any(&list, "bad_pattern"));
        assert!(!matches_any(&list, "anything"));
        assert!(!matches_any(&[], "www.example.com"));
        assert!(!matches_any(&list, ""));
    }

    #[test]
    fn empty_table() {
        let routes: Routes<()> = Routes::default();
        assert!(routes.is_empty());
        assert_eq!(routes.len(), 0);
        assert!(routes.lookup("www.example.com").is_none());
    }
}
