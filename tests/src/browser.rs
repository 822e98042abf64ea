//! A real browser for the dashboard's tests: Debian's Chromium, headless,
//! driven through its ChromeDriver over WebDriver (fantoccini). Both are
//! stopped when the `Browser` is dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};

use crate::testbed::http_get;

pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Result<Browser> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("chromedriver (Debian's chromium-driver; scripts/testbed-setup installs it)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(addr, "/status"), Some((200, _))) {
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir()?;
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"binary": "/usr/bin/chromium", "args": args}),
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://{addr}")),
            )
            .context("a WebDriver session in Chromium")?;
        Ok(Browser {
            rt,
            client,
            driver,
            _profile: profile,
        })
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        Ok(self.rt.block_on(self.client.goto(url))?)
    }

    pub fn url(&self) -> Result<String> {
        Ok(self.rt.block_on(self.client.current_url())?.to_string())
    }

    /// The text of the first element `css` selects.
    pub fn text(&self, css: &str) -> Result<String> {
        self.rt.block_on(async {
            let el = self.client.find(Locator::Css(css)).await?;
            Ok(el.text().await?)
        })
    }

    /// The page's HTML as it is now.
    pub fn source(&self) -> Result<String> {
        Ok(self.rt.block_on(self.client.source())?)
    }

    /// Waits until the text of `css` contains `what`; returns it.
    pub fn wait_text(&self, css: &str, what: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.text(css).unwrap_or_default();
            if now.contains(what) {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!("{css} did not come to contain {what:?} within {within:?}; it reads {now:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the page's address is `url` (a click's navigation).
    pub fn wait_url(&self, url: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.url()?;
            if now == url {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the page is at {now}, not {url}, after {within:?}; it reads: {}",
                    self.text("main").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, css: &str) -> Result<()> {
        self.rt.block_on(async {
            self.client.find(Locator::Css(css)).await?.click().await?;
            Ok(())
        })
    }

    /// Runs `js` in the page; returns what it returns.
    pub fn script(&self, js: &str) -> Result<serde_json::Value> {
        Ok(self.rt.block_on(self.client.execute(js, vec![]))?)
    }

    /// A cookie of the page's site, `name=value`, HttpOnly ones too (the
    /// browser's automation can read what the page's scripts cannot).
    pub fn cookie(&self, name: &str) -> Result<String> {
        let c = self.rt.block_on(self.client.get_named_cookie(name))?;
        Ok(format!("{}={}", c.name(), c.value()))
    }

    pub fn screenshot(&self, to: &Path) -> Result<()> {
        let png = self.rt.block_on(self.client.screenshot())?;
        std::fs::write(to, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.client.clone().close());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
