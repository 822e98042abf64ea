//! What a release says it needs: `convoy/config.toml` in its tree (the
//! keys, their types, defaults and patterns, which are secret) and
//! `convoy/templates/*`, rendered with the environment's values into files
//! of the release tree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a release declares its configuration.
pub const SCHEMA_FILE: &str = "convoy/config.toml";
pub const TEMPLATE_DIR: &str = "convoy/templates";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    String,
    Int,
    Bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub kind: KeyType,
    pub required: bool,
    pub default: Option<String>,
    /// A regular expression the whole value must match.
    pub pattern: Option<String>,
    pub secret: bool,
}

/// A template and where its rendering goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSpec {
    /// File name under `convoy/templates/`.
    pub source: String,
    /// Path inside the release tree.
    pub destination: String,
    pub mode: u32,
    /// Its text, read from the release at push.
    pub text: String,
}

/// A release's declared configuration, kept with the release at push.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Schema {
    pub keys: BTreeMap<String, KeySpec>,
    pub templates: Vec<TemplateSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    keys: BTreeMap<String, RawKey>,
    #[serde(default)]
    templates: Vec<RawTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(rename = "type")]
    kind: Option<KeyType>,
    #[serde(default)]
    required: bool,
    default: Option<toml::Value>,
    pattern: Option<String>,
    #[serde(default)]
    secret: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    source: String,
    destination: String,
    mode: Option<String>,
}

/// A key name: what an environment variable may be called.
pub fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit())
}

/// A relative path inside the release tree, without `.` or `..`.
fn inside_tree(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Schema {
    /// Parses `convoy/config.toml`; `templates` reads a template's text by
    /// its file name. Errors name the file and the key at fault.
    pub fn parse(text: &str, templates: impl Fn(&str) -> Option<String>) -> Result<Schema, String> {
        let raw: RawSchema =
            toml::from_str(text).map_err(|e| format!("{SCHEMA_FILE}: {}", e.to_string().trim_end()))?;
        let bad = |field: String, why: String| format!("{SCHEMA_FILE}: {field}: {why}");
        let mut keys = BTreeMap::new();
        for (name, k) in raw.keys {
            let field = format!("keys.{name}");
            if !valid_key(&name) {
                return Err(bad(
                    field,
                    "a key is letters, digits and _, not starting with a digit".into(),
                ));
            }
            let kind = k.kind.unwrap_or(KeyType::String);
            if let Some(p) = &k.pattern {
                regex::Regex::new(p).map_err(|e| bad(format!("{field}.pattern"), e.to_string()))?;
            }
            let default = match k.default {
                None => None,
                Some(toml::Value::String(s)) => Some(s),
                Some(toml::Value::Integer(i)) => Some(i.to_string()),
                Some(toml::Value::Boolean(b)) => Some(b.to_string()),
                Some(other) => {
                    return Err(bad(
                        format!("{field}.default"),
                        format!("{other} is not a string, integer or boolean"),
                    ))
                }
            };
            if k.secret && default.is_some() {
                return Err(bad(
                    format!("{field}.default"),
                    "a secret has no default in the release".into(),
                ));
            }
            let spec = KeySpec {
                kind,
                required: k.required,
                default,
                pattern: k.pattern,
                secret: k.secret,
            };
            if let Some(d) = &spec.default {
                if let Err(why) = spec.check(d) {
                    return Err(bad(format!("{field}.default"), why));
                }
            }
            keys.insert(name, spec);
        }
        let mut out = Vec::new();
        for (i, t) in raw.templates.into_iter().enumerate() {
            let field = format!("templates[{i}]");
            if !inside_tree(&t.source) || t.source.contains('/') {
                return Err(bad(
                    format!("{field}.source"),
                    format!("{:?} must be a file name in {TEMPLATE_DIR}/", t.source),
                ));
            }
            if !inside_tree(&t.destination) || t.destination.starts_with("convoy/") {
                return Err(bad(
                    format!("{field}.destination"),
                    format!(
                        "{:?} must be a relative path in the release tree, outside convoy/",
                        t.destination
                    ),
                ));
            }
            let mode = match t.mode.as_deref() {
                None => 0o640,
                Some(m) => u32::from_str_radix(m, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
                    bad(
                        format!("{field}.mode"),
                        format!("{m:?} is not an octal mode such as \"0600\""),
                    )
                })?,
            };
            let text = templates(&t.source).ok_or_else(|| {
                bad(
                    format!("{field}.source"),
                    format!("{TEMPLATE_DIR}/{} is not in the release", t.source),
                )
            })?;
            out.push(TemplateSpec {
                source: t.source,
                destination: t.destination,
                mode,
                text,
            });
        }
        Ok(Schema { keys, templates: out })
    }

    /// Every problem of a set of values for this release: missing,
    /// mistyped or unknown keys, each named.
    pub fn problems(&self, values: &BTreeMap<String, ConfigValue>) -> Vec<String> {
        let mut out = Vec::new();
        for (k, spec) in &self.keys {
            match values.get(k) {
                None if spec.required && spec.default.is_none() => out.push(format!(
                    "{k} is required{} and not set",
                    if spec.secret { " (a secret)" } else { "" }
                )),
                None => {}
                Some(v) if v.secret != spec.secret => out.push(match spec.secret {
                    true => format!("{k} must be set as a secret (config set --secret {k})"),
                    false => format!("{k} is set as a secret but the release does not declare it secret"),
                }),
                Some(v) => {
                    if let Err(why) = spec.check(&v.value) {
                        out.push(format!("{k}: {why}"));
                    }
                }
            }
        }
        for k in values.keys().filter(|k| !self.keys.contains_key(*k)) {
            out.push(format!("{k} is set but this release does not declare it"));
        }
        out
    }
}

