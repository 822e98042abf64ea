//! `convoy config`: an app's configuration per environment. Secret values
//! go in (from stdin or a file, never the command line) and never come
//! back out.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Serialize;

use super::{Conn, Failure};

/// `KEY=VALUE`.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A secret's value: from a file (`KEY=PATH`) or from stdin (`KEY`, one
/// line); a trailing newline is not part of it.
fn secret_value(arg: &str, stdin_used: &mut bool) -> Result<(String, String), Failure> {
    let usage = |m: String| Failure::new(super::exit::USAGE, m);
    let (key, text) = match arg.split_once('=') {
        Some((k, path)) => (
            k.to_owned(),
            std::fs::read_to_string(path).map_err(|e| usage(format!("--secret {k}: {path}: {e}")))?,
        ),
        None => {
            if *stdin_used {
                return Err(usage(
                    "only one --secret may read stdin; give the others as KEY=FILE".into(),
                ));
            }
            *stdin_used = true;
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .map_err(|e| usage(format!("--secret {arg}: reading stdin: {e}")))?;
            (arg.to_owned(), t)
        }
    };
    let value = text.strip_suffix('\n').unwrap_or(&text).to_owned();
    if value.is_empty() {
        return Err(usage(format!("--secret {key}: the value is empty")));
    }
    Ok((key, value))
}

/// Whom a change is for: `--host` or `--group` (neither: the environment).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Whom {
    /// Values for this host only (the most specific; they win).
    #[arg(long, conflicts_with = "group")]
    pub host: Option<String>,
    /// Values for hosts with these labels, e.g. --group role=db (repeatable;
    /// a host must match all). A host's own values win over a group's.
    #[arg(long, value_parser = super::parse_label)]
    pub group: Vec<(String, String)>,
}

pub async fn set(
    conn: &Conn,
    app: String,
    env: String,
    whom: Whom,
    pairs: Vec<(String, String)>,
    secrets: Vec<String>,
    unset: Vec<String>,
) -> Result<(), Failure> {
    let mut stdin_used = false;
    let mut sealed = BTreeMap::new();
    for s in &secrets {
        let (k, v) = secret_value(s, &mut stdin_used)?;
        sealed.insert(k, v);
    }
    let mut client = conn.connect().await?;
    let reply = client
        .config_set(convoy_proto::ConfigSetRequest {
            app: app.clone(),
            environment: env.clone(),
            set: pairs.into_iter().collect(),
            secrets: sealed.into_iter().collect(),
            unset,
            host: whom.host.unwrap_or_default(),
            group: whom.group.into_iter().collect(),
        })
        .await?
        .into_inner();
    println!("{app} {env}: configuration revision {}", reply.revision);
    Ok(())
}

#[derive(Serialize)]
struct ShowJson {
    app: String,
    environment: String,
    revision: u64,
    author: String,
    at_unix_ms: i64,
    change: String,
    /// Secrets are listed with `"secret": true` and no value.
    entries: Vec<EntryJson>,
}

#[derive(Serialize)]
struct EntryJson {
    key: String,
    secret: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    fingerprint: String,
}

pub async fn show(conn: &Conn, app: String, env: String, revision: Option<u64>, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .config_show(convoy_proto::ConfigShowRequest {
            app: app.clone(),
            environment: env.clone(),
            revision: revision.unwrap_or(0),
        })
        .await?
        .into_inner();
    let head = reply.revision.unwrap_or_default();
    if json {
        super::print_json(&ShowJson {
            app,
            environment: env,
            revision: head.revision,
            author: head.author,
            at_unix_ms: head.at_unix_ms,
            change: head.change,
            entries: reply
                .entries
                .into_iter()
                .map(|e| EntryJson {
                    value: (!e.secret).then_some(e.value),
                    key: e.key,
                    secret: e.secret,
                    fingerprint: e.fingerprint,
                })
                .collect(),
        });
        return Ok(());
    }
    println!(
        "{app} {env}: revision {} by {} at {} ({})",
        head.revision,
        head.author,
        super::records::when(head.at_unix_ms),
        head.change
    );
    super::render::print_table(
        &["KEY", "FOR", "VALUE"],
        reply.entries.into_iter().map(|e| {
            let v = if e.secret {
                format!("(secret, fingerprint {})", e.fingerprint)
            } else {
                e.value
            };
            let (key, whom) = scoped(&e.key);
            vec![key, whom, v]
        }),
    );
    Ok(())
}

