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
    let bed = Testbed::boot(2)?;
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
    assert_eq!(bed.serving(), ["-", "-"], "nothing moved");

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
    let sha = convoy_common::Digest::of_bytes(SECRET.as_bytes()).to_hex();
    for (i, h) in bed.hosts.iter().enumerate() {
        assert_eq!(
            app_config(&bed, i),
            format!("DATABASE_URL=postgres://db1/app\nAPI_KEY_SHA256={sha}\n"),
            "{} reads the rendered values",
            h.name
        );
        let st = h.exec_ok(&["stat", "-L", "-c", "%a %U", "/opt/demo/config/app.env"])?;
        assert_eq!(st.trim(), "600 demo", "{}", h.name);
    }
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
    let before = bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?;
    // A revision that breaks the health check: the host restores 2.0.0
    // with its configuration byte for byte, and the rollout halts.
    bed.convoy_ok(&["config", "set", "demo", "--env", "staging", "FAIL_HEALTH=true"])?;
    bed.push_file("3.0.0", &pack(&bed, "3.0.0", TEMPLATE)?)?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 1, "{}", text(&out));
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0"]);
    assert_eq!(
        bed.hosts[0].exec_ok(&["sha256sum", "/opt/demo/config/app.env"])?,
        before
    );
    let out = bed.convoy_ok(&["rollback", "demo", "--env", "staging"])?;
    assert!(
        out.contains("already on this host") && !out.contains("fetched"),
        "no download: {out}"
    );
    assert_eq!(bed.serving(), ["1.0.0", "1.0.0"]);
    assert!(
        app_config(&bed, 0).starts_with("DATABASE_URL=postgres://db1/app\n"),
        "config came back with the code"
    );

    // History names who changed what; diff against production.
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
    assert!(diff.contains("FAIL_HEALTH") && diff.contains("only-from"), "{diff}");
    assert!(
        !diff.contains("API_KEY"),
        "the same secret in both does not differ: {diff}"
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
    assert_eq!(rollouts.len(), 4, "1.0.0, 2.0.0, 3.0.0 and the rollback");
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
    bed.convoy_ok(&["config", "unset", "demo", "--env", "staging", "FAIL_HEALTH"])?;
    bed.push_file("4.0.0", &pack(&bed, "4.0.0", TEMPLATE)?)?;
    bed.convoy_ok(&["deploy", "demo", "4.0.0", "--env", "staging"])?;
    assert!(app_config(&bed, 1).ends_with(&format!("API_KEY_SHA256={sha}\n")));
    Ok(())
}
