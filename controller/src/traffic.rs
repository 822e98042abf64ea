//! Traffic steps: a host leaves the load balancer before it switches and
//! comes back once it is healthy, through HAProxy's runtime API or an
//! operator's own program (`[traffic]` in the app spec).

use std::time::Duration;

use convoy_common::slots::Slot;
use convoy_common::traffic::{Provider, TrafficSpec};
use convoy_common::HostName;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::rollout::seams::{HostSteps, RolloutRef, SlotAction};

/// Longest one runtime API command may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a drain or a return is polled.
const POLL: Duration = Duration::from_millis(200);

/// The real host steps: act on the rollout's `[traffic]`, if any.
pub struct Traffic;

impl HostSteps for Traffic {
    fn before_activate<'a>(&'a self, r: &'a RolloutRef, host: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match &r.traffic {
                None => Ok(String::new()),
                Some(t) => drain(r, t, host).await,
            }
        })
    }

    fn after_activate<'a>(
        &'a self,
        r: &'a RolloutRef,
        host: &'a HostName,
        _succeeded: bool,
    ) -> BoxFuture<'a, Result<String, String>> {
        // A host that failed runs its previous release again, checked:
        // it goes back the same way.
        Box::pin(async move {
            match &r.traffic {
                None => Ok(String::new()),
                Some(t) => ready(r, t, host).await,
            }
        })
    }

    fn check<'a>(&'a self, r: &'a RolloutRef, host: &'a HostName) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match &r.traffic {
                None => Ok(String::new()),
                Some(t) => match &t.provider {
                    Provider::Haproxy {
                        runtime_api,
                        backend,
                        server,
                    } => {
                        let slots: &[Option<Slot>] = match r.blue_green {
                            Some(_) => &[Some(Slot::Blue), Some(Slot::Green)],
                            None => &[None],
                        };
                        let mut seen = Vec::new();
                        for slot in slots {
                            let server = server_name(server, host, *slot);
                            let row = server_row(runtime_api, backend, &server).await?;
                            seen.push(format!("haproxy {backend}/{server}: {}", row.status));
                        }
                        Ok(seen.join(", "))
                    }
                    Provider::Command { argv } => run(argv, "check", r, host, t.ready_timeout, &[]).await,
                },
            }
        })
    }

    fn slots<'a>(
        &'a self,
        r: &'a RolloutRef,
        host: &'a HostName,
        action: SlotAction,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let Some(t) = &r.traffic else {
                return Err("blue-green needs [traffic] in the app spec".to_owned());
            };
            match (&t.provider, action) {
                (
                    Provider::Haproxy {
                        runtime_api,
                        backend,
                        server,
                    },
                    SlotAction::Isolate,
                ) => {
                    let names = Slot::BOTH.map(|s| server_name(server, host, Some(s)));
                    for n in &names {
                        set_state(runtime_api, backend, n, "drain").await?;
                    }
                    Ok(format!(
                        "haproxy {backend}/{} and {backend}/{}: drain, no traffic before a switch",
                        names[0], names[1]
                    ))
                }
                (
                    Provider::Haproxy {
                        runtime_api,
                        backend,
                        server,
                    },
                    SlotAction::Switch { from, to },
                ) => {
                    let to_name = server_name(server, host, Some(to));
                    let from_name = from.map(|f| server_name(server, host, Some(f)));
                    switch_haproxy(runtime_api, backend, &to_name, from_name.as_deref(), t).await
                }
                (Provider::Command { argv }, SlotAction::Isolate) => {
                    run(argv, "isolate", r, host, t.ready_timeout, &[]).await
                }
                (Provider::Command { argv }, SlotAction::Switch { from, to }) => {
                    let from = from.map(|f| f.to_string()).unwrap_or_default();
                    let env = [("CONVOY_SLOT", to.to_string()), ("CONVOY_FROM_SLOT", from)];
                    run(argv, "switch", r, host, t.ready_timeout + t.drain_timeout, &env).await
                }
            }
        })
    }
}

