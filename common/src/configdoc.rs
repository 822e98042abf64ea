//! Reads the configuration reference (docs/config.md) so that tests can
//! hold it to the code: every documented key exists, every key is
//! documented.

use std::collections::BTreeSet;

/// The keys in the first column of the tables under the heading `heading`
/// (up to the next `## ` heading), without their backticks.
pub fn documented_keys(markdown: &str, heading: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .skip_while(|l| l.trim_end() != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(key, _)| key.to_owned()))
        .collect()
}

/// `fields`, each under `prefix` (`"health."`, `"health.checks[]."`).
pub fn prefixed(prefix: &str, fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| format!("{prefix}{f}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_their_section_only() {
        let md = "# T\n## `a.toml`\n\n| Key | Type |\n| --- | --- |\n| `x` | int |\n| `y.z` | text |\nprose `w`\n## `b.toml`\n| `q` | int |\n";
        assert_eq!(
            documented_keys(md, "## `a.toml`"),
            ["x", "y.z"].map(String::from).into_iter().collect()
        );
        assert_eq!(documented_keys(md, "## `b.toml`").len(), 1);
        assert!(documented_keys(md, "## missing").is_empty());
    }
}
