//! Tenants (namespaces) and their quotas, against real coordinators.

use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_tests::{Fleet, RunChanges, authorized_client};
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// A run that waits for a worker no one starts, so that it stays in flight.
const IDLE: &str = "name: idle\nsteps:\n  - {id: wait, agent: nobody, action: wait}\n";

/// Creates a token through the CLI, as the fleet's admin, with `extra` arguments (such as
/// `--namespace team-a`); answers its value.
async fn token(
    fleet: &Fleet,
    name: &str,
    scopes: &[&str],
    extra: &[&str],
) -> anyhow::Result<String> {
    let mut args = vec!["tokens", "create", name, "--output", "json"];
    for scope in scopes {
        args.extend(["--scope", scope]);
    }
    args.extend(extra);
    let (status, out, err) = fleet.cli(&args).await?;
    assert!(status.success(), "{err}");
    let created: Value = serde_json::from_str(&out)?;
    Ok(created["token"].as_str().unwrap().to_string())
}

/// `(status, Retry-After, body)` of a request.
async fn answer(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Option<String>, Value)> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, retry_after, body))
}

async fn get(fleet: &Fleet, as_: &reqwest::Client, path: &str) -> anyhow::Result<(u16, Value)> {
    let (status, _, body) = answer(as_.get(format!("{}{path}", fleet.url()))).await?;
    Ok((status, body))
}

async fn post(
    fleet: &Fleet,
    as_: &reqwest::Client,
    path: &str,
    body: Value,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    answer(as_.post(format!("{}{path}", fleet.url())).json(&body)).await
}