fn server_name(pattern: &str, host: &HostName, slot: Option<Slot>) -> String {
    let named = pattern.replace("{{host}}", host.as_str());
    match slot {
        Some(s) => named.replace("{{slot}}", s.as_str()),
        None => named,
    }
}

/// Whether HAProxy's health checks see a server up, whatever its admin
/// state (a drained server that passes its checks shows DRAIN).
fn checks_up(row: &ServerRow) -> bool {
    row.status.starts_with("UP") || row.status == "DRAIN" || row.status == "no check"
}

/// Moves a blue-green host's traffic to `to`: it waits drained (checked,
/// taking nothing) until HAProxy sees it up, then one runtime API line
/// readies it and drains `from` (HAProxy runs the two back to back, so
/// new requests move at once); then `from`'s sessions drain.
async fn switch_haproxy(
    runtime_api: &str,
    backend: &str,
    to: &str,
    from: Option<&str>,
    t: &TrafficSpec,
) -> Result<String, String> {
    let started = tokio::time::Instant::now();
    let row = server_row(runtime_api, backend, to).await?;
    let serving = row.status.starts_with("UP") || row.status == "no check";
    if !serving {
        match set_and_wait(runtime_api, backend, to, "drain", t.ready_timeout, checks_up).await? {
            Ok(_) => {}
            Err(row) => {
                return Err(format!(
                    "haproxy does not see {backend}/{to} up after {} (status {}); traffic did not move",
                    humantime::format_duration(t.ready_timeout),
                    row.status
                ))
            }
        }
    }
    let mut line = format!("set server {backend}/{to} state ready");
    if let Some(f) = from {
        line.push_str(&format!("; set server {backend}/{f} state drain"));
    }
    let answer = api(runtime_api, &line).await?;
    if !answer.trim().is_empty() {
        return Err(format!("haproxy refused {line:?}: {}", answer.trim()));
    }
    let switched = started.elapsed().as_secs_f64();
    let Some(f) = from else {
        return Ok(format!("traffic on haproxy {backend}/{to} after {switched:.1}s"));
    };
    let drained = set_and_wait(runtime_api, backend, f, "drain", t.drain_timeout, |r| r.sessions == 0).await?;
    Ok(match drained {
        Ok(_) => format!(
            "traffic switched in haproxy {backend}: {to} ready, {f} drained (switch after {switched:.1}s, no session left on {f} after {:.1}s)",
            started.elapsed().as_secs_f64()
        ),
        Err(row) => format!(
            "traffic switched in haproxy {backend}: {to} ready, {f} still had {} session(s) after drain_timeout {}",
            row.sessions,
            humantime::format_duration(t.drain_timeout)
        ),
    })
}

async fn drain(r: &RolloutRef, t: &TrafficSpec, host: &HostName) -> Result<String, String> {
    match &t.provider {
        Provider::Haproxy {
            runtime_api,
            backend,
            server,
        } => {
            let server = server_name(server, host, None);
            let no_sessions = |row: &ServerRow| row.sessions == 0;
            Ok(
                match set_and_wait(runtime_api, backend, &server, "drain", t.drain_timeout, no_sessions).await? {
                    Ok(secs) => format!("drained from haproxy {backend}/{server}: no session left after {secs:.1}s"),
                    Err(row) => format!(
                        "haproxy {backend}/{server} still had {} session(s) after drain_timeout {}; switching anyway",
                        row.sessions,
                        humantime::format_duration(t.drain_timeout)
                    ),
                },
            )
        }
        Provider::Command { argv } => run(argv, "drain", r, host, t.drain_timeout, &[]).await,
    }
}

