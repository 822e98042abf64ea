//! The `[analysis]` part of an app spec: metric gates the controller
//! measures on Prometheus while a rollout moves hosts, and how their
//! measurements turn into verdicts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::HostName;

/// What an empty query result counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoData {
    Pass,
    Fail,
}

/// Metric gates, as the spec declares them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisSpec {
    /// One measurement of every metric per interval.
    pub interval: Duration,
    /// Failed measurements of one metric at which the rollout halts.
    pub failure_limit: u32,
    /// Inconclusive measurement rounds in a row at which the rollout halts.
    pub inconclusive_limit: u32,
    pub no_data: NoData,
    /// Keep measuring this long after the last batch.
    pub watch_after: Duration,
    /// How each host's name appears in `{{hosts}}`: `{{host}}` is the
    /// convoy host name (e.g. `"{{host}}:8080"` for an `instance` label).
    pub host_pattern: String,
    /// A companion query: the requests the measured hosts served in the
    /// window; below `min_requests` a round is inconclusive.
    pub requests: Option<RequestFloor>,
    pub metrics: Vec<Metric>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFloor {
    pub query: String,
    pub min: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    /// PromQL, with `{{hosts}}`, `{{app}}`, `{{env}}` and `{{version}}`.
    pub query: String,
    /// Absolute bounds: the value must stay within them.
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// The moved hosts' value over the baseline's must not exceed this.
    pub max_ratio_to_baseline: Option<f64>,
    /// A baseline below this counts as this (e.g. 0.005 for a latency, so
    /// that an idle baseline does not turn a small value into a breach).
    pub baseline_floor: f64,
}

/// What one measurement concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Pass,
    Fail,
    Inconclusive,
    /// A value of every target before the rollout: the baseline of last
    /// resort.
    Before,
}

impl Judgement {
    pub fn as_str(self) -> &'static str {
        match self {
            Judgement::Pass => "pass",
            Judgement::Fail => "fail",
            Judgement::Inconclusive => "inconclusive",
            Judgement::Before => "before",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Judgement::Pass,
            Judgement::Fail,
            Judgement::Inconclusive,
            Judgement::Before,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }
}

/// One metric measured once.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub at_ms: i64,
    pub metric: String,
    /// The hosts measured.
    pub hosts: Vec<HostName>,
    pub query: String,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub judgement: Judgement,
    /// Why it failed or was inconclusive, or what it was compared with.
    pub reason: String,
    /// The bounds the value was judged against: the spec's `max` (or
    /// `max_ratio_to_baseline` times the baseline, when lower) and `min`.
    pub max: Option<f64>,
    pub min: Option<f64>,
}

/// The placeholders a query may use.
pub const PLACEHOLDERS: [&str; 4] = ["hosts", "app", "env", "version"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnalysis {
    interval: Option<String>,
    failure_limit: Option<u32>,
    inconclusive_limit: Option<u32>,
    no_data: Option<String>,
    watch_after: Option<String>,
    host_pattern: Option<String>,
    requests_query: Option<String>,
    min_requests: Option<f64>,
    #[serde(default)]
    metrics: Vec<RawMetric>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    query: String,
    max: Option<f64>,
    min: Option<f64>,
    max_ratio_to_baseline: Option<f64>,
    baseline_floor: Option<f64>,
}

/// Checks a query template: every `{{...}}` is a known placeholder.
pub fn check_template(query: &str) -> Result<(), String> {
    let mut rest = query;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| {
            format!(
                "{{{{ at byte {} is not closed with }}}}",
                query.len() - rest.len() + start
            )
        })?;
        let name = after[..end].trim();
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}} (known: {})",
                PLACEHOLDERS.map(|p| format!("{{{{{p}}}}}")).join(", ")
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// Fills a template's placeholders; `values` maps each placeholder name.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        match values.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A regular expression (RE2, as PromQL's `=~` reads it) matching exactly
/// the given values.
pub fn regex_of(values: &[String]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            let mut s = String::with_capacity(v.len());
            for c in v.chars() {
                if "\\.+*?()|[]{}^$".contains(c) {
                    // Inside a PromQL double-quoted string a backslash is
                    // itself escaped.
                    s.push_str("\\\\");
                }
                s.push(c);
            }
            s
        })
        .collect();
    escaped.join("|")
}

