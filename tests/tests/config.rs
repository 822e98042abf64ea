//! Configuration and secrets on booted hosts: a release declares the keys
//! it needs and a template; a deploy is refused until the environment's
//! configuration fits, then each host gets the rendered file in the
//! release tree (secret-bearing, mode 0600, owned by the app's user), and
//! a rollback brings code and configuration back together. The secret's
//! bytes are looked for everywhere they must never be.

use std::path::PathBuf;

use anyhow::Result;
use convoy_tests::Testbed;

const PLAIN: &str = include_str!("../testbed/demo.toml");
const SECRET: &str = "sk-live-5f1c2a9e-7b44-4d0b-a3e1-c0ffee123456";

const SCHEMA: &str = r#"
[keys.DATABASE_URL]
required = true
pattern = "postgres://.+"

[keys.API_KEY]
required = true
secret = true

[keys.FAIL_HEALTH]
type = "bool"
default = false

[[templates]]
source = "app.env"
destination = "config/app.env"
mode = "0600"
"#;

const TEMPLATE: &str = "DATABASE_URL={{ DATABASE_URL }}\nAPI_KEY={{ API_KEY }}\nFAIL_HEALTH={{ FAIL_HEALTH }}\n";

fn pack(bed: &Testbed, version: &str, template: &str) -> Result<PathBuf> {
    bed.pack_demo_with(
        version,
        "healthy",
        &[
            ("convoy/config.toml", SCHEMA.as_bytes(), 0o644),
            ("convoy/templates/app.env", template.as_bytes(), 0o644),
        ],
    )
}

fn text(out: &convoy_tests::testbed::CliOutput) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

fn app_config(bed: &Testbed, i: usize) -> String {
    bed.hosts[i].http_get("/config").map(|(_, b)| b).unwrap_or_default()
}