async fn ready(r: &RolloutRef, t: &TrafficSpec, host: &HostName) -> Result<String, String> {
    match &t.provider {
        Provider::Haproxy {
            runtime_api,
            backend,
            server,
        } => {
            let server = server_name(server, host, None);
            // A server without health checks is up once it is ready.
            let up = |row: &ServerRow| row.status.starts_with("UP") || row.status == "no check";
            match set_and_wait(runtime_api, backend, &server, "ready", t.ready_timeout, up).await? {
                Ok(secs) => Ok(format!("back in haproxy {backend}/{server}: UP after {secs:.1}s")),
                Err(row) => Err(format!(
                    "haproxy does not see {backend}/{server} up after {} (status {})",
                    humantime::format_duration(t.ready_timeout),
                    row.status
                )),
            }
        }
        Provider::Command { argv } => run(argv, "ready", r, host, t.ready_timeout, &[]).await,
    }
}

/// Sets a server's state, then polls its row until `done` holds (the
/// seconds it took) or `limit` passes (the last row seen).
async fn set_and_wait(
    runtime_api: &str,
    backend: &str,
    server: &str,
    state: &str,
    limit: Duration,
    done: impl Fn(&ServerRow) -> bool,
) -> Result<Result<f64, ServerRow>, String> {
    let started = tokio::time::Instant::now();
    set_state(runtime_api, backend, server, state).await?;
    loop {
        let row = server_row(runtime_api, backend, server).await?;
        if done(&row) {
            return Ok(Ok(started.elapsed().as_secs_f64()));
        }
        if started.elapsed() >= limit {
            return Ok(Err(row));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs the operator's program for `action`; its last line of output says
/// what it did.
async fn run(
    argv: &[String],
    action: &str,
    r: &RolloutRef,
    host: &HostName,
    limit: Duration,
    env: &[(&str, String)],
) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CONVOY_ACTION", action)
        .env("CONVOY_HOST", host.as_str())
        .env("CONVOY_APP", r.app.as_str())
        .env("CONVOY_ENV", &r.env)
        .env("CONVOY_ROLLOUT", &r.id)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let limit = limit + Duration::from_secs(5);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| {
            format!(
                "{} {action}: no end within {}",
                argv[0],
                humantime::format_duration(limit)
            )
        })?
        .map_err(|e| format!("{} {action}: {e}", argv[0]))?;
    let last = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    if out.status.success() {
        let said = last(&out.stdout);
        Ok(if said.is_empty() {
            format!("{} {action}: done", argv[0])
        } else {
            said
        })
    } else {
        Err(format!("{} {action}: {} {}", argv[0], out.status, last(&out.stderr)))
    }
}

/// One command to HAProxy's runtime API; returns its answer.
pub async fn api(runtime_api: &str, command: &str) -> Result<String, String> {
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, command: &str) -> std::io::Result<String> {
        s.write_all(format!("{command}\n").as_bytes()).await?;
        let mut out = String::new();
        // The API answers one command and closes the connection.
        s.take(4 << 20).read_to_string(&mut out).await?;
        Ok(out)
    }
    let talk = async {
        if runtime_api.starts_with('/') {
            exchange(tokio::net::UnixStream::connect(runtime_api).await?, command).await
        } else {
            exchange(tokio::net::TcpStream::connect(runtime_api).await?, command).await
        }
    };
    tokio::time::timeout(API_TIMEOUT, talk)
        .await
        .map_err(|_| format!("haproxy runtime API at {runtime_api}: no answer within {API_TIMEOUT:?}"))?
        .map_err(|e| format!("haproxy runtime API at {runtime_api}: {e}"))
}

async fn set_state(runtime_api: &str, backend: &str, server: &str, state: &str) -> Result<(), String> {
    let answer = api(runtime_api, &format!("set server {backend}/{server} state {state}")).await?;
    match answer.trim() {
        "" => Ok(()),
        other => Err(format!("haproxy refused to set {backend}/{server} {state}: {other}")),
    }
}

/// A server's line of `show stat`.
#[derive(Debug, PartialEq, Eq)]
struct ServerRow {
    sessions: u64,
    status: String,
}

async fn server_row(runtime_api: &str, backend: &str, server: &str) -> Result<ServerRow, String> {
    let csv = api(runtime_api, "show stat").await?;
    parse_stat(&csv, backend, server)
}