#[derive(Serialize)]
struct RevisionJson {
    revision: u64,
    author: String,
    at_unix_ms: i64,
    change: String,
}

pub async fn history(conn: &Conn, app: String, env: String, json: bool) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .config_history(convoy_proto::ConfigHistoryRequest { app, environment: env })
        .await?
        .into_inner();
    let rows: Vec<RevisionJson> = reply
        .revisions
        .into_iter()
        .map(|r| RevisionJson {
            revision: r.revision,
            author: r.author,
            at_unix_ms: r.at_unix_ms,
            change: r.change,
        })
        .collect();
    if json {
        super::print_json(&rows);
        return Ok(());
    }
    super::render::print_table(
        &["REVISION", "BY", "AT", "CHANGE"],
        rows.into_iter().map(|r| {
            vec![
                r.revision.to_string(),
                r.author,
                super::records::when(r.at_unix_ms),
                r.change,
            ]
        }),
    );
    Ok(())
}

#[derive(Serialize)]
struct DiffJson {
    from_environment: String,
    to_environment: String,
    from_revision: u64,
    to_revision: u64,
    entries: Vec<DiffEntryJson>,
}

#[derive(Serialize)]
struct DiffEntryJson {
    key: String,
    secret: bool,
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_value: Option<String>,
}

pub async fn diff(conn: &Conn, app: String, envs: Vec<String>, json: bool) -> Result<(), Failure> {
    let [from, to] = <[String; 2]>::try_from(envs).map_err(|_| {
        Failure::new(
            super::exit::USAGE,
            "config diff takes --env twice: --env staging --env production",
        )
    })?;
    let mut client = conn.connect().await?;
    let reply = client
        .config_diff(convoy_proto::ConfigDiffRequest {
            app,
            from_environment: from.clone(),
            to_environment: to.clone(),
        })
        .await?
        .into_inner();
    let shown = |secret: bool, present: bool, v: String| (present && !secret).then_some(v);
    let entries: Vec<DiffEntryJson> = reply
        .entries
        .into_iter()
        .map(|e| DiffEntryJson {
            from_value: shown(e.secret, e.state != "only-to", e.from_value),
            to_value: shown(e.secret, e.state != "only-from", e.to_value),
            key: e.key,
            secret: e.secret,
            state: e.state,
        })
        .collect();
    if json {
        super::print_json(&DiffJson {
            from_environment: from,
            to_environment: to,
            from_revision: reply.from_revision,
            to_revision: reply.to_revision,
            entries,
        });
        return Ok(());
    }
    println!(
        "{from} (revision {}) against {to} (revision {})",
        reply.from_revision, reply.to_revision
    );
    let differ: Vec<&DiffEntryJson> = entries.iter().filter(|e| e.state != "same").collect();
    if differ.is_empty() {
        println!("no key differs");
        return Ok(());
    }
    let cell = |e: &DiffEntryJson, v: &Option<String>, present: bool| match (present, e.secret, v) {
        (false, _, _) => "(not set)".to_owned(),
        (true, true, _) => "(secret)".to_owned(),
        (true, false, v) => v.clone().unwrap_or_default(),
    };
    super::render::print_table(
        &["KEY", "STATE", from.as_str(), to.as_str()],
        differ.iter().map(|e| {
            let (key, whom) = scoped(&e.key);
            vec![
                if whom == "environment" {
                    key
                } else {
                    format!("{key} ({whom})")
                },
                e.state.clone(),
                cell(e, &e.from_value, e.state != "only-to"),
                cell(e, &e.to_value, e.state != "only-from"),
            ]
        }),
    );
    Ok(())
}

pub async fn rotate_key(conn: &Conn) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .config_rotate_key(convoy_proto::ConfigRotateKeyRequest {})
        .await?
        .into_inner();
    println!(
        "configuration key {} in use; {} secret value(s) resealed",
        reply.key_id, reply.resealed
    );
    Ok(())
}