impl RawAnalysis {
    /// Validates; `invalid(field, message)` makes the error.
    pub(crate) fn check<E>(self, invalid: impl Fn(&str, String) -> E) -> Result<AnalysisSpec, E> {
        let dur = |field: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| invalid(field, format!("{s:?} is not a duration ({e}); try \"10s\""))),
        };
        let interval = dur("analysis.interval", self.interval, Duration::from_secs(10))?;
        if interval < Duration::from_secs(1) {
            return Err(invalid("analysis.interval", "must be at least 1s".into()));
        }
        let watch_after = dur("analysis.watch_after", self.watch_after, Duration::ZERO)?;
        let failure_limit = self.failure_limit.unwrap_or(2);
        if failure_limit == 0 {
            return Err(invalid("analysis.failure_limit", "must be at least 1".into()));
        }
        let inconclusive_limit = self.inconclusive_limit.unwrap_or(3);
        if inconclusive_limit == 0 {
            return Err(invalid("analysis.inconclusive_limit", "must be at least 1".into()));
        }
        let no_data = match self.no_data.as_deref() {
            None | Some("fail") => NoData::Fail,
            Some("pass") => NoData::Pass,
            Some(other) => {
                return Err(invalid(
                    "analysis.no_data",
                    format!("{other:?} is not \"fail\" or \"pass\""),
                ))
            }
        };
        let host_pattern = self.host_pattern.unwrap_or_else(|| "{{host}}".into());
        if !host_pattern.contains("{{host}}") {
            return Err(invalid(
                "analysis.host_pattern",
                format!("{host_pattern:?} must contain {{{{host}}}}, e.g. \"{{{{host}}}}:9100\""),
            ));
        }
        let requests = match (self.requests_query, self.min_requests) {
            (None, None) => None,
            (Some(query), Some(min)) => {
                check_template(&query).map_err(|m| invalid("analysis.requests_query", m))?;
                if !min.is_finite() || min < 0.0 {
                    return Err(invalid("analysis.min_requests", format!("{min} must be 0 or more")));
                }
                Some(RequestFloor { query, min })
            }
            (Some(_), None) => return Err(invalid("analysis.min_requests", "required with requests_query".into())),
            (None, Some(_)) => {
                return Err(invalid(
                    "analysis.requests_query",
                    "required with min_requests (the query that counts the requests)".into(),
                ))
            }
        };
        if self.metrics.is_empty() {
            return Err(invalid("analysis.metrics", "list at least one metric".into()));
        }
        let mut metrics: Vec<Metric> = Vec::new();
        for (i, m) in self.metrics.into_iter().enumerate() {
            let field = |f: &str| format!("analysis.metrics[{i}].{f}");
            if m.name.trim().is_empty() {
                return Err(invalid(&field("name"), "must not be empty".into()));
            }
            if metrics.iter().any(|o| o.name == m.name) {
                return Err(invalid(&field("name"), format!("{:?} is used twice", m.name)));
            }
            check_template(&m.query).map_err(|e| invalid(&field("query"), e))?;
            if m.max.is_none() && m.min.is_none() && m.max_ratio_to_baseline.is_none() {
                return Err(invalid(
                    &field("max"),
                    "set max, min or max_ratio_to_baseline: a metric without a bound judges nothing".into(),
                ));
            }
            for (f, v) in [
                ("max", m.max),
                ("min", m.min),
                ("max_ratio_to_baseline", m.max_ratio_to_baseline),
            ] {
                if v.is_some_and(|v| !v.is_finite()) {
                    return Err(invalid(&field(f), "must be a finite number".into()));
                }
            }
            if let Some(r) = m.max_ratio_to_baseline {
                if r <= 0.0 {
                    return Err(invalid(&field("max_ratio_to_baseline"), format!("{r} must be above 0")));
                }
                if !m.query.contains("{{hosts}}") {
                    return Err(invalid(
                        &field("query"),
                        "a comparison with the baseline needs {{hosts}} in the query, to measure each side".into(),
                    ));
                }
            }
            let baseline_floor = m.baseline_floor.unwrap_or(0.0);
            if !baseline_floor.is_finite() || baseline_floor < 0.0 {
                return Err(invalid(&field("baseline_floor"), "must be 0 or more".into()));
            }
            metrics.push(Metric {
                name: m.name,
                query: m.query,
                max: m.max,
                min: m.min,
                max_ratio_to_baseline: m.max_ratio_to_baseline,
                baseline_floor,
            });
        }
        Ok(AnalysisSpec {
            interval,
            failure_limit,
            inconclusive_limit,
            no_data,
            watch_after,
            host_pattern,
            requests,
            metrics,
        })
    }
}

/// The keys of `[analysis]`, for the documented-keys test.
#[cfg(test)]
pub(crate) fn raw_keys() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<RawAnalysis>()
}

/// The keys of `[[analysis.metrics]]`.
#[cfg(test)]
pub(crate) fn raw_metric_keys() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<RawMetric>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_unknown_placeholders_are_named() {
        assert!(check_template("up{instance=~\"{{hosts}}\",app=\"{{ app }}\"}").is_ok());
        let e = check_template("x{{host}}").unwrap_err();
        assert!(e.contains("unknown placeholder {{host}}"), "{e}");
        assert!(check_template("x{{hosts").unwrap_err().contains("not closed"));
        let q = render(
            "a{h=~\"{{hosts}}\",v=\"{{version}}\"}",
            &[("hosts", "h1|h2"), ("version", "2.0")],
        );
        assert_eq!(q, "a{h=~\"h1|h2\",v=\"2.0\"}");
    }

    #[test]
    fn host_regex_escapes_dots() {
        let r = regex_of(&["web-1.example.net:8080".into(), "h2".into()]);
        assert_eq!(r, "web-1\\\\.example\\\\.net:8080|h2");
    }
}