impl KeySpec {
    /// Whether a value fits the key; the reason it does not never quotes a
    /// secret.
    pub fn check(&self, v: &str) -> Result<(), String> {
        match self.kind {
            KeyType::String => {}
            KeyType::Int if v.parse::<i64>().is_ok() => {}
            KeyType::Bool if v == "true" || v == "false" => {}
            KeyType::Int => return Err(self.quote(v, "is not an integer")),
            KeyType::Bool => return Err(self.quote(v, "is not true or false")),
        }
        if let Some(p) = &self.pattern {
            let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| e.to_string())?;
            if !re.is_match(v) {
                return Err(self.quote(v, &format!("does not match the pattern {p:?}")));
            }
        }
        Ok(())
    }

    fn quote(&self, v: &str, why: &str) -> String {
        if self.secret {
            format!("the secret value {why}")
        } else {
            format!("{v:?} {why}")
        }
    }
}

/// One value of an environment's configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigValue {
    pub value: String,
    pub secret: bool,
}

impl std::fmt::Debug for ConfigValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            f.write_str("ConfigValue(<secret>)")
        } else {
            write!(f, "ConfigValue({:?})", self.value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
[keys.DATABASE_URL]
required = true
pattern = "postgres://.+"

[keys.API_KEY]
required = true
secret = true

[keys.WORKERS]
type = "int"
default = 4

[[templates]]
source = "app.env"
destination = "config/app.env"
mode = "0600"
"#;

    fn schema() -> Schema {
        Schema::parse(SCHEMA, |n| {
            (n == "app.env").then(|| "URL={{ DATABASE_URL }}\n".to_owned())
        })
        .unwrap()
    }

    fn v(value: &str, secret: bool) -> ConfigValue {
        ConfigValue {
            value: value.into(),
            secret,
        }
    }

    #[test]
    fn values_are_checked_against_the_schema_and_every_problem_is_named() {
        let s = schema();
        assert_eq!(s.templates[0].mode, 0o600);
        let none = BTreeMap::new();
        assert_eq!(
            s.problems(&none),
            [
                "API_KEY is required (a secret) and not set",
                "DATABASE_URL is required and not set"
            ]
        );
        let vals: BTreeMap<String, ConfigValue> = [
            ("DATABASE_URL".into(), v("mysql://x", false)),
            ("API_KEY".into(), v("s3cr3t-value", false)),
            ("WORKERS".into(), v("many", false)),
            ("COLOUR".into(), v("red", false)),
        ]
        .into();
        let p = s.problems(&vals);
        assert_eq!(
            p,
            [
                "API_KEY must be set as a secret (config set --secret API_KEY)",
                "DATABASE_URL: \"mysql://x\" does not match the pattern \"postgres://.+\"",
                "WORKERS: \"many\" is not an integer",
                "COLOUR is set but this release does not declare it"
            ]
        );
        let good: BTreeMap<String, ConfigValue> = [
            ("DATABASE_URL".into(), v("postgres://db/app", false)),
            ("API_KEY".into(), v("s3cr3t-value", true)),
        ]
        .into();
        assert!(s.problems(&good).is_empty());
    }

    #[test]
    fn bad_schemas_name_the_file_and_key() {
        let err = |t: &str| Schema::parse(t, |_| Some(String::new())).unwrap_err();
        assert!(err("[keys.1X]\n").contains("convoy/config.toml: keys.1X"));
        assert!(err("[keys.A]\ntype = \"float\"\n").contains("convoy/config.toml"));
        assert!(err("[keys.A]\npattern = \"(\"\n").contains("keys.A.pattern"));
        assert!(err("[keys.A]\nsecret = true\ndefault = \"x\"\n").contains("a secret has no default"));
        assert!(err("[[templates]]\nsource = \"a\"\ndestination = \"../etc/passwd\"\n")
            .contains("templates[0].destination"));
        assert!(
            err("[[templates]]\nsource = \"a\"\ndestination = \"x\"\nmode = \"rw\"\n").contains("templates[0].mode")
        );
        let missing = Schema::parse("[[templates]]\nsource = \"a\"\ndestination = \"x\"\n", |_| None).unwrap_err();
        assert!(
            missing.contains("convoy/templates/a is not in the release"),
            "{missing}"
        );
    }
}
