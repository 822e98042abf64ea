//! How the CLI renders what several commands print: tables, metric gate
//! measurements (as lines and as JSON) and failed pre-flight checks.

use serde::Serialize;

/// Prints a table for a terminal: each column as wide as its longest
/// value, so a long value never pushes the next column out of line.
pub(super) fn print_table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    println!("{}", table(header, rows));
}

pub(super) fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    // No borders: two spaces after each cell separate the columns.
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t.lines()
        .map(|l| l.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// One metric gate measurement.
#[derive(Serialize)]
pub(super) struct MeasurementJson {
    metric: String,
    hosts: Vec<String>,
    query: String,
    value: Option<f64>,
    baseline: Option<f64>,
    /// pass, fail, inconclusive, or before (a value before the rollout)
    verdict: String,
    reason: String,
    pub(super) at_unix_ms: i64,
    /// The highest and lowest values that pass (null: no such bound).
    max: Option<f64>,
    min: Option<f64>,
}

impl From<convoy_proto::Measurement> for MeasurementJson {
    fn from(m: convoy_proto::Measurement) -> Self {
        MeasurementJson {
            metric: m.metric,
            hosts: m.hosts,
            query: m.query,
            value: m.value,
            baseline: m.baseline,
            verdict: m.verdict,
            reason: m.reason,
            at_unix_ms: m.at_unix_ms,
            max: m.max,
            min: m.min,
        }
    }
}

/// One metric gate measurement, as `deploy`, `watch` and `history` show it.
pub(super) fn measurement_line(m: &convoy_proto::Measurement) -> String {
    let value = |v: Option<f64>| {
        v.map_or("no data".to_owned(), |v| {
            format!("{}", (v * 10_000.0).round() / 10_000.0)
        })
    };
    let mut s = format!("  [gate] {} {}: {}", m.metric, m.verdict, value(m.value));
    if m.baseline.is_some() {
        s.push_str(&format!(" (baseline {})", value(m.baseline)));
    }
    if !m.reason.is_empty() {
        s.push_str(&format!(" - {}", m.reason));
    }
    s
}

/// The failed pre-flight checks, host by host.
pub(super) fn preflight_table(p: &convoy_proto::PreflightReport) -> String {
    let rows = p.hosts.iter().flat_map(|h| {
        h.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| vec![h.host.clone(), c.name.clone(), c.detail.clone()])
    });
    format!("pre-flight failed:\n{}", table(&["HOST", "CHECK", "DETAIL"], rows))
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_values_do_not_shift_the_next_column() {
        let t = super::table(
            &["HOST", "OPERATOR", "REASON"],
            [
                vec!["web1".into(), "operator alice (deployer)".into(), "ok".into()],
                vec![
                    "a-very-long-host-name.eu-west.example".into(),
                    "operator bob (admin)".into(),
                    "failed".into(),
                ],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let col = |l: &str, v: &str| l.find(v).unwrap_or_else(|| panic!("{v} in {l:?}"));
        assert_eq!(col(lines[0], "OPERATOR"), col(lines[1], "operator alice"), "{t}");
        assert_eq!(col(lines[1], "operator alice"), col(lines[2], "operator bob"), "{t}");
        assert_eq!(col(lines[0], "REASON"), col(lines[2], "failed"), "{t}");
        assert!(lines[0].starts_with("HOST "), "{t}");
    }
}
