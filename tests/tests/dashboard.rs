//! The dashboard in a real browser: Debian's headless Chromium, driven through chromedriver's
//! WebDriver API (plain HTTP and JSON, so no client library), against a fleet running a real
//! workflow. The run appears in the list and its steps change state on the page as the workflow
//! moves, with no reload; the Cancel button cancels it. Screenshots are kept under
//! `target/dashboard/`. The event stream the page reads is also checked on its own: every
//! coordinator streams the changes that any of them commits.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` packages
//! (`deploy/chromium.sh` installs them; the test command runs it). Without them the test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use flotilla_tests::workload::{eventually, poll_until};
use flotilla_tests::{Fleet, Launch, RunChanges, target_dir};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(30);

/// The key under which WebDriver answers an element's reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium and the chromedriver that drives it; both stop when it is dropped.
struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    _driver: Child,
}

impl Browser {
    async fn start() -> anyhow::Result<Self> {
        for program in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(program).exists() {
                bail!(
                    "{program} is missing: install Debian's chromium and chromium-driver \
                     (deploy/chromium.sh does)"
                );
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        poll_until(WAIT, "chromedriver ready", || {
            let status = http.get(format!("{base}/status")).send();
            async move {
                let body: Value = status.await?.json().await?;
                Ok(body["value"]["ready"] == true)
            }
        })
        .await?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-background-networking",
                    "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                ],
            },
        }}});
        let created = command(
            &http,
            reqwest::Method::POST,
            &format!("{base}/session"),
            capabilities,
        )
        .await
        .context("starting Chromium")?;
        let id = created["sessionId"]
            .as_str()
            .context("a session id in chromedriver's answer")?;
        Ok(Self {
            session: format!("{base}/session/{id}"),
            http,
            _driver: driver,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        command(
            &self.http,
            reqwest::Method::POST,
            &format!("{}{path}", self.session),
            body,
        )
        .await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        command(
            &self.http,
            reqwest::Method::GET,
            &format!("{}{path}", self.session),
            Value::Null,
        )
        .await
    }

    async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({"url": url})).await.map(drop)
    }

    /// The elements matching a CSS selector now.
    async fn all(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let found = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
            .collect())
    }

    /// The first element matching a CSS selector, once there is one.
    async fn wait_for(&self, css: &str) -> anyhow::Result<String> {
        eventually(WAIT, &format!("an element `{css}` on the page"), || async {
            Ok(self.all(css).await?.into_iter().next())
        })
        .await
    }

    async fn click(&self, element: &str) -> anyhow::Result<()> {
        self.post(&format!("/element/{element}/click"), json!({}))
            .await
            .map(drop)
    }

    async fn type_into(&self, element: &str, text: &str) -> anyhow::Result<()> {
        self.post(&format!("/element/{element}/value"), json!({"text": text}))
            .await
            .map(drop)
    }

    async fn script(&self, script: &str) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Accepts the confirmation dialog that is open, once it is.
    async fn accept_dialog(&self) -> anyhow::Result<()> {
        eventually(WAIT, "a confirmation dialog", || async {
            Ok(self.post("/alert/accept", json!({})).await.ok())
        })
        .await
        .map(drop)
    }

    /// Closes Chromium (chromedriver itself stops when dropped).
    async fn quit(&self) {
        let _ = command(
            &self.http,
            reqwest::Method::DELETE,
            &self.session,
            Value::Null,
        )
        .await;
    }

    async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let png = self.get("/screenshot").await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().context("a screenshot in base64")?)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

/// One WebDriver command: its answer's `value`, or its error.
async fn command(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let mut request = http.request(method, url).timeout(WAIT);
    if !body.is_null() {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", answer["value"]);
    }
    Ok(answer["value"].clone())
}

/// Where the screenshots go: kept after the test, for a person to look at.
fn artifacts() -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("dashboard");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `gate` waits for a worker of an agent that has none yet, so the page is looked at while the
/// run is known to be in that state; `hold` then runs long enough to be cancelled.
const WORKFLOW: &str = "\
name: dashboard-watch
steps:
  - {id: gate, agent: dash-late, action: open}
  - {id: hold, agent: dash-late, action: wait, params: {sleep_ms: 120000}}
  - {id: after, agent: dash-late, action: close}
";

#[tokio::test]
async fn a_run_is_watched_live_in_chromium_and_cancelled_from_its_button() -> anyhow::Result<()> {
    let artifacts = artifacts()?;
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let browser = Browser::start().await?;
    let watched = watch_and_cancel(&mut fleet, &browser, &artifacts).await;
    if watched.is_err() {
        // What the page showed when the test gave up.
        let _ = browser.screenshot(&artifacts.join("failure.png")).await;
    }
    browser.quit().await;
    watched?;
    fleet.stop().await
}