/// `convoy config apply`: the release the environment runs, deployed
/// again with a configuration revision (its newest by default), through
/// the same strategies, checks, gates and restore as any deploy.
pub async fn apply(
    conn: &Conn,
    app: String,
    env: String,
    revision: Option<u64>,
    pace: super::Pace,
    output: super::Output,
) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .status(convoy_proto::StatusRequest { app: app.clone() })
        .await?
        .into_inner();
    let mut running: BTreeMap<String, usize> = BTreeMap::new();
    for h in reply.hosts.iter().filter(|h| h.labels.get("env") == Some(&env)) {
        if let Some(v) = h.app.as_ref().map(|a| a.current.clone()).filter(|v| !v.is_empty()) {
            *running.entry(v).or_default() += 1;
        }
    }
    let version = match running.len() {
        0 => {
            return Err(Failure::new(
                super::exit::REFUSED,
                format!(
                    "config apply refused, nothing was changed: no host of {app} in {env} runs a release; deploy one"
                ),
            ))
        }
        1 => running.into_keys().next().expect("one"),
        _ => {
            let each: Vec<String> = running.iter().map(|(v, n)| format!("{v} on {n}")).collect();
            return Err(Failure::new(
                super::exit::REFUSED,
                format!(
                    "config apply refused, nothing was changed: the hosts of {app} in {env} run different releases ({}); deploy one everywhere first",
                    each.join(", ")
                ),
            ));
        }
    };
    super::deploy(
        conn,
        super::DeployArgs {
            app,
            release: version,
            env,
            pace,
            no_rollback: false,
            hotfix: false,
            reason: None,
            order: vec![],
            select: vec![],
            canary_group: vec![],
            promote: "auto".into(),
            on_vanish: "fail".into(),
            vanish_deadline: None,
            config_revision: revision,
            dry_run: false,
            output,
        },
    )
    .await
}

/// A stored key as (key, whom it is for): `DATABASE_URL@host:web1`.
fn scoped(stored: &str) -> (String, String) {
    match stored.split_once('@') {
        None => (stored.to_owned(), "environment".to_owned()),
        Some((k, w)) => (k.to_owned(), w.replacen(':', " ", 1)),
    }
}

pub async fn explain(
    conn: &Conn,
    app: String,
    env: String,
    host: String,
    key: String,
    json: bool,
) -> Result<(), Failure> {
    let mut client = conn.connect().await?;
    let reply = client
        .config_explain(convoy_proto::ConfigExplainRequest {
            app: app.clone(),
            environment: env.clone(),
            host: host.clone(),
            key: key.clone(),
        })
        .await?
        .into_inner();
    let shown = |e: &convoy_proto::ConfigExplainEntry| {
        if e.secret {
            format!("(secret, fingerprint {})", e.fingerprint)
        } else {
            format!("{:?}", e.value)
        }
    };
    if json {
        #[derive(Serialize)]
        struct Candidate {
            scope: String,
            secret: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            value: Option<String>,
            fingerprint: String,
        }
        #[derive(Serialize)]
        struct Explained {
            app: String,
            environment: String,
            host: String,
            key: String,
            revision: u64,
            labels: BTreeMap<String, String>,
            /// The value the host gets first.
            candidates: Vec<Candidate>,
        }
        super::print_json(&Explained {
            app,
            environment: env,
            host,
            key,
            revision: reply.revision,
            labels: reply.labels.into_iter().collect(),
            candidates: reply
                .candidates
                .into_iter()
                .map(|c| Candidate {
                    value: (!c.secret).then_some(c.value),
                    scope: c.scope,
                    secret: c.secret,
                    fingerprint: c.fingerprint,
                })
                .collect(),
        });
        return Ok(());
    }
    // In name order: the wire's map has none.
    let labels: BTreeMap<&String, &String> = reply.labels.iter().collect();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let Some((first, rest)) = reply.candidates.split_first() else {
        return Err(Failure::new(
            super::exit::FAILED,
            format!("{key} has no value for {host}"),
        ));
    };
    println!(
        "{host} ({}) gets {key} = {} from {} (revision {}).",
        labels.join(", "),
        shown(first),
        first.scope,
        reply.revision
    );
    for c in rest {
        println!("  overrides {} from {}", shown(c), c.scope);
    }
    println!("A host's own value wins over a group's (more labels first), and a group's over the environment's.");
    Ok(())
}