#[test]
fn configuration_is_validated_rendered_with_secrets_sealed_and_rolled_back_with_the_release() -> Result<()> {
    // host1 and host2 in staging, host3 in production.
    let mut bed = Testbed::boot_with(3, |i| if i < 3 { "staging" } else { "production" }.to_owned())?;
    // A webhook receiver hears every rollout: its bodies are searched too.
    let (port, hooks) = convoy_tests::webhook::webhook_receiver(None)?;
    bed.reconfigure_controller(&format!("webhooks = [\"http://127.0.0.1:{port}/hook\"]"))?;
    for h in &bed.hosts {
        h.exec_ok(&["useradd", "--system", "--no-create-home", "demo"])?;
    }
    bed.set_spec(&PLAIN.replace("units = [", "user = \"demo\"\nunits = ["))?;
    let secret_file = bed.dir.path().join("api-key");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;
    let secret_arg = format!("API_KEY={}", secret_file.display());

    // A template naming a key the release does not declare: refused at push.
    let bad = pack(&bed, "0.9.0", "DATABASE_URL={{ DATABASE_URL }}\nHOST={{ HOSTNAME }}\n")?;
    let out = bed.convoy(&["release", "push", "demo", "0.9.0", bad.to_str().unwrap()])?;
    assert_ne!(out.code, 0, "{}", text(&out));
    assert!(
        text(&out)
            .contains("convoy/templates/app.env:2: names a key the release's convoy/config.toml does not declare"),
        "{}",
        text(&out)
    );

    // Nothing set: the deploy is refused before anything moves, naming both keys.
    bed.push_file("1.0.0", &pack(&bed, "1.0.0", TEMPLATE)?)?;
    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    println!("refused deploy:\n{}", text(&out));
    assert_eq!(out.code, 4, "{}", text(&out));
    assert!(
        text(&out).contains("API_KEY is required (a secret) and not set"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("DATABASE_URL is required and not set"),
        "{}",
        text(&out)
    );
    assert_eq!(bed.serving(), ["-", "-", "-"], "nothing moved");

    // A value of the wrong shape is named too; then the right ones.
    bed.convoy_ok(&["config", "set", "demo", "--env", "staging", "DATABASE_URL=mysql://db1"])?;
    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4);
    assert!(
        text(&out).contains("DATABASE_URL: \"mysql://db1\" does not match the pattern"),
        "{}",
        text(&out)
    );
    bed.convoy_ok(&[
        "config",
        "set",
        "demo",
        "--env",
        "staging",
        "DATABASE_URL=postgres://db1/app",
    ])?;
    let said = bed.convoy_ok(&["config", "set", "demo", "--env", "staging", "--secret", &secret_arg])?;
    assert!(said.contains("configuration revision 3"), "{said}");
    let out = bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "staging"])?;
    assert!(out.contains("configuration revision 3"), "{out}");
    // The demo app shows the secret it read as its FNV-1a hash.
    let sha = {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in SECRET.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    };
    for (i, h) in bed.hosts[..2].iter().enumerate() {
        assert_eq!(
            app_config(&bed, i),
            format!("DATABASE_URL=postgres://db1/app\nAPI_KEY_HASH={sha}\n"),
            "{} reads the rendered values",
            h.name
        );
        let st = h.exec_ok(&["stat", "-L", "-c", "%a %U", "/opt/demo/config/app.env"])?;
        assert_eq!(st.trim(), "600 demo", "{}", h.name);
    }
    let table = bed.convoy_ok(&["status", "demo"])?;
    assert!(table.contains("CONFIG"), "{table}");
    let status = bed.status()?;
    assert_eq!(Testbed::host_status(&status, "host1")?["app"]["config_revision"], 3);

    // A new release with a new revision; the rollback returns both.
    bed.convoy_ok(&[
        "config",
        "set",
        "demo",
        "--env",
        "staging",
        "DATABASE_URL=postgres://db2/app",
    ])?;
    bed.push_file("2.0.0", &pack(&bed, "2.0.0", TEMPLATE)?)?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert!(app_config(&bed, 0).starts_with("DATABASE_URL=postgres://db2/app\n"));
    let set = |kv: &str| bed.convoy_ok(&["config", "set", "demo", "--env", "staging", kv]);
    let before = bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?;

    // `config apply` of a revision that breaks the health check: the host
    // restores 2.0.0 with its configuration byte for byte; the rollout halts.
    set("FAIL_HEALTH=true")?;
    let out = bed.convoy(&["config", "apply", "demo", "--env", "staging"])?;
    println!("config apply of a breaking revision:\n{}", text(&out));
    assert_eq!(out.code, 1, "{}", text(&out));
    assert!(text(&out).contains("demo 2.0.0 to staging"), "{}", text(&out));
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0", "-"]);
    assert_eq!(
        bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?,
        before
    );
    assert_eq!(
        Testbed::host_status(&bed.status()?, "host1")?["app"]["config_revision"],
        4
    );

    // A good revision applied: the same release, the new values.
    bed.convoy_ok(&["config", "unset", "demo", "--env", "staging", "FAIL_HEALTH"])?;
    set("DATABASE_URL=postgres://db3/app")?;
    let out = bed.convoy_ok(&["config", "apply", "demo", "--env", "staging"])?;
    assert!(out.contains("configuration revision 7"), "{out}");
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0", "-"]);
    assert!(app_config(&bed, 1).starts_with("DATABASE_URL=postgres://db3/app\n"));
    let st = bed.status()?;
    let h1 = &Testbed::host_status(&st, "host1")?["app"];
    assert_eq!(
        (h1["current"].as_str(), h1["config_revision"].as_u64()),
        (Some("2.0.0"), Some(7))
    );

    let at7 = bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?;

    // Values per host group and per host: the most specific wins.
    // host1 is in zone z1, host2 in zone z0.
    bed.convoy_ok(&[
        "config",
        "set",
        "demo",
        "--env",
        "staging",
        "--group",
        "zone=z1",
        "DATABASE_URL=postgres://z1/app",
    ])?;
    bed.convoy_ok(&[
        "config",
        "set",
        "demo",
        "--env",
        "staging",
        "--host",
        "host2",
        "DATABASE_URL=postgres://h2/app",
    ])?;
    bed.convoy_ok(&["config", "apply", "demo", "--env", "staging"])?;
    assert!(
        app_config(&bed, 0).starts_with("DATABASE_URL=postgres://z1/app\n"),
        "{}",
        app_config(&bed, 0)
    );
    assert!(
        app_config(&bed, 1).starts_with("DATABASE_URL=postgres://h2/app\n"),
        "{}",
        app_config(&bed, 1)
    );
    let why = bed.convoy_ok(&[
        "config",
        "explain",
        "demo",
        "--env",
        "staging",
        "--host",
        "host1",
        "DATABASE_URL",
    ])?;
    println!("config explain:\n{why}");
    assert!(
        why.contains(
            "host1 (env=staging, zone=z1) gets DATABASE_URL = \"postgres://z1/app\" from group zone=z1 (revision 9)"
        ),
        "{why}"
    );
    assert!(
        why.contains("overrides \"postgres://db3/app\" from the environment"),
        "{why}"
    );
    let shown = bed.convoy_ok(&["config", "show", "demo", "--env", "staging"])?;
    assert!(
        shown.contains("host host2") && shown.contains("group zone=z1"),
        "{shown}"
    );

    // A manual rollback returns to the previous pair: 2.0.0 with revision
    // 7, locally, without a download; then to 1.0.0 with its revision 3.
    let out = bed.convoy_ok(&["rollback", "demo", "--env", "staging"])?;
    assert!(
        out.contains("already on this host") && !out.contains("fetched"),
        "no download: {out}"
    );
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0", "-"]);
    assert_eq!(bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?, at7);
    assert!(app_config(&bed, 1).starts_with("DATABASE_URL=postgres://db3/app\n"));
    bed.convoy_ok(&["rollback", "demo", "--env", "staging", "--to", "1.0.0"])?;
    assert_eq!(bed.serving(), ["1.0.0", "1.0.0", "-"]);
    assert!(
        app_config(&bed, 0).starts_with("DATABASE_URL=postgres://db1/app\n"),
        "config came back with the code"
    );

    // History names who changed what; diff against production.
    let audit = bed.convoy_ok(&["freezes"])?;
    assert!(
        audit.contains("demo revision 3: set secret API_KEY"),
        "the audit trail: {audit}"
    );
    let history = bed.convoy_ok(&["config", "history", "demo", "--env", "staging"])?;
    assert!(history.contains("set secret API_KEY"), "{history}");
    assert!(history.contains("operator"), "{history}");
    bed.convoy_ok(&[
        "config",
        "set",
        "demo",
        "--env",
        "production",
        "DATABASE_URL=postgres://prod/app",
    ])?;
    bed.convoy_ok(&["config", "set", "demo", "--env", "production", "--secret", &secret_arg])?;
    let diff = bed.convoy_ok(&["config", "diff", "demo", "--env", "staging", "--env", "production"])?;
    println!("config diff:\n{diff}");
    assert!(
        diff.contains("DATABASE_URL") && diff.contains("postgres://prod/app"),
        "{diff}"
    );
    assert!(
        !diff.contains("API_KEY"),
        "the same secret in both does not differ: {diff}"
    );

    // Promotion to production says what differs from the configuration
    // 1.0.0 passed staging with (revision 3); strict parity refuses a key
    // set on one side only.
    let out = bed.convoy_ok(&["deploy", "demo", "1.0.0", "--env", "production"])?;
    assert!(
        out.contains("configuration differs from staging's revision 3, which 1.0.0 passed: DATABASE_URL (differs)"),
        "{out}"
    );
    assert!(app_config(&bed, 2).starts_with("DATABASE_URL=postgres://prod/app\n"));
    bed.convoy_ok(&["config", "set", "demo", "--env", "production", "FAIL_HEALTH=false"])?;
    bed.set_spec(&PLAIN.replace("units = [", "user = \"demo\"\nparity = \"strict\"\nunits = ["))?;
    let out = bed.convoy(&["deploy", "demo", "1.0.0", "--env", "production"])?;
    println!("strict parity:\n{}", text(&out));
    assert_eq!(out.code, 4, "{}", text(&out));
    assert!(
        text(&out).contains(
            "parity = \"strict\": set in only one of staging (revision 3, which 1.0.0 passed) and production (revision 3): FAIL_HEALTH"
        ),
        "{}",
        text(&out)
    );

    // A viewer reads keys but sets nothing and never sees a secret.
    let pki = bed.dir.path().join("pki");
    let pki_s = pki.to_str().unwrap();
    bed.convoy_ok(&["pki", "issue", "operator", "vera", "--role", "viewer", "--dir", pki_s])?;
    let (vc, vk) = (pki.join("vera.pem"), pki.join("vera.key"));
    let shown = bed.convoy_as(
        &vc,
        &vk,
        &["config", "show", "demo", "--env", "staging", "--output", "json"],
    )?;
    assert_eq!(shown.code, 0, "{}", text(&shown));
    assert!(shown.stdout.contains("\"secret\": true"), "{}", shown.stdout);
    let refused = bed.convoy_as(
        &vc,
        &vk,
        &[
            "config",
            "set",
            "demo",
            "--env",
            "staging",
            "DATABASE_URL=postgres://x/y",
        ],
    )?;
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("may not change configuration"),
        "{}",
        refused.stderr
    );

    // The secret's bytes are nowhere: controller log, agents' journals,
    // history and status JSON, config JSON, the database files.
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("controller log".into(), bed.controller_log().into_bytes()),
        ("history json".into(), bed.history(&["demo"])?.to_string().into_bytes()),
        ("status json".into(), bed.status()?.to_string().into_bytes()),
        ("config show json".into(), shown.stdout.into_bytes()),
    ];
    let rollouts = bed.history(&["demo"])?["rollouts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        rollouts.len(),
        8,
        "1.0.0, 2.0.0, three applies, two rollbacks, 1.0.0 in production"
    );
    for r in rollouts {
        if let Some(id) = r["id"].as_str() {
            let one = bed.history(&["--rollout", id])?;
            places.push((format!("history of {id}"), one.to_string().into_bytes()));
        }
    }
    for h in &bed.hosts {
        let journal = h.exec_ok(&["journalctl", "--no-pager", "-o", "verbose"])?;
        places.push((format!("{} journal", h.name), journal.into_bytes()));
        let state = h.exec_ok(&[
            "sh",
            "-c",
            "cat /var/lib/convoy/apps/demo/journal.json /var/lib/convoy/unreported.json",
        ])?;
        places.push((format!("{} agent state", h.name), state.into_bytes()));
    }
    let mut bodies = Vec::new();
    convoy_nspawn::wait_for(
        "a webhook for the start and end of every rollout",
        std::time::Duration::from_secs(30),
        || {
            bodies.extend(hooks.try_iter());
            (bodies.len() >= 2 * 8).then_some(())
        },
    )?;
    places.push(("webhook bodies".into(), serde_json::to_vec(&bodies)?));
    for f in std::fs::read_dir(bed.dir.path().join("controller/data"))? {
        let f = f?.path();
        if f.is_file() {
            places.push((f.display().to_string(), std::fs::read(&f)?));
        }
    }
    for (what, bytes) in &places {
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret is in {what}"
        );
    }
    println!("the secret is in none of {} places looked at", places.len());

    // The key rotates; deploys still render the secret.
    let refused = bed.convoy(&["config", "rotate-key"])?;
    assert!(
        refused.stderr.contains("that takes the admin role"),
        "{}",
        refused.stderr
    );
    bed.convoy_ok(&["pki", "issue", "operator", "ada", "--role", "admin", "--dir", pki_s])?;
    let rotated = bed.convoy_as(&pki.join("ada.pem"), &pki.join("ada.key"), &["config", "rotate-key"])?;
    assert!(
        rotated.stdout.contains("configuration key 2 in use"),
        "{}",
        text(&rotated)
    );
    bed.push_file("4.0.0", &pack(&bed, "4.0.0", TEMPLATE)?)?;
    bed.convoy_ok(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert!(app_config(&bed, 1).ends_with(&format!("API_KEY_HASH={sha}\n")));
    assert_eq!(bed.serving(), ["4.0.0", "4.0.0", "1.0.0"]);
    Ok(())
}