fn parse_stat(csv: &str, backend: &str, server: &str) -> Result<ServerRow, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| format!("haproxy's show stat is not CSV: {}", csv.lines().next().unwrap_or("")))?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("haproxy's show stat has no {name} column"))
    };
    let (px, sv, scur, status) = (col("pxname")?, col("svname")?, col("scur")?, col("status")?);
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f.get(px) == Some(&backend) && f.get(sv) == Some(&server) {
            return Ok(ServerRow {
                sessions: f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0),
                status: f.get(status).unwrap_or(&"").to_string(),
            });
        }
    }
    Err(format!("haproxy has no server {backend}/{server}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(argv: &[&str]) -> RolloutRef {
        RolloutRef {
            id: "r1".into(),
            app: convoy_common::AppName::new("web").unwrap(),
            env: "production".into(),
            traffic: Some(TrafficSpec {
                provider: Provider::Command {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                },
                drain_timeout: Duration::from_secs(5),
                ready_timeout: Duration::from_secs(5),
            }),
            blue_green: None,
        }
    }

    #[tokio::test]
    async fn a_command_provider_gets_the_action_and_the_host_and_its_failure_is_the_hosts() {
        let host = HostName::new("web3").unwrap();
        let ok = rollout(&[
            "sh",
            "-c",
            "echo \"$CONVOY_ACTION $CONVOY_HOST of $CONVOY_APP in $CONVOY_ENV\"",
        ]);
        assert_eq!(
            Traffic.before_activate(&ok, &host).await.unwrap(),
            "drain web3 of web in production"
        );
        assert_eq!(
            Traffic.after_activate(&ok, &host, true).await.unwrap(),
            "ready web3 of web in production"
        );
        assert_eq!(
            Traffic.check(&ok, &host).await.unwrap(),
            "check web3 of web in production"
        );
        // Blue-green: the slots travel in the environment.
        let slots = rollout(&[
            "sh",
            "-c",
            "echo \"$CONVOY_ACTION $CONVOY_HOST from '$CONVOY_FROM_SLOT' to '$CONVOY_SLOT'\"",
        ]);
        let switch = SlotAction::Switch {
            from: Some(Slot::Blue),
            to: Slot::Green,
        };
        assert_eq!(
            Traffic.slots(&slots, &host, switch).await.unwrap(),
            "switch web3 from 'blue' to 'green'"
        );
        let first = SlotAction::Switch {
            from: None,
            to: Slot::Blue,
        };
        assert_eq!(
            Traffic.slots(&slots, &host, first).await.unwrap(),
            "switch web3 from '' to 'blue'"
        );
        assert_eq!(
            Traffic.slots(&slots, &host, SlotAction::Isolate).await.unwrap(),
            "isolate web3 from '' to ''"
        );
        let bad = rollout(&["sh", "-c", "echo 'lb api: 503' >&2; exit 3"]);
        let e = Traffic.before_activate(&bad, &host).await.unwrap_err();
        assert!(e.contains("sh drain: exit status: 3 lb api: 503"), "{e}");
    }

    #[test]
    fn show_stat_rows_are_found_by_backend_and_server() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,status,weight\n\
                   web,FRONTEND,,,3,9,,100,OPEN,\n\
                   web,host1,0,0,2,5,,50,UP,1\n\
                   web,host2,0,0,0,4,,50,DRAIN,0\n\
                   web,BACKEND,0,0,2,9,,100,UP,1\n";
        assert_eq!(
            parse_stat(csv, "web", "host1").unwrap(),
            ServerRow {
                sessions: 2,
                status: "UP".into()
            }
        );
        assert_eq!(parse_stat(csv, "web", "host2").unwrap().status, "DRAIN");
        assert_eq!(
            parse_stat(csv, "web", "host9").unwrap_err(),
            "haproxy has no server web/host9"
        );
        assert!(parse_stat("Unknown command\n", "web", "host1")
            .unwrap_err()
            .contains("not CSV"));
    }
}
