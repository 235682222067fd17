//! Authentication, scopes, the audit log and request limits, against real coordinators.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flotilla_tests::{Fleet, repo_file};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use uuid::Uuid;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "flotilla-tests";
const SECRET: &str = "the coordinator's HS256 secret, 32 bytes or more";
/// Keys made for the tests only.
const RSA_PRIVATE: &str = "crates/api/src/auth/testdata/rsa-private.pem";
const RSA_PUBLIC: &str = "crates/api/src/auth/testdata/rsa-public.pem";
const OTHER_RSA_PRIVATE: &str = "crates/api/src/auth/testdata/other-rsa-private.pem";
/// The request body limit the coordinators here are given.
const BODY_LIMIT: usize = 64 * 1024;
const WAIT: Duration = Duration::from_secs(30);

/// An HTTP client that sends no credential unless told.
fn bare() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn claims(scope: &str, exp_from_now: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": "release-bot", "iss": ISSUER, "aud": AUDIENCE, "exp": now + exp_from_now, "scope": scope})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> anyhow::Result<String> {
    Ok(encode(&Header::new(alg), claims, key)?)
}

fn pem(path: &str) -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(repo_file(path))?)
}

/// `(status, body)` of `GET /api/workflows` with `credential`.
async fn list_with(fleet: &Fleet, credential: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let mut request = bare().get(format!("{}/api/workflows", fleet.url()));
    if let Some(credential) = credential {
        request = request.bearer_auth(credential);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status == 401 {
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="flotilla""#)
        );
    }
    Ok((status, response.json().await?))
}

