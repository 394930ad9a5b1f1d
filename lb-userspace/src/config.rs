//! The daemon's TOML configuration: parsing, defaults and validation.
//!
//! Every key is documented in `docs/configuration.md`; unknown keys are errors, so a typo never
//! silently changes behaviour.

use std::{collections::HashSet, path::Path};

use serde::Deserialize;
use thiserror::Error;

use crate::datapath::XdpModeSetting;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Interfaces the data path is attached to (`[[interface]]` tables).
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceConfig>,
}

/// `[daemon]`: settings of the process itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Seconds between counter summaries in the log; 0 turns them off.
    #[serde(default = "default_stats_log_interval")]
    pub stats_log_interval_secs: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self { stats_log_interval_secs: default_stats_log_interval() }
    }
}

const fn default_stats_log_interval() -> u64 {
    10
}

/// `[[interface]]`: one interface the XDP program is attached to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {}", .problems.join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_owned(),
            message: describe_toml_error(text, &error),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: origin.to_owned(), problems })
        }
    }

    /// Every validation problem, each a sentence with a hint.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.interfaces.is_empty() {
            problems.push(
                "no interfaces: add an `[[interface]]` table with the `name` of an interface \
                 to attach to"
                    .to_owned(),
            );
        }
        let mut seen = HashSet::new();
        for (i, interface) in self.interfaces.iter().enumerate() {
            if !is_valid_ifname(&interface.name) {
                problems.push(format!(
                    "interface[{i}].name {:?} is not a valid interface name (1-15 characters, \
                     no '/', ':' or whitespace)",
                    interface.name
                ));
            }
            if !seen.insert(&interface.name) {
                problems.push(format!(
                    "interface[{i}].name {:?} is listed twice; list each interface once",
                    interface.name
                ));
            }
        }
        problems
    }
}

fn is_valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Renders a TOML error as `line L, column C: message`.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_minimal_config() {
        let config = Config::parse("[[interface]]\nname = \"eth0\"\n", "test").unwrap();
        assert_eq!(config.interfaces.len(), 1);
        assert_eq!(config.interfaces[0].xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.daemon.stats_log_interval_secs, 10);
    }

    #[test]
    fn reports_line_and_column_of_unknown_keys() {
        let text = "[[interface]]\nname = \"eth0\"\nxdp_mod = \"driver\"\n";
        let error = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(error.starts_with("lb.toml: line 3, column 1:"), "{error}");
        assert!(error.contains("xdp_mod"), "{error}");
    }

    #[test]
    fn rejects_bad_modes_with_position() {
        let text = "[[interface]]\nname = \"eth0\"\nxdp_mode = \"turbo\"\n";
        let error = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(error.contains("line 3, column 12"), "{error}");
        assert!(error.contains("auto"), "{error}");
    }

    #[test]
    fn reports_every_problem() {
        let text = "[[interface]]\nname = \"a/b\"\n[[interface]]\nname = \"a/b\"\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(text, "t") else {
            panic!("expected validation errors");
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn requires_an_interface() {
        let error = Config::parse("", "t").unwrap_err().to_string();
        assert!(error.contains("[[interface]]"), "{error}");
    }
}
