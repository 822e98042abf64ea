//! Validated names: apps, versions, hosts. They end up in paths on every
//! host, so they are checked once, at the edge, and trusted afterwards.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

fn check(what: &'static str, value: &str, extra: &[char]) -> Result<(), InvalidName> {
    let err = |why| {
        Err(InvalidName {
            what,
            value: value.to_owned(),
            why,
        })
    };
    if value.is_empty() {
        return err("must not be empty");
    }
    if value.len() > 128 {
        return err("must be at most 128 characters");
    }
    if value.starts_with(['.', '-']) {
        return err("must not start with '.' or '-'");
    }
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c)) {
        return err("may only contain ASCII letters, digits and the characters listed in the docs");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                check($what, &value, $extra)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }
        impl std::str::FromStr for $ty {
            type Err = InvalidName;
            fn from_str(value: &str) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// An application name: letters, digits, `-` and `_`.
    AppName, "app name", &['-', '_']
);
name_type!(
    /// A release version: letters, digits, `.`, `-`, `_` and `+`.
    Version, "version", &['.', '-', '_', '+']
);
name_type!(
    /// A host's name, as written in its certificate.
    HostName, "host name", &['.', '-', '_']
);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_version(input: &str, ok: bool) {
        assert_eq!(Version::new(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn versions() {
        check_version("1.2.3", true);
        check_version("v2+build.7", true);
        check_version("2026-11-22_rc1", true);
        check_version("", false);
        check_version("..", false);
        check_version(".hidden", false);
        check_version("-rf", false);
        check_version("a/b", false);
        check_version("a b", false);
        check_version(&"x".repeat(129), false);
    }

    #[test]
    fn app_names_refuse_dots() {
        assert!(AppName::new("web-api").is_ok());
        let err = AppName::new("web.api").unwrap_err();
        assert_eq!(err.what, "app name");
    }
}