/// Runs the CLI with `credential` instead of the fleet's admin token.
async fn cli_as(
    fleet: &Fleet,
    credential: &str,
    args: &[&str],
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let out = tokio::process::Command::new(flotilla_tests::binary("flotilla"))
        .args(args)
        .env("FLOTILLA_URL", fleet.url())
        .env("FLOTILLA_API_TOKEN", credential)
        .output()
        .await?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Creates a token through the CLI (as the fleet's admin); answers its id and value.
async fn create_token(
    fleet: &Fleet,
    name: &str,
    scopes: &[&str],
) -> anyhow::Result<(Uuid, String)> {
    let mut args = vec!["tokens", "create", name, "--output", "json"];
    for scope in scopes {
        args.extend(["--scope", scope]);
    }
    let (status, out, err) = fleet.cli(&args).await?;
    assert!(status.success(), "{err}");
    let created: Value = serde_json::from_str(&out)?;
    Ok((
        created["id"].as_str().unwrap().parse()?,
        created["token"].as_str().unwrap().to_string(),
    ))
}

#[tokio::test]
async fn credentials_scopes_audit_and_limits_hold_on_a_real_coordinator() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("security-logs")
        .join(&fleet.prefix);
    let mut fleet = fleet
        .coordinator_env("FLOTILLA_JWT_HS256_SECRET", SECRET)
        .coordinator_env(
            "FLOTILLA_JWT_RS256_KEYS",
            &repo_file(RSA_PUBLIC).display().to_string(),
        )
        .coordinator_env("FLOTILLA_JWT_ISSUER", ISSUER)
        .coordinator_env("FLOTILLA_JWT_AUDIENCE", AUDIENCE)
        .coordinator_env("FLOTILLA_MAX_BODY_BYTES", &BODY_LIMIT.to_string())
        .coordinator_env("RUST_LOG", "debug")
        .log_to(&logs)?;
    fleet.start_coordinator().await?;

    // Without a valid credential: 401, whatever is wrong with it.
    let rsa_private = EncodingKey::from_rsa_pem(&pem(RSA_PRIVATE)?)?;
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("admin", 600))?)
    );
    let refused = [
        ("no token", None),
        ("garbage", Some("garbage".to_string())),
        (
            "an unknown API token",
            Some(format!("flt_{}", "ab".repeat(32))),
        ),
        (
            "a JWT signed with another key",
            Some(sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&pem(OTHER_RSA_PRIVATE)?)?,
                &claims("admin", 600),
            )?),
        ),
        (
            "an expired JWT",
            Some(sign(
                Algorithm::RS256,
                &rsa_private,
                &claims("admin", -3600),
            )?),
        ),
        ("alg: none", Some(none)),
        (
            "HS256 signed with the RS256 public key",
            Some(sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&pem(RSA_PUBLIC)?)?,
                &claims("admin", 600),
            )?),
        ),
    ];
    for (what, credential) in &refused {
        let (status, body) = list_with(&fleet, credential.as_deref()).await?;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
    }
    let jwt = sign(Algorithm::RS256, &rsa_private, &claims("read", 600))?;
    assert_eq!(list_with(&fleet, Some(&jwt)).await?.0, 200);
    let hs = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes())?,
        &claims("read", 600),
    )?;
    assert_eq!(list_with(&fleet, Some(&hs)).await?.0, 200);

    // A read token reads but may not execute; an operator token executes and cancels.
    let (reader_id, reader) = create_token(&fleet, "dashboard", &["read"]).await?;
    let (_, operator) = create_token(&fleet, "oncall", &["read", "execute", "operate"]).await?;
    assert_eq!(list_with(&fleet, Some(&reader)).await?.0, 200);
    let idle = "name: idle\nsteps:\n  - {id: wait, agent: nobody, action: wait}\n";
    let response = bare()
        .post(format!("{}/api/workflows/execute", fleet.url()))
        .bearer_auth(&reader)
        .json(&json!({"yaml": idle}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "forbidden");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("execute"),
        "{body}"
    );
    let response = bare()
        .post(format!("{}/api/workflows/execute", fleet.url()))
        .bearer_auth(&operator)
        .json(&json!({"yaml": idle}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 202);
    let run: Uuid = response.json::<Value>().await?["workflowId"]
        .as_str()
        .unwrap()
        .parse()?;
    let (status, _, err) = cli_as(
        &fleet,
        &operator,
        &["workflows", "cancel", &run.to_string()],
    )
    .await?;
    assert!(status.success(), "{err}");
    // The run's history names the token, and the user the CLI says it acts for.
    let events: Value = fleet
        .http()
        .get(format!("{}/api/workflows/{run}/events", fleet.url()))
        .send()
        .await?
        .json()
        .await?;
    let actor = events["events"][0]["actor"].as_str().unwrap();
    assert!(actor.starts_with("oncall as "), "{actor}");
    // An operator is no admin.
    let (status, _, err) = cli_as(&fleet, &operator, &["tokens", "list"]).await?;
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("admin"), "{err}");

    // A revoked token is refused from then on.
    let (status, out, err) = fleet
        .cli(&["tokens", "revoke", &reader_id.to_string()])
        .await?;
    assert!(status.success(), "{err}");
    assert!(out.contains("dashboard"), "{out}");
    assert_eq!(list_with(&fleet, Some(&reader)).await?.0, 401);
    let (_, out, _) = fleet.cli(&["tokens", "list", "--output", "json"]).await?;
    assert!(!out.contains(&reader) && !out.contains(&operator), "{out}");
    let listed: Value = serde_json::from_str(&out)?;
    let revoked = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "dashboard")
        .unwrap();
    assert!(revoked["revokedAt"].is_string(), "{revoked}");

    // A body over the limit is refused, naming the limit, and starts nothing.
    let db = fleet.db().await?;
    let runs_before: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    let padding = "#".repeat(BODY_LIMIT + 1);
    let response = fleet
        .http()
        .post(format!("{}/api/workflows/execute", fleet.url()))
        .json(&json!({"yaml": format!("{idle}{padding}\n")}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&BODY_LIMIT.to_string()),
        "{body}"
    );
    let runs_after: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs_after, runs_before);

    // The audit log has the execute and the cancel, by the token's name, with their targets.
    let (status, out, err) = fleet
        .cli(&["audit", "--actor", "oncall", "--output", "json"])
        .await?;
    assert!(status.success(), "{err}");
    let audit: Value = serde_json::from_str(&out)?;
    let entries: Vec<(String, String, u64)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let target = e["target"]["workflowId"]
                .as_str()
                .or(e["target"]["id"].as_str())
                .unwrap_or_default()
                .to_string();
            (
                e["action"].as_str().unwrap().to_string(),
                target,
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let run = run.to_string();
    assert_eq!(
        entries,
        [
            (
                "POST /api/workflows/{id}/cancel".to_string(),
                run.clone(),
                200
            ),
            ("POST /api/workflows/execute".to_string(), run, 202),
        ]
    );
    let first = &audit["entries"][1];
    assert_eq!(
        (first["credential"].as_str(), first["peer"].as_str()),
        (Some("token"), Some("127.0.0.1"))
    );
    // Refusals of a valid credential are audited too; reads are not.
    let (_, out, _) = fleet
        .cli(&["audit", "--actor", "dashboard", "--output", "json"])
        .await?;
    let audit: Value = serde_json::from_str(&out)?;
    let statuses: Vec<u64> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [403]);

    // No credential reached the logs, even at debug.
    fleet.shutdown().await;
    let mut secrets = vec![fleet.admin_token().to_string(), reader, operator, jwt, hs];
    secrets.extend(refused.into_iter().filter_map(|(_, c)| c));
    for secret in &secrets {
        // A JWT's signature is what makes it usable; a token without one is checked whole.
        let signature = secret
            .rsplit('.')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or(secret);
        assert_eq!(
            fleet.count_in_logs("coordinator", signature),
            0,
            "a credential is in the logs in {}",
            logs.display()
        );
    }
    fleet.cleanup().await
}

