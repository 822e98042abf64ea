//! Small SVG charts, drawn on the server: no script and no chart library
//! in the browser. Each has a title and a text description for those who
//! cannot see it, and its figures are also in the page as text.

use maud::{html, Markup};

const W: f64 = 480.0;
const H: f64 = 120.0;

fn day(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%m-%d").to_string())
        .unwrap_or_default()
}

/// One bar per bucket: (start, total, the part of it drawn darker).
pub fn bars(title: &str, buckets: &[(i64, f64, f64)]) -> Markup {
    let top = buckets.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let n = buckets.len().max(1) as f64;
    let w = W / n;
    let total: f64 = buckets.iter().map(|b| b.1).sum();
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {}", H + 16.0)) role="img" aria-label=(format!("{title}: {total} in all over {} days", buckets.len())) {
                title { (title) }
                @for (i, (start, all, part)) in buckets.iter().enumerate() {
                    @let x = i as f64 * w;
                    @let h = all / top * H;
                    @let hp = part / top * H;
                    rect.bar x=(x + 1.0) y=(H - h) width=((w - 2.0).max(1.0)) height=(h) {
                        title { (day(*start)) ": " (all) }
                    }
                    @if *part > 0.0 {
                        rect.bar-part x=(x + 1.0) y=(H - hp) width=((w - 2.0).max(1.0)) height=(hp) {}
                    }
                }
                line.axis x1="0" y1=(H) x2=(W) y2=(H) {}
                @if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
                    text x="0" y=(H + 14.0) { (day(first.0)) }
                    text x=(W) y=(H + 14.0) text-anchor="end" { (day(last.0)) }
                }
                text x="2" y="12" { "max " (top) }
            }
            figcaption { (title) }
        }
    }
}

/// A metric gate's values over the rollout against the bound each was
/// judged by (a solid line: the highest or lowest value that passes) and
/// its baseline (dashed); failing points are marked with a cross as well
/// as their colour.
pub fn gate(metric: &str, points: &[&convoy_proto::Measurement]) -> Markup {
    let values = points
        .iter()
        .flat_map(|m| [m.value, m.baseline, m.max, m.min])
        .flatten();
    let top = values.fold(0.0, f64::max).max(f64::MIN_POSITIVE) * 1.1;
    let n = points.len().max(1) as f64;
    let x = |i: usize| (i as f64 + 0.5) * (W / n);
    let y = |v: f64| H - v / top * H;
    let line = |of: fn(&convoy_proto::Measurement) -> Option<f64>| -> Vec<String> {
        points
            .iter()
            .enumerate()
            .filter_map(|(i, m)| of(m).map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect()
    };
    let baseline = line(|m| m.baseline);
    let bounds = [line(|m| m.max), line(|m| m.min)];
    html! {
        svg viewBox=(format!("0 0 {W} {}", H + 4.0)) role="img"
            aria-label=(format!("{metric}: {} measurements against their bounds (solid) and baseline (dashed)", points.len())) {
            title { (metric) }
            @if baseline.len() > 1 {
                polyline.baseline points=(baseline.join(" ")) {}
            }
            @for b in &bounds {
                @if b.len() > 1 {
                    polyline.bound points=(b.join(" ")) {}
                } @else if b.len() == 1 {
                    @let yv = b[0].split(',').nth(1).unwrap_or("0");
                    line.bound x1="0" y1=(yv) x2=(W) y2=(yv) {}
                }
            }
            @for (i, m) in points.iter().enumerate() {
                @if let Some(v) = m.value {
                    @let class = if m.verdict == "fail" { "point fail" } else { "point" };
                    circle class=(class) cx=(x(i)) cy=(y(v)) r="4" {
                        title {
                            (m.verdict) ": " (v)
                            @if let Some(b) = m.max { ", at most " (b) }
                            @if let Some(b) = m.min { ", at least " (b) }
                            @if let Some(b) = m.baseline { " (baseline " (b) ")" }
                        }
                    }
                    @if m.verdict == "fail" {
                        text.cross x=(x(i)) y=(y(v) - 7.0) text-anchor="middle" { "✗" }
                    }
                }
            }
            line.axis x1="0" y1=(H) x2=(W) y2=(H) {}
            text x="2" y="12" { "max " (format!("{:.4}", top / 1.1)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(value: f64, max: Option<f64>, verdict: &str) -> convoy_proto::Measurement {
        convoy_proto::Measurement {
            metric: "error-rate".into(),
            value: Some(value),
            baseline: Some(0.01),
            max,
            verdict: verdict.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_gate_chart_draws_its_bound_and_marks_failures_in_text() {
        let points = [m(0.01, Some(0.05), "pass"), m(0.2, Some(0.05), "fail")];
        let svg = gate("error-rate", &points.iter().collect::<Vec<_>>()).into_string();
        assert!(svg.contains("<polyline class=\"bound\""), "{svg}");
        assert!(svg.contains("<polyline class=\"baseline\""), "{svg}");
        assert_eq!(svg.matches("class=\"point fail\"").count(), 1, "{svg}");
        assert!(svg.contains("✗"), "a failure is marked by a symbol too: {svg}");
        assert!(svg.contains("fail: 0.2, at most 0.05"), "{svg}");
        // One measurement: its bound is a line across.
        let one = gate("error-rate", &[&points[0]]).into_string();
        assert!(one.contains("<line class=\"bound\""), "{one}");
    }
}
