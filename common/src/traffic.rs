//! The `[traffic]` part of an app spec: how requests reach the hosts, so
//! that a rollout can take each host out of the load balancer before it
//! switches and put it back once it is healthy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSpec {
    pub provider: Provider,
    /// Longest wait for a drained host's sessions to end; it switches
    /// anyway after it (the sessions left are cut).
    pub drain_timeout: Duration,
    /// Longest wait for the balancer to see a host up again; past it the
    /// host counts as failed.
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provider {
    /// HAProxy's runtime API.
    Haproxy {
        /// `host:port` of a `stats socket ipv4@...`, or the path of a unix socket.
        runtime_api: String,
        backend: String,
        /// The server name of a host: `{{host}}` is the convoy host name.
        server: String,
    },
    /// A program run on the controller with `CONVOY_ACTION` (`drain`,
    /// `ready`, `check`), `CONVOY_HOST`, `CONVOY_APP` and `CONVOY_ENV`.
    Command { argv: Vec<String> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTraffic {
    kind: String,
    runtime_api: Option<String>,
    backend: Option<String>,
    server: Option<String>,
    command: Option<Vec<String>>,
    drain_timeout: Option<String>,
    ready_timeout: Option<String>,
}

/// The keys of `[traffic]`, for the documented-keys test.
#[cfg(test)]
pub(crate) fn raw_keys() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<RawTraffic>()
}

impl RawTraffic {
    pub(crate) fn check<E>(self, invalid: impl Fn(&str, String) -> E) -> Result<TrafficSpec, E> {
        let dur = |field: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| invalid(field, format!("{s:?} is not a duration ({e}); try \"30s\""))),
        };
        let drain_timeout = dur("traffic.drain_timeout", self.drain_timeout, Duration::from_secs(30))?;
        let ready_timeout = dur("traffic.ready_timeout", self.ready_timeout, Duration::from_secs(30))?;
        if ready_timeout.is_zero() {
            return Err(invalid("traffic.ready_timeout", "must be above zero".into()));
        }
        let not_for = |field: &str, present: bool, kind: &str| {
            if present {
                Err(invalid(
                    &format!("traffic.{field}"),
                    format!("does not apply to kind = {kind:?}"),
                ))
            } else {
                Ok(())
            }
        };
        let provider = match self.kind.as_str() {
            "haproxy" => {
                not_for("command", self.command.is_some(), "haproxy")?;
                let runtime_api = self.runtime_api.ok_or_else(|| {
                    invalid(
                        "traffic.runtime_api",
                        "required for haproxy (host:port or a unix socket path)".into(),
                    )
                })?;
                let tcp = runtime_api
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !tcp && !runtime_api.starts_with('/') {
                    return Err(invalid(
                        "traffic.runtime_api",
                        format!("{runtime_api:?} is neither host:port nor an absolute unix socket path"),
                    ));
                }
                let backend = self
                    .backend
                    .ok_or_else(|| invalid("traffic.backend", "required for haproxy".into()))?;
                let server = self.server.unwrap_or_else(|| "{{host}}".into());
                for (field, v) in [("backend", &backend), ("server", &server)] {
                    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '/') {
                        return Err(invalid(
                            &format!("traffic.{field}"),
                            format!("{v:?} must be a non-empty HAProxy name without spaces or '/'"),
                        ));
                    }
                }
                Provider::Haproxy {
                    runtime_api,
                    backend,
                    server,
                }
            }
            "command" => {
                for (field, present) in [
                    ("runtime_api", self.runtime_api.is_some()),
                    ("backend", self.backend.is_some()),
                    ("server", self.server.is_some()),
                ] {
                    not_for(field, present, "command")?;
                }
                let argv = self
                    .command
                    .ok_or_else(|| invalid("traffic.command", "required for kind = \"command\"".into()))?;
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid("traffic.command", "must name a program".into()));
                }
                Provider::Command { argv }
            }
            other => {
                return Err(invalid(
                    "traffic.kind",
                    format!("unknown traffic kind {other:?} (expected \"haproxy\" or \"command\")"),
                ))
            }
        };
        Ok(TrafficSpec {
            provider,
            drain_timeout,
            ready_timeout,
        })
    }
}