/// The admin token a coordinator printed on stderr, from its log.
fn printed_tokens(fleet: &Fleet) -> Vec<String> {
    let Some(dir) = fleet.log_dir() else {
        return Vec::new();
    };
    let text = std::fs::read_to_string(dir.join("coordinator-0.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("FLOTILLA ADMIN TOKEN (shown once)"))
        .filter_map(|(i, _)| lines.get(i + 1).map(|t| t.trim().to_string()))
        .collect()
}

#[tokio::test]
async fn a_first_start_prints_an_admin_token_once_and_it_works() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("security-logs")
        .join(&fleet.prefix);
    let mut fleet = fleet
        // No credential configured.
        .coordinator_env("FLOTILLA_ADMIN_TOKEN", "")
        .log_to(&logs)?;
    fleet.start_coordinator().await?;
    let deadline = Instant::now() + WAIT;
    let printed = loop {
        let printed = printed_tokens(&fleet);
        if !printed.is_empty() || Instant::now() > deadline {
            break printed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(printed.len(), 1, "{printed:?}");
    let token = &printed[0];
    assert!(token.starts_with("flt_") && token.len() == 68, "{token}");
    assert_eq!(list_with(&fleet, Some(token)).await?.0, 200);
    assert_eq!(list_with(&fleet, Some(fleet.admin_token())).await?.0, 401);

    // A restart, and a second coordinator, find an admin token and print none.
    fleet.shutdown().await;
    let index = fleet
        .add_coordinator(flotilla_tests::Launch::once())
        .await?;
    fleet
        .add_coordinator(flotilla_tests::Launch::once())
        .await?;
    assert_eq!(
        fleet.count_in_logs("coordinator", "FLOTILLA ADMIN TOKEN (shown once)"),
        1
    );
    let url = fleet.coordinator_url(index);
    let response = bare()
        .get(format!("{url}/api/workflows"))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    let db = fleet.db().await?;
    let admins: i64 = db
        .query_one(
            "SELECT count(*) FROM api_tokens WHERE 'admin' = ANY (scopes)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(admins, 1);
    fleet.stop().await
}

#[tokio::test]
async fn an_admin_token_from_the_environment_is_seeded_once_by_every_coordinator()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet
        .add_coordinator(flotilla_tests::Launch::once())
        .await?;
    for i in 0..2 {
        let response = bare()
            .get(format!("{}/api/workflows", fleet.coordinator_url(i)))
            .bearer_auth(fleet.admin_token())
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
    }
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT name, scopes, revoked_at IS NULL FROM api_tokens",
            &[],
        )
        .await?;
    let tokens: Vec<(String, Vec<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        tokens,
        [("admin".to_string(), vec!["admin".to_string()], true)]
    );
    // Only the hash is stored.
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM api_tokens WHERE position(convert_to($1, 'UTF8') in hash) > 0",
            &[&fleet.admin_token()],
        )
        .await?
        .get(0);
    assert_eq!(stored, 0);
    // The audit log cannot be rewritten.
    let err = db
        .batch_execute("DELETE FROM audit_log")
        .await
        .expect_err("the audit log refuses deletes");
    assert!(
        err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"),
        "{err:?}"
    );
    fleet.stop().await
}

#[tokio::test]
async fn insecure_no_auth_refuses_a_public_address_and_serves_anyone_on_loopback()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_INSECURE_NO_AUTH", "true");
    let refused = fleet
        .coordinator_command()
        .env("FLOTILLA_BIND", "0.0.0.0")
        .output()
        .await?;
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("loopback") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );

    fleet.start_coordinator().await?;
    let (status, _) = list_with(&fleet, None).await?;
    assert_eq!(status, 200);
    fleet.stop().await
}

