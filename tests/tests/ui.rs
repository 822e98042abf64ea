//! The dashboard (`convoy ui`) in a real browser: Debian's Chromium driven
//! over WebDriver, against a booted fleet and a real controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use convoy_tests::browser::Browser;
use convoy_tests::testbed::{canary_deploy, dashboard_link, http_get, http_request, line_feed, wait_line, HttpReply};
use convoy_tests::Testbed;

/// A running `convoy ui`: its address and its one-time token.
struct Ui {
    child: std::process::Child,
    addr: SocketAddr,
    token: String,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ui(bed: &Testbed, identity: &[&str]) -> Result<Ui> {
    let mut args = identity.to_vec();
    args.push("ui");
    let mut child = bed.convoy_spawn(&args)?;
    let lines = line_feed(&mut child);
    let line = wait_line(&lines, "http://", &mut vec![])?;
    let (addr, token) = dashboard_link(&line).context("a URL with a token")?;
    Ok(Ui { child, addr, token })
}

impl Ui {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Trades the token for the session cookie, as a browser would.
    fn session(&self) -> Result<String> {
        let r = http_get_reply(self.addr, &format!("/?token={}", self.token), &[])?;
        assert_eq!(r.status, 303, "{r:?}");
        let c = r.header("set-cookie").context("a session cookie")?;
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict"), "{c}");
        Ok(c.split(';').next().unwrap().to_owned())
    }
}

fn http_get_reply(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpReply> {
    http_request(addr, "GET", path, headers, "").context("the dashboard answers")
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An action form posted for rollout `id` as `cookie`'s session, not by
/// the dashboard's page (from `origin`, if given).
fn post_action(addr: SocketAddr, id: &str, cookie: &str, origin: Option<&str>, form: &str) -> Result<HttpReply> {
    let mut headers = vec![
        ("Cookie", cookie),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    headers.extend(origin.map(|o| ("Origin", o)));
    http_request(addr, "POST", &format!("/rollouts/{id}/control"), &headers, form).context("the dashboard answers")
}

/// The secret the dashboard's action forms carry.
fn ui_csrf(browser: &Browser) -> Result<String> {
    let v = browser.script("return document.querySelector('meta[name=csrf]').content")?;
    Ok(v.as_str().context("a csrf meta")?.to_owned())
}

fn rollout_state(bed: &Testbed, id: &str) -> Result<String> {
    let h = bed.history(&["--rollout", id])?;
    Ok(h["rollouts"][0]["state"].as_str().unwrap_or_default().to_owned())
}

fn wait_state(bed: &Testbed, id: &str, want: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = rollout_state(bed, id)?;
        if now == want {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "rollout {id} is {now}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Records, in the page, every change of each host's step and outcome
/// cells as it happens, and a marker that a reload would wipe.
const RECORDER: &str = r#"
window.__convoyMarker = 1;
const box = document.getElementById("hosts");
const rows = () => Array.from(box.querySelectorAll("tr[data-host]")).map((tr) =>
  tr.dataset.host + "|" + tr.querySelector(".step").textContent + "|" + tr.querySelector(".outcome").textContent);
window.__before = rows();
window.__seen = [];
new MutationObserver(() => {
  rows().forEach((s) => { if (!window.__seen.includes(s)) window.__seen.push(s); });
}).observe(box, { subtree: true, childList: true, characterData: true });
return true;
"#;

#[test]
fn the_dashboard_shows_a_rollout_live_and_lets_only_deployers_act() -> Result<()> {
    let bed = Testbed::boot(3)?;
    bed.push_demo("1.0.0", "healthy")?;
    bed.deploy_everywhere("1.0.0")?;
    bed.push_demo("2.0.0", "healthy")?;
    // It serves on loopback only, and says so.
    let out = bed.convoy(&["ui", "--listen", "0.0.0.0:0"])?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("--listen 0.0.0.0:0: the dashboard listens on loopback only"),
        "{out:?}"
    );
    let ui = start_ui(&bed, &[])?;

    // Nothing without the token; a wrong token is no better.
    assert_eq!(http_get(ui.addr, "/").map(|r| r.0), Some(401));
    assert_eq!(http_get(ui.addr, "/hosts").map(|r| r.0), Some(401));
    assert_eq!(http_get(ui.addr, "/?token=00").map(|r| r.0), Some(401));
    // A page asked for under another name (DNS rebinding) is refused.
    let rebound = http_get_reply(ui.addr, "/", &[("Host", "attacker.example:80")]);
    assert_eq!(rebound.map(|r| r.status).ok(), Some(421));

    let browser = Browser::start()?;
    browser.goto(&ui.url(&format!("/?token={}", ui.token)))?;
    assert_eq!(
        browser.url()?,
        ui.url("/"),
        "the token is traded for a cookie and left out of the address"
    );
    let matrix = browser.text("#matrix")?;
    assert!(matrix.contains("1.0.0 ×3"), "{matrix}");
    assert!(matrix.contains("3 healthy"), "{matrix}");
    // The link worked once.
    assert_eq!(
        http_get(ui.addr, &format!("/?token={}", ui.token)).map(|r| r.0),
        Some(401)
    );

    // A canary in three stages with a bake after each but the last, long
    // enough for the pause below to land before the second stage.
    let mut args = canary_deploy("2.0.0", "1,2,100%", "10s");
    args.extend(["--output", "json"]);
    let mut deploy = bed.convoy_spawn(&args)?;
    let events = line_feed(&mut deploy);
    let plan: serde_json::Value = serde_json::from_str(&wait_line(&events, "\"plan\"", &mut vec![])?)?;
    let id = plan["rollout_id"].as_str().context("rollout id")?.to_owned();
    browser.goto(&ui.url(&format!("/rollouts/{id}")))?;
    browser.wait_text("#plan", "Batch 3", Duration::from_secs(10))?;

    // Pause from the dashboard: a link, a confirmation, then the form.
    browser.click("a[href$='/confirm/pause']")?;
    browser.wait_url(
        &ui.url(&format!("/rollouts/{id}/confirm/pause")),
        Duration::from_secs(10),
    )?;
    assert!(browser.text("main")?.contains("pause stops it before its next batch"));
    browser.click("form button[type=submit]")?;
    browser.wait_url(&ui.url(&format!("/rollouts/{id}")), Duration::from_secs(10))?;
    wait_state(&bed, &id, "paused")?;

    // A viewer's dashboard offers no action, and a forged one is refused.
    let pki = bed.dir.path().join("pki");
    bed.convoy_ok(&[
        "pki",
        "issue",
        "operator",
        "vera",
        "--role",
        "viewer",
        "--dir",
        pki.to_str().unwrap(),
    ])?;
    let (vc, vk) = (pki.join("vera.pem"), pki.join("vera.key"));
    let viewer = start_ui(&bed, &["--cert", vc.to_str().unwrap(), "--key", vk.to_str().unwrap()])?;
    let cookie = viewer.session()?;
    let page = http_get_reply(viewer.addr, &format!("/rollouts/{id}"), &[("Cookie", &cookie)])?;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("(viewer)"), "{}", page.body);
    assert!(
        !page.body.contains("/confirm/"),
        "a viewer is offered no action: {}",
        page.body
    );
    assert!(!page.body.contains("method=\"post\""), "{}", page.body);
    let csrf = page
        .body
        .split("name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("the page's csrf value")?
        .to_owned();
    let confirm = http_get_reply(
        viewer.addr,
        &format!("/rollouts/{id}/confirm/resume"),
        &[("Cookie", &cookie)],
    )?;
    assert_eq!(confirm.status, 403, "{confirm:?}");
    for action in ["resume", "abort"] {
        let forged = post_action(viewer.addr, &id, &cookie, None, &format!("action={action}&csrf={csrf}"))?;
        assert_eq!(forged.status, 403, "{forged:?}");
        assert!(
            forged.body.contains("only a deployer or an admin may"),
            "{}",
            forged.body
        );
    }
    // The deployer's own dashboard refuses an action without its form's
    // secret (a request from another site).
    let deployer_cookie = browser
        .script("return document.cookie")
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    assert_eq!(
        deployer_cookie, "",
        "the session cookie is HttpOnly: scripts cannot read it"
    );
    let session = browser.cookie("convoy_ui")?;
    for (origin, secret) in [
        ("http://attacker.example".to_owned(), ui_csrf(&browser)?),
        (ui.url(""), "0".repeat(32)),
    ] {
        let forged = post_action(
            ui.addr,
            &id,
            &session,
            Some(&origin),
            &format!("action=resume&csrf={secret}"),
        )?;
        assert_eq!(forged.status, 403, "from {origin}: {forged:?}");
        assert!(
            forged.body.contains("did not come from the dashboard"),
            "{}",
            forged.body
        );
    }
    assert_eq!(rollout_state(&bed, &id)?, "paused", "nothing forged moved the rollout");

    // Resume from the CLI: the open page shows the rest as it happens.
    browser.script(RECORDER)?;
    bed.convoy_ok(&["resume", &id])?;
    browser.wait_text("#verdict", "succeeded", Duration::from_secs(120))?;
    assert_eq!(
        browser.script("return window.__convoyMarker")?,
        serde_json::json!(1),
        "no reload"
    );
    let before: Vec<String> = serde_json::from_value(browser.script("return window.__before")?)?;
    let seen: Vec<String> = serde_json::from_value(browser.script("return window.__seen")?)?;
    // The pause held the rollout after its first stage: the other two
    // hosts had not been switched when the page began to watch.
    let waiting: Vec<&str> = ["host1", "host2", "host3"]
        .into_iter()
        .filter(|h| {
            before
                .iter()
                .any(|s| s.starts_with(&format!("{h}|")) && !s.ends_with("succeeded"))
        })
        .collect();
    assert!(
        waiting.len() >= 2,
        "hosts not yet switched when the page began to watch: {before:?}"
    );
    let done_while_watched: Vec<&str> = waiting
        .into_iter()
        .filter(|h| {
            seen.iter()
                .any(|s| s.starts_with(&format!("{h}|")) && s.ends_with("succeeded"))
        })
        .collect();
    assert!(
        done_while_watched.len() >= 2,
        "hosts finished while the page watched: {seen:?}"
    );
    for h in &done_while_watched {
        let steps: std::collections::BTreeSet<&str> = seen
            .iter()
            .filter(|s| s.starts_with(&format!("{h}|")))
            .map(|s| s.split('|').nth(1).unwrap())
            .filter(|s| !s.is_empty())
            .collect();
        assert!(steps.len() >= 2, "{h}'s steps arrived one by one: {seen:?}");
    }
    let hosts = browser.text("#hosts")?;
    assert_eq!(hosts.matches("✓ succeeded").count(), 3, "{hosts}");
    assert!(browser.text("#state")?.contains("succeeded"));
    assert!(
        !browser.source()?.contains("/confirm/"),
        "no action is offered once it ended"
    );
    assert!(wait_line(&events, "\"done\"", &mut vec![])?.contains("\"succeeded\":true"));
    let shots = screenshots();
    browser.screenshot(&shots.join("rollout.png"))?;

    // The fleet matrix shows the new release.
    browser.goto(&ui.url("/"))?;
    let matrix = browser.text("#matrix")?;
    assert!(matrix.contains("2.0.0 ×3"), "{matrix}");
    assert!(matrix.contains("succeeded"), "{matrix}");
    browser.screenshot(&shots.join("fleet.png"))?;
    browser.goto(&ui.url("/hosts"))?;
    assert!(browser.text("#count")?.contains("Hosts 1–3 of 3"));
    browser.screenshot(&shots.join("hosts.png"))?;
    browser.goto(&ui.url("/history?app=demo&state=succeeded"))?;
    let history = browser.text("main table")?;
    assert!(history.contains(&id), "{history}");
    browser.goto(&ui.url("/history?app=demo&state=paused"))?;
    assert!(browser.text("main")?.contains("No rollout matches."));
    browser.goto(&ui.url("/history?app=demo"))?;
    browser.screenshot(&shots.join("history.png"))?;
    browser.goto(&ui.url("/report?app=demo&days=7"))?;
    let deploys = browser.text("dl.figures dd")?;
    assert!(deploys.starts_with("2 "), "two deploys this week: {deploys}");
    browser.screenshot(&shots.join("report.png"))?;
    Ok(())
}
