//! Freezes and deploy windows on booted hosts, through the CLI: a freeze
//! refuses new deploys and holds a running canary before its next batch,
//! an admin's hotfix passes (audited), unfreezing lets everything go on,
//! and a deploy outside the spec's windows is refused.

use std::time::Duration;

use anyhow::Result;
use convoy_tests::testbed::canary_deploy;
use convoy_tests::Testbed;

fn latest(bed: &Testbed) -> Option<serde_json::Value> {
    Some(bed.history(&["demo"]).ok()?["rollouts"][0].clone())
}

#[test]
fn freezes_hold_deploys_and_an_admins_hotfix_passes() -> Result<()> {
    let bed = Testbed::boot(2)?;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        bed.push_demo(v, "healthy")?;
    }
    bed.deploy_everywhere("1.0.0")?;
    let pki = bed.dir.path().join("pki");
    let pki_s = pki.to_str().unwrap().to_owned();
    bed.convoy_ok(&["pki", "issue", "operator", "root", "--role", "admin", "--dir", &pki_s])?;
    let (cert, key) = (pki.join("root.pem"), pki.join("root.key"));
    let admin = |args: &[&str]| bed.convoy_as(&cert, &key, args);

    // Only admins freeze.
    let out = bed.convoy(&["freeze", "--env", "staging", "--reason", "incident 4711"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("may not freeze environments"), "{}", out.stderr);

    // A canary is baking when the environment freezes: it waits before its
    // next batch.
    let canary = bed.convoy_spawn(&canary_deploy("2.0.0", "1,100%", "10s"))?;
    convoy_nspawn::wait_for("the canary to move host1", Duration::from_secs(60), || {
        (bed.hosts[0].serving()? == "2.0.0").then_some(())
    })?;
    let out = admin(&["freeze", "--env", "staging", "--reason", "incident 4711"])?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("staging frozen by operator root (admin)"),
        "{}",
        out.stdout
    );
    convoy_nspawn::wait_for("the canary to be held", Duration::from_secs(30), || {
        (latest(&bed)?["state"] == "frozen").then_some(())
    })?;
    assert_eq!(bed.serving(), ["2.0.0", "1.0.0"], "host2 waits");

    // A new deploy is refused with who, why and how to pass.
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("staging is frozen by operator root (admin) since") && out.stderr.contains("incident 4711"),
        "{}",
        out.stderr
    );
    // A deployer's hotfix does not pass it.
    let out = bed.convoy(&[
        "deploy", "demo", "3.0.0", "--env", "staging", "--hotfix", "--reason", "fix",
    ])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains("only an admin's --hotfix passes it"),
        "{}",
        out.stderr
    );

    // Unfreezing lets the held canary go on.
    let out = admin(&["unfreeze", "--env", "staging"])?;
    assert_eq!(out.code, 0, "{out:?}");
    let out = canary.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("staging is frozen by operator root (admin)"), "{text}");
    assert!(text.contains("staging is no longer frozen; going on"), "{text}");
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0"]);

    // Frozen again, an admin's hotfix passes, and the audit says so.
    admin(&[
        "freeze",
        "--env",
        "staging",
        "--reason",
        "incident 4712",
        "--until",
        "2h",
    ])?;
    let out = admin(&[
        "deploy",
        "demo",
        "3.0.0",
        "--env",
        "staging",
        "--hotfix",
        "--reason",
        "fix for 4712",
    ])?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("hotfix by operator root (admin) passes: staging is frozen"),
        "{}",
        out.stdout
    );
    assert_eq!(bed.serving(), ["3.0.0", "3.0.0"]);
    let freezes: serde_json::Value = serde_json::from_str(&bed.convoy_ok(&["freezes", "--output", "json"])?)?;
    assert_eq!(freezes["freezes"][0]["environment"], "staging");
    assert!(freezes["freezes"][0]["until_unix_ms"].as_i64().is_some(), "{freezes}");
    let actions: Vec<&str> = freezes["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["hotfix_pass", "freeze", "unfreeze", "freeze"]);
    assert!(
        freezes["audit"][0]["detail"].as_str().unwrap().contains("fix for 4712"),
        "{freezes}"
    );

    // Unfrozen, a plain deploy goes through.
    admin(&["unfreeze", "--env", "staging"])?;
    bed.convoy_ok(&["deploy", "demo", "2.0.0", "--env", "staging"])?;
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0"]);

    // Outside the spec's windows a deploy is refused; inside, it runs.
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/demo.toml"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    // 1970-01-01 was a Thursday.
    let days = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let today = days[(now / 86_400 % 7) as usize];
    let tomorrow = days[(now / 86_400 % 7 + 1) as usize % 7];
    bed.set_spec(&format!("windows = [\"{tomorrow} 00:00-24:00 UTC\"]\n{spec}"))?;
    let out = bed.convoy(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("outside demo's deploy windows"), "{}", out.stderr);
    assert_eq!(bed.serving(), ["2.0.0", "2.0.0"], "nothing changed");
    bed.set_spec(&format!("windows = [\"{today} 00:00-24:00 UTC\"]\n{spec}"))?;
    bed.convoy_ok(&["deploy", "demo", "3.0.0", "--env", "staging"])?;
    Ok(())
}