fn listed_runs(body: &Value) -> Vec<Uuid> {
    body["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["workflowId"].as_str().unwrap().parse().unwrap())
        .collect()
}

async fn runs_of(fleet: &Fleet, namespace: &str) -> anyhow::Result<i64> {
    let db = fleet.db().await?;
    Ok(db
        .query_one(
            "SELECT count(*) FROM runs WHERE namespace = $1",
            &[&namespace],
        )
        .await?
        .get(0))
}

#[tokio::test]
async fn a_tenant_sees_and_touches_only_its_own_namespace() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let a = authorized_client(
        &token(
            &fleet,
            "team-a-admin",
            &["admin"],
            &["--namespace", "team-a"],
        )
        .await?,
    );
    let b = authorized_client(
        &token(
            &fleet,
            "team-b-admin",
            &["admin"],
            &["--namespace", "team-b"],
        )
        .await?,
    );

    // One definition name in two namespaces: each its own revision 1.
    for (client, action) in [(&a, "wait"), (&b, "other")] {
        let yaml =
            format!("name: build\nsteps:\n  - {{id: wait, agent: nobody, action: {action}}}\n");
        let (status, _, body) =
            post(&fleet, client, "/api/definitions", json!({"yaml": yaml})).await?;
        assert_eq!(
            (status, body["revision"].as_i64()),
            (201, Some(1)),
            "{body}"
        );
    }
    let (status, _, body) = post(
        &fleet,
        &a,
        "/api/workflows/execute",
        json!({"workflow": "build"}),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    let run: Uuid = body["workflowId"].as_str().unwrap().parse()?;
    let db = fleet.db().await?;
    let namespace: String = db
        .query_one("SELECT namespace FROM runs WHERE id = $1", &[&run])
        .await?
        .get(0);
    assert_eq!(namespace, "team-a");
    // The run is A's build, not B's.
    let (_, result) = get(&fleet, &a, &format!("/api/workflows/{run}")).await?;
    assert_eq!(result["steps"][0]["action"], "wait", "{result}");

    // To B, A's run does not exist: not found, never forbidden, and nothing happens to it.
    for path in ["", "/events", "/report"] {
        let (status, body) = get(&fleet, &b, &format!("/api/workflows/{run}{path}")).await?;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
    }
    for path in ["cancel", "pause"] {
        let (status, _, body) = post(
            &fleet,
            &b,
            &format!("/api/workflows/{run}/{path}"),
            json!({}),
        )
        .await?;
        assert_eq!(status, 404, "{path}: {body}");
    }
    assert_eq!(fleet.run(run).await?.status, "running");
    let (_, listed) = get(&fleet, &b, "/api/workflows").await?;
    assert!(!listed_runs(&listed).contains(&run), "{listed}");
    let (_, listed) = get(&fleet, &a, "/api/workflows").await?;
    assert_eq!(listed_runs(&listed), [run]);
    let (_, listed) = get(&fleet, &fleet.http(), "/api/workflows").await?;
    assert!(
        listed_runs(&listed).contains(&run),
        "an admin of all namespaces sees it"
    );
    let (_, definitions) = get(&fleet, &b, "/api/definitions").await?;
    assert_eq!(
        definitions["definitions"].as_array().unwrap().len(),
        1,
        "{definitions}"
    );
    let (_, detail) = get(&fleet, &b, "/api/definitions/build").await?;
    assert_eq!(
        detail["definition"]["steps"][0]["action"], "other",
        "{detail}"
    );

    // Naming another tenant's namespace is refused before anything is looked up.
    let (status, _, body) = answer(
        b.get(format!("{}/api/workflows", fleet.url()))
            .header("Flotilla-Namespace", "team-a"),
    )
    .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );

    // Schedules and tokens are a namespace's too; fleet-wide routes need all namespaces.
    let (status, _, body) = post(
        &fleet,
        &a,
        "/api/schedules",
        json!({"definition": "build", "cron": "0 0 1 1 *"}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(get(&fleet, &b, "/api/schedules/build").await?.0, 404);
    let (_, schedules) = get(&fleet, &b, "/api/schedules").await?;
    assert_eq!(schedules["schedules"], json!([]));
    let (_, tokens) = get(&fleet, &b, "/api/tokens").await?;
    let names: Vec<&str> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team-b-admin"]);
    let (status, _, body) = post(
        &fleet,
        &b,
        "/api/tokens",
        json!({"name": "sneaky", "scopes": ["read"], "namespaces": ["team-a"]}),
    )
    .await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(get(&fleet, &b, "/api/audit").await?.0, 403);

    // A sub-workflow resolves in its run's namespace: B has no `child`, A's child run is A's.
    let child = "name: child\nsteps:\n  - {id: wait, agent: nobody, action: wait}\n";
    let (status, _, _) = post(&fleet, &a, "/api/definitions", json!({"yaml": child})).await?;
    assert_eq!(status, 201);
    let parent = "name: parent\nsteps:\n  - {id: sub, workflow: child}\n";
    let (status, _, body) = post(
        &fleet,
        &b,
        "/api/workflows/execute",
        json!({"yaml": parent}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("child"),
        "{body}"
    );
    let (status, _, body) = post(
        &fleet,
        &a,
        "/api/workflows/execute",
        json!({"yaml": parent}),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    let parent_run: Uuid = body["workflowId"].as_str().unwrap().parse()?;
    let deadline = Instant::now() + WAIT;
    let child_namespace: String = loop {
        let row = db
            .query_opt(
                "SELECT namespace FROM runs WHERE parent_run_id = $1",
                &[&parent_run],
            )
            .await?;
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(Instant::now() < deadline, "no child run started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(child_namespace, "team-a");

    // A credential of two namespaces must say which one a submission is for.
    let (status, _, body) = post(
        &fleet,
        &fleet.http(),
        "/api/tokens",
        json!({"name": "both", "scopes": ["execute", "read"], "namespaces": ["team-a", "team-b"]}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let both_token = body["token"].as_str().unwrap().to_string();
    let both = authorized_client(&both_token);
    let (status, _, body) = post(
        &fleet,
        &both,
        "/api/workflows/execute",
        json!({"yaml": IDLE}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Flotilla-Namespace"),
        "{body}"
    );
    let (status, _, body) = post(
        &fleet,
        &both,
        "/api/workflows/execute",
        json!({"yaml": IDLE, "namespace": "team-b"}),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    let b_run: Uuid = body["workflowId"].as_str().unwrap().parse()?;
    // The CLI names it with --namespace (or FLOTILLA_NAMESPACE).
    let out = tokio::process::Command::new(flotilla_tests::binary("flotilla"))
        .args(["workflows", "list", "--output", "json"])
        .env("FLOTILLA_URL", fleet.url())
        .env("FLOTILLA_API_TOKEN", &both_token)
        .env("FLOTILLA_NAMESPACE", "team-a")
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    assert!(listed_runs(&listed).contains(&run), "{listed}");
    assert!(listed_runs(&listed).contains(&parent_run), "{listed}");
    // The parent's child run is team-a's too; team-b's run is not listed.
    assert_eq!(listed_runs(&listed).len(), 3, "{listed}");
    assert!(!listed_runs(&listed).contains(&b_run), "{listed}");

    // The owner may act on its run.
    let (status, _, body) = post(
        &fleet,
        &a,
        &format!("/api/workflows/{run}/cancel"),
        json!({}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    fleet.cleanup().await
}

#[tokio::test]
async fn a_tenant_s_event_stream_names_only_its_own_runs() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let a = authorized_client(
        &token(
            &fleet,
            "team-a-runner",
            &["read", "execute"],
            &["--namespace", "team-a"],
        )
        .await?,
    );
    let b = authorized_client(
        &token(
            &fleet,
            "team-b-runner",
            &["execute"],
            &["--namespace", "team-b"],
        )
        .await?,
    );
    let mut stream = RunChanges::open(&a, &format!("{}/api/events", fleet.url())).await?;
    assert_eq!(stream.next(WAIT).await?, Some(json!({})));

    // B's run commits first, then A's: A's stream names A's run and nothing of B's before it.
    let mut started = Vec::new();
    for client in [&b, &a] {
        let (status, _, body) = post(
            &fleet,
            client,
            "/api/workflows/execute",
            json!({"yaml": IDLE}),
        )
        .await?;
        assert_eq!(status, 202, "{body}");
        started.push(body["workflowId"].clone());
    }
    let [theirs, ours] = [&started[0], &started[1]];
    loop {
        let event = stream.next(WAIT).await?.context("the stream ended")?;
        let named = event["runs"].as_array().cloned().unwrap_or_default();
        assert!(
            !named.contains(theirs),
            "B's run {theirs} told to A: {event}"
        );
        if named.contains(ours) {
            break;
        }
    }
    fleet.stop().await
}

#[tokio::test]
async fn quotas_refuse_with_429_and_store_nothing() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env(
        "FLOTILLA_QUOTAS",
        "team-q:runs=2,steps=3;team-c:runs=3;team-r:rps=2",
    );
    fleet.start_coordinator().await?;
    let q = authorized_client(
        &token(
            &fleet,
            "q",
            &["execute", "read", "operate"],
            &["--namespace", "team-q"],
        )
        .await?,
    );

    // Runs in flight: the third is refused, naming the quota, with Retry-After; nothing stored.
    let mut started = Vec::new();
    for _ in 0..2 {
        let (status, _, body) =
            post(&fleet, &q, "/api/workflows/execute", json!({"yaml": IDLE})).await?;
        assert_eq!(status, 202, "{body}");
        started.push(body["workflowId"].as_str().unwrap().to_string());
    }
    let (status, retry_after, body) =
        post(&fleet, &q, "/api/workflows/execute", json!({"yaml": IDLE})).await?;
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert_eq!(body["error"]["details"]["quota"], "runsInFlight");
    assert_eq!(body["error"]["details"]["namespace"], "team-q");
    assert_eq!(runs_of(&fleet, "team-q").await?, 2);
    // Once one has ended, there is room again.
    let (status, _, _) = post(
        &fleet,
        &q,
        &format!("/api/workflows/{}/cancel", started[0]),
        json!({}),
    )
    .await?;
    assert_eq!(status, 200);
    let (status, _, body) =
        post(&fleet, &q, "/api/workflows/execute", json!({"yaml": IDLE})).await?;
    assert_eq!(status, 202, "{body}");

    // Steps per run, for_each instances included.
    let wide = "name: wide\nsteps:\n  - {id: a, agent: nobody, action: x}\n  - {id: b, agent: nobody, action: x}\n  - {id: c, agent: nobody, action: x}\n  - {id: d, agent: nobody, action: x}\n";
    let fan = "name: fan\nsteps:\n  - {id: each, agent: nobody, action: x, for_each: '${{ params.items }}'}\n";
    for (yaml, params) in [(wide, json!({})), (fan, json!({"items": [1, 2, 3]}))] {
        let (status, retry_after, body) = post(
            &fleet,
            &q,
            "/api/workflows/execute",
            json!({"yaml": yaml, "params": params}),
        )
        .await?;
        assert_eq!(
            (status, body["error"]["details"]["quota"].as_str()),
            (429, Some("stepsPerRun")),
            "{body}"
        );
        assert!(retry_after.is_some());
    }
    assert_eq!(runs_of(&fleet, "team-q").await?, 3);

    // Concurrent submissions, possibly in one batch, cannot go past the quota together.
    let c = authorized_client(&token(&fleet, "c", &["execute"], &["--namespace", "team-c"]).await?);
    let mut submissions = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = c
            .post(format!("{}/api/workflows/execute", fleet.url()))
            .json(&json!({"yaml": IDLE}));
        submissions.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    let mut statuses = Vec::new();
    while let Some(status) = submissions.join_next().await {
        statuses.push(status??);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 202, 202, 429, 429, 429, 429, 429, 429, 429]);
    assert_eq!(runs_of(&fleet, "team-c").await?, 3);

    // Requests per second: a burst past the bucket is refused; other namespaces are not held.
    let r = authorized_client(&token(&fleet, "r", &["read"], &["--namespace", "team-r"]).await?);
    let mut refused = None;
    for _ in 0..10 {
        let (status, retry_after, body) =
            answer(r.get(format!("{}/api/workflows", fleet.url()))).await?;
        if status == 429 {
            refused = Some((retry_after, body));
            break;
        }
        assert_eq!(status, 200);
    }
    let (retry_after, body) = refused.expect("a burst of 10 requests at 2 per second is refused");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        body["error"]["details"]["quota"], "requestsPerSecond",
        "{body}"
    );
    for _ in 0..10 {
        assert_eq!(get(&fleet, &q, "/api/workflows").await?.0, 200);
    }
    fleet.cleanup().await
}