/// A step output over `FLOTILLA_MAX_OUTPUT_BYTES`, or one holding a NUL character (which
/// Postgres cannot store), fails its attempt with a message that says so; the retry policy
/// applies, and the coordinator goes on recording other results meanwhile.
#[tokio::test]
async fn an_output_over_the_limit_or_holding_a_nul_fails_its_step_not_the_fleet()
-> anyhow::Result<()> {
    const LIMIT: usize = 1024;
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_MAX_OUTPUT_BYTES", &LIMIT.to_string());
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["talker"], 4)?;
    // The echo agent answers with its `output` param; a CEL escape renders a NUL that the
    // definition's text does not hold.
    let step = |output: &str| {
        format!(
            "name: outputs\nerror_handling:\n  retry: {{max_attempts: 2, delay: 50ms}}\nsteps:\n  - {{id: say, agent: talker, action: say, params: {{output: {output}}}}}\n"
        )
    };
    let big = fleet
        .execute_yaml(
            &step(r#""${{ params.big }}""#),
            json!({"big": "x".repeat(2 * LIMIT)}),
        )
        .await?;
    let nul = fleet
        .execute_yaml(&step(r#"'${{ "a\x00b" }}'"#), json!({}))
        .await?;
    let fine = fleet.execute_yaml(&step("small"), json!({})).await?;

    let too_big = format!(
        "the step's output is {} bytes, over the limit of {LIMIT} bytes (FLOTILLA_MAX_OUTPUT_BYTES)",
        2 * LIMIT + 2
    );
    let holds_nul = "the step's output holds a NUL character (\\u0000), which cannot be stored";
    for (id, error) in [(big, too_big.as_str()), (nul, holds_nul)] {
        let run = fleet.wait_for_end(id, WAIT).await?;
        assert_eq!(run.status, "failure");
        let say = flotilla_tests::step(&run, "say");
        assert_eq!((say.status.as_str(), say.attempts), ("failure", 2));
        assert_eq!(say.error.as_deref(), Some(error));
    }
    // The engine is not wedged: the run beside them succeeds.
    let run = fleet.wait_for_end(fine, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(
        flotilla_tests::step(&run, "say").output,
        Some(json!("small"))
    );
    fleet.stop().await
}

/// A condition or template past the expression bounds is refused at submission, naming the
/// bound, with nothing stored; a template whose value grows past the rendered-params limit
/// fails its step, naming the limit.
#[tokio::test]
async fn expression_bounds_hold_at_submission_and_at_render() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["calc"], 2)?;
    let db = fleet.db().await?;
    let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
    let refused = [
        (
            format!("name: deep\nsteps:\n  - {{id: a, agent: calc, action: x}}\n  - {{id: b, agent: calc, action: x, depends_on: [a], condition: '{deep}'}}\n"),
            "condition nests brackets more than 32 deep",
        ),
        (
            "name: square\nsteps:\n  - {id: a, agent: calc, action: x, params: {v: '${{ params.l.map(x, params.l.map(y, y)) }}'}}\n".to_string(),
            "nests a comprehension",
        ),
        (
            format!("name: long\nsteps:\n  - {{id: a, agent: calc, action: x, params: {{v: '${{{{ {} }}}}'}}}}\n", "1 + ".repeat(1100) + "1"),
            "at most 4096 are allowed",
        ),
    ];
    for (yaml, fault) in refused {
        let response = fleet
            .http()
            .post(format!("{}/api/workflows/execute", fleet.url()))
            .json(&json!({"yaml": yaml}))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await?;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fault), "{fault}: {body}");
    }
    for table in ["runs", "definitions"] {
        let stored: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .get(0);
        assert_eq!(stored, 0, "{table}");
    }

    // Each item a copy of the whole list: 2,000 × 2,000 numbers, over the 1 MiB of params.
    let list: Vec<u32> = (0..2000).collect();
    let id = fleet
        .execute_yaml(
            "name: square\nsteps:\n  - {id: a, agent: calc, action: x, params: {v: '${{ params.l.map(x, params.l) }}'}}\n",
            json!({"l": list}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    let a = flotilla_tests::step(&run, "a");
    assert_eq!(a.status, "failure");
    assert_eq!(
        a.error.as_deref(),
        Some(
            "params: template `params.l.map(x, params.l)` gives a value over 1048576 bytes, the most rendered params may take"
        )
    );
    fleet.stop().await
}

/// `${{ secrets.NAME }}` in step params is resolved by the worker, from its environment or its
/// secrets directory: the handler gets the value, while Postgres and RabbitMQ hold only the
/// reference, and the output, the logs and the captured process logs show `***` or nothing.
#[tokio::test]
async fn secrets_reach_the_handler_and_nothing_else() -> anyhow::Result<()> {
    let token = format!("tok-{}", Uuid::new_v4().simple());
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("security-logs")
        .join(&fleet.prefix);
    let secrets_dir = logs.join("secrets");
    std::fs::create_dir_all(&secrets_dir)?;
    std::fs::write(secrets_dir.join("DB_PASSWORD"), format!("{password}\n"))?;
    let mut fleet = fleet.coordinator_env("RUST_LOG", "debug").log_to(&logs)?;
    fleet.start_coordinator().await?;

    let yaml = "name: secretive\nsteps:\n  - {id: call, agent: vault, action: use, params: {token: '${{ secrets.API_TOKEN }}', header: 'Bearer ${{ secrets.API_TOKEN }} for ${{ params.who }}', db: '${{secrets.DB_PASSWORD}}'}}\n  - {id: absent, agent: vault, action: use, depends_on: [], params: {k: '${{ secrets.NOT_SET }}'}}\n";
    let id = fleet.execute_yaml(yaml, json!({"who": "ci"})).await?;

    // Before any worker takes them, the tasks in RabbitMQ carry the references.
    let connection = fleet.broker().await?;
    let mut consumer = fleet.consume_tasks(&connection, "vault", 10).await?;
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await?
            .expect("a task");
        bodies.push(String::from_utf8(delivery.body.clone())?);
    }
    consumer.into_consumer()?.close().await?;
    connection.close().await?;
    let call = bodies.iter().find(|b| b.contains("Bearer")).unwrap();
    assert!(
        call.contains("Bearer ${{ secrets.API_TOKEN }} for ci"),
        "{call}"
    );
    for body in &bodies {
        assert!(
            !body.contains(&token) && !body.contains(&password),
            "{body}"
        );
    }

    let worker = flotilla_tests::Launch::once()
        .env("FLOTILLA_SECRET_API_TOKEN", &token)
        .env("FLOTILLA_SECRETS_DIR", &secrets_dir.display().to_string())
        .env("RUST_LOG", "debug");
    fleet.start_worker("echo-vault", &["vault"], 2, worker)?;
    let run = fleet.wait_for_end(id, WAIT).await?;

    // The echo agent answers with its params: the values it was given, hidden on the way back.
    let call = flotilla_tests::step(&run, "call");
    assert_eq!(call.status, "success");
    assert_eq!(
        call.output,
        Some(json!({"who": "ci", "token": "***", "header": "Bearer *** for ci", "db": "***"}))
    );
    let absent = flotilla_tests::step(&run, "absent");
    assert_eq!((absent.status.as_str(), absent.attempts), ("failure", 1));
    assert!(
        absent.error.as_deref().unwrap_or_default().starts_with(
            "secret `NOT_SET` is not set on this worker (FLOTILLA_SECRET_NOT_SET, nor "
        ),
        "{absent:?}"
    );

    // No row of any table holds a value, as text or as the hex of bytea.
    let db = fleet.db().await?;
    let tables: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.contains(&"attempts".to_string()), "{tables:?}");
    for table in &tables {
        for secret in [&token, &password] {
            let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
            let found: i64 = db
                .query_one(
                    &format!("SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0 OR strpos(t::text, $2) > 0"),
                    &[secret, &hex],
                )
                .await?
                .get(0);
            assert_eq!(found, 0, "{table} holds a secret");
        }
    }
    fleet.shutdown().await;
    for process in ["coordinator", "echo-vault"] {
        for secret in [&token, &password] {
            assert_eq!(fleet.count_in_logs(process, secret), 0, "{process}");
        }
    }
    assert!(fleet.count_in_logs("echo-vault", "task succeeded") > 0);
    fleet.cleanup().await
}

