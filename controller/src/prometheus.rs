//! Asks Prometheus for the value of an instant query (the metric gates'
//! source): `GET /api/v1/query`, over http, or https verified against the
//! system's roots and `prometheus_ca`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use crate::rollout::seams::{MetricSource, QueryError};

/// Longest one query may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read: a gate's query returns one value.
const BODY_LIMIT: usize = 1 << 20;

pub struct Prometheus {
    /// Base URL, without a trailing slash.
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Prometheus {
    pub fn new(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Prometheus {
            url: url.trim_end_matches('/').to_owned(),
            tls,
        }
    }

    async fn ask(&self, promql: &str) -> Result<Option<f64>, QueryError> {
        let q = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let url = format!("{}/api/v1/query?query={q}", self.url);
        let resp = convoy_common::http::send(convoy_common::http::Request {
            method: hyper::Method::GET,
            url: &url,
            json: None,
            tls: self.tls.clone(),
            body_limit: BODY_LIMIT,
            timeout: Some(TIMEOUT),
        })
        .await
        .map_err(|e| QueryError::Failed(format!("Prometheus at {}: {e}", self.url)))?;
        parse_answer(resp.status, &resp.body)
    }
}

impl MetricSource for Prometheus {
    fn query<'a>(&'a self, promql: &'a str) -> BoxFuture<'a, Result<Option<f64>, QueryError>> {
        Box::pin(self.ask(promql))
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: String,
    #[serde(rename = "errorType", default)]
    error_type: String,
    data: Option<Data>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Sample {
    #[serde(default)]
    metric: serde_json::Map<String, serde_json::Value>,
    value: (f64, String),
}

/// One value from a query's answer: `None` for an empty vector or NaN;
/// an error for a refused query or an answer that is not one value.
fn parse_answer(status: u16, body: &[u8]) -> Result<Option<f64>, QueryError> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        QueryError::Failed(format!(
            "HTTP {status}, not a Prometheus answer ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    if answer.status != "success" {
        // bad_data: the query itself is wrong. Timeouts, cancellations and
        // execution errors may pass on a later try.
        let why = format!("{}: {}", answer.error_type, answer.error);
        return Err(if answer.error_type == "bad_data" {
            QueryError::Refused(why)
        } else {
            QueryError::Failed(why)
        });
    }
    let number = |text: &str| -> Result<Option<f64>, QueryError> {
        let v: f64 = text
            .parse()
            .map_err(|_| QueryError::Failed(format!("{text:?} is not a number")))?;
        Ok((!v.is_nan()).then_some(v))
    };
    match answer.data {
        Some(Data::Vector(samples)) => match samples.as_slice() {
            [] => Ok(None),
            [one] => number(&one.value.1),
            many => {
                let labels: Vec<String> = many.iter().take(3).map(|s| format!("{:?}", s.metric)).collect();
                Err(QueryError::Refused(format!(
                    "the query returns {} series ({} ...), not one value: aggregate it (sum, max, avg)",
                    many.len(),
                    labels.join(", ")
                )))
            }
        },
        Some(Data::Scalar((_, v))) => number(&v),
        Some(Data::Matrix(_)) | Some(Data::String(_)) | None => Err(QueryError::Refused(
            "the query does not return an instant vector or a scalar".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_one_value_or_a_reason() {
        let one =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"0.25"]}]}}"#;
        assert_eq!(parse_answer(200, one).unwrap(), Some(0.25));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(200, empty).unwrap(), None);
        let nan =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"NaN"]}]}}"#;
        assert_eq!(parse_answer(200, nan).unwrap(), None);
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"2"]}}"#;
        assert_eq!(parse_answer(200, scalar).unwrap(), Some(2.0));
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"host":"a"},"value":[1,"1"]},{"metric":{"host":"b"},"value":[1,"2"]}]}}"#;
        assert!(matches!(parse_answer(200, two), Err(QueryError::Refused(e)) if e.contains("returns 2 series")));
        let bad = br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected end of input"}"#;
        assert!(matches!(parse_answer(400, bad), Err(QueryError::Refused(e)) if e.contains("parse error")));
        let timeout = br#"{"status":"error","errorType":"timeout","error":"query timed out"}"#;
        assert!(matches!(parse_answer(503, timeout), Err(QueryError::Failed(_))));
        assert!(
            matches!(parse_answer(502, b"<html>bad gateway</html>"), Err(QueryError::Failed(e)) if e.contains("HTTP 502"))
        );
    }
}