async fn watch_and_cancel(
    fleet: &mut Fleet,
    browser: &Browser,
    artifacts: &Path,
) -> anyhow::Result<()> {
    browser.goto(&format!("{}/dashboard", fleet.url())).await?;
    let token = browser.wait_for("#token").await?;
    browser.type_into(&token, fleet.admin_token()).await?;
    let sign_in = browser.wait_for("#sign-in button[type=submit]").await?;
    browser.click(&sign_in).await?;
    browser.wait_for("table.runs").await?;
    browser.wait_for("#live:not(.off)").await?;
    // A reload of the page would forget this: what changes below changes live.
    browser.script("window.notReloaded = true;").await?;

    let id = fleet.execute_yaml(WORKFLOW, json!({})).await?;
    let row = browser
        .wait_for(&format!("tr[data-run='{id}'] a"))
        .await
        .context("the new run listed without a reload")?;
    browser.click(&row).await?;

    // The graph: three steps in a pipeline, the first dispatched and waiting for a worker.
    browser
        .wait_for("g.node[data-step='gate'][data-status='running']")
        .await?;
    browser
        .wait_for("g.node[data-step='hold'][data-status='pending']")
        .await?;
    assert_eq!(browser.all("g.node").await?.len(), 3);
    assert_eq!(browser.all("path.edge").await?.len(), 2);

    // A worker comes: the page follows the run as it moves, on its own.
    fleet.start_echo("dash-worker", &["dash-late"], 2)?;
    browser
        .wait_for("g.node[data-step='gate'][data-status='success']")
        .await
        .context("the first step shown succeeded, live")?;
    browser
        .wait_for("g.node[data-step='hold'][data-status='running']")
        .await
        .context("the second step shown running, live")?;
    assert_eq!(
        browser
            .script("return window.notReloaded === true;")
            .await?,
        true,
        "the page was reloaded"
    );
    let selected = browser.wait_for("g.node[data-step='gate']").await?;
    browser.click(&selected).await?;
    browser
        .wait_for("#step-detail tbody tr td.num")
        .await
        .context("the step's attempts shown")?;
    browser.screenshot(&artifacts.join("run-live.png")).await?;

    let cancel = browser.wait_for("#cancel:not([disabled])").await?;
    browser.click(&cancel).await?;
    browser.accept_dialog().await?;
    poll_until(WAIT, "the run cancelled, as the API tells", || async {
        Ok(fleet.run(id).await?.status == "cancelled")
    })
    .await?;
    browser
        .wait_for("#run-status[data-status='cancelled']")
        .await?;
    browser
        .wait_for("g.node[data-step='hold'][data-status='cancelled']")
        .await?;
    assert!(
        browser.all("#cancel[disabled]").await?.len() == 1,
        "Cancel is disabled once the run has ended"
    );
    browser
        .screenshot(&artifacts.join("run-cancelled.png"))
        .await?;

    browser
        .goto(&format!("{}/dashboard#/agents", fleet.url()))
        .await?;
    browser.wait_for("tr[data-agent='dash-late']").await?;
    browser
        .goto(&format!("{}/dashboard#/metrics", fleet.url()))
        .await?;
    browser
        .wait_for("tr[data-agent='dash-late']")
        .await
        .context("the agent's figures on the metrics page")?;
    browser.wait_for(".chart svg rect.bar").await?;
    browser.screenshot(&artifacts.join("metrics.png")).await?;

    // What the charts are drawn from.
    let figures: Value = fleet
        .http()
        .get(format!(
            "{}/api/agents/dash-late/metrics?range=15m",
            fleet.url()
        ))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(figures["executions"].as_u64() >= Some(1), "{figures}");
    assert_eq!(figures["series"].as_array().map(Vec::len), Some(30));
    Ok(())
}

#[tokio::test]
async fn every_coordinator_streams_the_changes_any_of_them_commits() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let second = fleet.add_coordinator(Launch::once()).await?;
    fleet.start_echo("events-worker", &["events"], 2)?;
    let url = format!("{}/api/events", fleet.coordinator_url(second));

    let refused = reqwest::get(&url).await?;
    assert_eq!(refused.status(), 401, "the stream needs a credential");
    let mut stream = RunChanges::open(&fleet.http(), &url).await?;
    assert_eq!(
        stream.next(WAIT).await?,
        Some(json!({})),
        "the stream starts by naming no run: read everything"
    );

    // Submitted to and run by the first coordinator; streamed by the second.
    let id = fleet
        .execute_yaml_on(
            0,
            "name: elsewhere\nsteps:\n  - {id: one, agent: events, action: go}\n  - {id: two, agent: events, action: go}\n",
            json!({}),
        )
        .await?;
    let mut named = 0;
    while named < 2 {
        let event = stream.next(WAIT).await?.context("the stream ended early")?;
        if event["runs"]
            .as_array()
            .is_some_and(|runs| runs.contains(&json!(id.to_string())))
        {
            named += 1;
        }
    }
    fleet.wait_for_end(id, WAIT).await?;

    // A coordinator shutting down ends its streams instead of waiting for their readers.
    let stopped = fleet.coordinator(second).terminate();
    // Each read waits at most WAIT: the stream must end, not merely fall quiet.
    while stream.next(WAIT).await?.is_some() {}
    let status = tokio::time::timeout(WAIT, stopped)
        .await?
        .context("the coordinator's exit")?;
    assert!(status.success(), "{status:?}");
    fleet.stop().await
}