/// With FLOTILLA_TLS_CERT and FLOTILLA_TLS_KEY the API speaks only TLS: a client that trusts
/// the certificate's issuer gets through, one that does not (or speaks plain HTTP) does not.
#[tokio::test]
async fn the_api_serves_tls_to_a_verifying_client_only() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let dir = flotilla_tests::target_dir()
        .join("security-tls")
        .join(&fleet.prefix);
    std::fs::create_dir_all(&dir)?;
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, issued.cert.pem())?;
    std::fs::write(&key, issued.signing_key.serialize_pem())?;
    let mut coordinator = fleet
        .coordinator_command()
        .env("FLOTILLA_TLS_CERT", &cert)
        .env("FLOTILLA_TLS_KEY", &key)
        .spawn()?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(
            issued.cert.pem().as_bytes(),
        )?])
        .build()?;
    let https = format!("https://localhost:{}", fleet.port);
    let ready = format!("{https}/health/ready");
    flotilla_tests::workload::poll_until(WAIT, "the coordinator answers over TLS", || async {
        Ok(trusting.get(&ready).send().await?.status().is_success())
    })
    .await?;
    let listed = trusting
        .get(format!("{https}/api/workflows"))
        .bearer_auth(fleet.admin_token())
        .send()
        .await?;
    assert_eq!(listed.status().as_u16(), 200);

    // The platform's roots do not know this issuer; plain HTTP gets no answer.
    let refused = bare().get(&ready).send().await.unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    let plain = bare()
        .get(format!("http://localhost:{}/health/ready", fleet.port))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    coordinator.kill().await?;
    fleet.cleanup().await
}

/// A certificate without its key, or a file that holds none, stops the start with a message
/// naming the file, never a plaintext API.
#[tokio::test]
async fn a_tls_setting_that_cannot_work_stops_the_start() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let missing = fleet
        .coordinator_command()
        .env("FLOTILLA_TLS_CERT", "/nonexistent/cert.pem")
        .output()
        .await?;
    assert_eq!(missing.status.code(), Some(2));
    let empty = flotilla_tests::target_dir().join(format!("{}-empty.pem", fleet.prefix));
    std::fs::write(&empty, "")?;
    let unreadable = fleet
        .coordinator_command()
        .env("FLOTILLA_TLS_CERT", &empty)
        .env("FLOTILLA_TLS_KEY", &empty)
        .output()
        .await?;
    assert_eq!(unreadable.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert!(
        stderr.contains("cannot read the TLS certificate chain") && stderr.contains("empty.pem"),
        "{stderr}"
    );
    fleet.cleanup().await
}
