//! The guard against an in-memory [`Access`], over a few stand-in routes.

use std::sync::Mutex;

use axum::body::{Body, to_bytes};
use axum::http::{HeaderValue, Request};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use tower::ServiceExt;

use super::*;

const SECRET: &[u8] = b"an hs256 secret of at least 32 bytes, for tests";
const RSA_PRIVATE: &[u8] = include_bytes!("testdata/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("testdata/rsa-public.pem");
const OTHER_RSA_PRIVATE: &[u8] = include_bytes!("testdata/other-rsa-private.pem");
const EC_PRIVATE: &[u8] = include_bytes!("testdata/ec-private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("testdata/ec-public.pem");
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "flotilla";

/// Tokens by hash (revoked ones left out, as a store answers) and the audit entries written.
#[derive(Default)]
pub(crate) struct FakeAccess {
    tokens: Mutex<Vec<([u8; 32], TokenSummary)>>,
    audit: Mutex<Vec<AuditRecord>>,
}

impl FakeAccess {
    /// A token of `scopes` in every namespace; answers its value.
    fn add(&self, name: &str, scopes: &[&str]) -> String {
        self.add_in(name, scopes, &[ALL_NAMESPACES])
    }

    /// A token of `scopes` in `namespaces`; answers its value.
    fn add_in(&self, name: &str, scopes: &[&str], namespaces: &[&str]) -> String {
        let token = NewToken::generate();
        self.tokens.lock().unwrap().push((
            token.hash,
            TokenSummary {
                id: Uuid::new_v4(),
                name: name.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                created_at: Utc::now(),
                last_used_at: None,
                revoked_at: None,
            },
        ));
        token.value
    }

    fn entries(&self) -> Vec<AuditRecord> {
        self.audit.lock().unwrap().clone()
    }
}

impl Access for FakeAccess {
    async fn token(&self, hash: [u8; 32]) -> Result<Option<TokenSummary>, BackendError> {
        Ok(self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .find(|(h, t)| *h == hash && t.revoked_at.is_none())
            .map(|(_, t)| t.clone()))
    }

    async fn create_token(
        &self,
        name: String,
        scopes: Vec<String>,
        namespaces: Vec<String>,
        hash: [u8; 32],
    ) -> Result<TokenSummary, BackendError> {
        let summary = TokenSummary {
            id: Uuid::new_v4(),
            name,
            scopes,
            namespaces,
            created_at: Utc::now(),
            last_used_at: None,
            revoked_at: None,
        };
        self.tokens.lock().unwrap().push((hash, summary.clone()));
        Ok(summary)
    }

    async fn tokens(&self, namespaces: &Namespaces) -> Result<Vec<TokenSummary>, BackendError> {
        Ok(self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| namespaces.covers(&Namespaces::from_names(t.namespaces.clone())))
            .map(|(_, t)| t.clone())
            .collect())
    }

    async fn revoke_token(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<TokenSummary>, BackendError> {
        let mut tokens = self.tokens.lock().unwrap();
        let Some((_, token)) = tokens.iter_mut().find(|(_, t)| {
            t.id == id && namespaces.covers(&Namespaces::from_names(t.namespaces.clone()))
        }) else {
            return Ok(None);
        };
        token.revoked_at.get_or_insert_with(Utc::now);
        Ok(Some(token.clone()))
    }

    async fn record(&self, entry: AuditRecord) -> Result<(), BackendError> {
        self.audit.lock().unwrap().push(entry);
        Ok(())
    }

    async fn audit(&self, _query: AuditQuery) -> Result<AuditPage, BackendError> {
        Ok(AuditPage {
            entries: Vec::new(),
            next_cursor: None,
        })
    }
}

fn keys() -> JwtKeys {
    JwtKeys::new(ISSUER, AUDIENCE)
        .hs256(SECRET)
        .unwrap()
        .rs256_pem(RSA_PUBLIC)
        .unwrap()
        .es256_pem(EC_PUBLIC)
        .unwrap()
}

struct App {
    access: Arc<FakeAccess>,
    router: Router,
}

impl App {
    fn new(configure: impl FnOnce(&mut Guard<FakeAccess>)) -> Self {
        let access = Arc::new(FakeAccess::default());
        let mut guard = Guard {
            access: Arc::clone(&access),
            jwt: Some(keys()),
            enabled: true,
            protect_metrics: false,
            trust_forwarded_for: false,
            rate: RateLimiter::default(),
        };
        configure(&mut guard);
        let routes = Router::new()
            .route("/api/workflows", get(|| async { "runs" }))
            .route(
                "/api/workflows/execute",
                post(|| async {
                    let mut response = (StatusCode::ACCEPTED, "started").into_response();
                    response
                        .extensions_mut()
                        .insert(AuditTarget::one("workflowId", "run-1"));
                    response
                }),
            )
            .route("/api/workflows/{id}/cancel", post(|| async { "cancelled" }))
            .route("/api/definitions", post(|| async { "registered" }))
            .route("/health/live", get(|| async { "live" }))
            .route("/metrics", get(|| async { "metrics" }))
            .route("/dashboard", get(|| async { "page" }))
            .route("/dashboard/{asset}", get(|| async { "file" }))
            .route("/api/events", get(|| async { "events" }));
        Self {
            access,
            router: secure(routes, guard, Limits::default()),
        }
    }

    async fn send(&self, method: Method, path: &str, credential: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(credential) = credential {
            request = request.header(header::AUTHORIZATION, format!("Bearer {credential}"));
        }
        self.request(request.body(Body::empty()).unwrap()).await
    }

    async fn request(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let challenge = response.headers().get(header::WWW_AUTHENTICATE).cloned();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        Answer {
            status,
            challenge,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

struct Answer {
    status: StatusCode,
    challenge: Option<HeaderValue>,
    body: String,
}

impl Answer {
    fn code(&self) -> String {
        serde_json::from_str::<Value>(&self.body).unwrap_or_default()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn claims(scope: &str) -> Value {
    let now = Utc::now().timestamp();
    json!({"sub": "ci-bot", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "nbf": now - 10, "scope": scope})
}

fn jwt(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET).unwrap(),
        claims,
    )
}

#[tokio::test]
async fn a_request_without_a_credential_is_401_with_a_bearer_challenge() {
    let app = App::new(|_| {});
    let answer = app.send(Method::GET, "/api/workflows", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.code(), "unauthorized");
    assert_eq!(
        answer.challenge.as_ref().map(|v| v.to_str().unwrap()),
        Some(r#"Bearer realm="flotilla""#)
    );
    assert!(
        answer.body.contains("Authorization: Bearer"),
        "{}",
        answer.body
    );
    // Nothing was carried out, so nothing is audited.
    let answer = app.send(Method::POST, "/api/workflows/execute", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(app.access.entries().is_empty());
}

#[tokio::test]
async fn garbage_and_unknown_credentials_are_401() {
    let app = App::new(|_| {});
    for credential in [
        "garbage",
        "flt_0000",
        "a.b.c",
        &format!("flt_{}", "0".repeat(64)),
    ] {
        let answer = app
            .send(Method::GET, "/api/workflows", Some(credential))
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{credential}");
        assert!(answer.challenge.is_some());
    }
    let request = Request::get("/api/workflows")
        .header(header::AUTHORIZATION, "Basic YWRtaW46YWRtaW4=")
        .body(Body::empty())
        .unwrap();
    let answer = app.request(request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.body.contains("Bearer"), "{}", answer.body);
}

#[tokio::test]
async fn a_token_may_do_what_its_scopes_allow_and_admin_everything() {
    let app = App::new(|_| {});
    let reader = app.access.add("reader", &["read"]);
    let runner = app.access.add("runner", &["read", "execute"]);
    let admin = app.access.add("root", &["admin"]);

    let read = app.send(Method::GET, "/api/workflows", Some(&reader)).await;
    assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "runs"));
    let refused = app
        .send(Method::POST, "/api/workflows/execute", Some(&reader))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "forbidden");
    assert!(refused.body.contains("scope `execute`"), "{}", refused.body);
    assert!(refused.challenge.is_none());

    let started = app
        .send(Method::POST, "/api/workflows/execute", Some(&runner))
        .await;
    assert_eq!(started.status, StatusCode::ACCEPTED);
    let cancel = app
        .send(Method::POST, "/api/workflows/r1/cancel", Some(&runner))
        .await;
    assert_eq!(cancel.status, StatusCode::FORBIDDEN);
    assert!(cancel.body.contains("scope `operate`"), "{}", cancel.body);

    for (method, path) in [
        (Method::GET, "/api/workflows"),
        (Method::POST, "/api/workflows/execute"),
        (Method::POST, "/api/workflows/r1/cancel"),
        (Method::POST, "/api/definitions"),
    ] {
        let answer = app.send(method.clone(), path, Some(&admin)).await;
        assert!(
            answer.status.is_success(),
            "{method} {path}: {}",
            answer.status
        );
    }
}

#[tokio::test]
async fn a_revoked_token_is_401() {
    let app = App::new(|_| {});
    let token = app.access.add("soon-gone", &["admin"]);
    assert_eq!(
        app.send(Method::GET, "/api/workflows", Some(&token))
            .await
            .status,
        StatusCode::OK
    );
    let id = app.access.tokens.lock().unwrap()[0].1.id;
    app.access.revoke_token(&Namespaces::All, id).await.unwrap();
    let answer = app.send(Method::GET, "/api/workflows", Some(&token)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn jwts_signed_by_a_configured_key_with_the_right_claims_are_accepted() {
    let app = App::new(|_| {});
    let rs = jwt(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        &claims("read"),
    );
    let es = jwt(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
        &claims("openid read"),
    );
    for token in [hs256(&claims("read")), rs, es] {
        let answer = app.send(Method::GET, "/api/workflows", Some(&token)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    // The scopes come from the `scope` claim.
    let answer = app
        .send(
            Method::POST,
            "/api/workflows/execute",
            Some(&hs256(&claims("read"))),
        )
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let answer = app
        .send(
            Method::POST,
            "/api/workflows/execute",
            Some(&hs256(&claims("read execute"))),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(app.access.entries()[1].actor, "ci-bot");
    assert_eq!(app.access.entries()[1].credential, Credential::Jwt);
}

#[tokio::test]
async fn forged_expired_premature_and_misaddressed_jwts_are_401() {
    let app = App::new(|_| {});
    let now = Utc::now().timestamp();
    let with = |key: &str, value: Value| {
        let mut c = claims("admin");
        c[key] = value;
        c
    };
    let mut without_sub = claims("admin");
    without_sub.as_object_mut().unwrap().remove("sub");
    let mut without_exp = claims("admin");
    without_exp.as_object_mut().unwrap().remove("exp");
    let cases = [
        (
            "signed with another secret",
            jwt(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another secret, also at least 32 bytes long").unwrap(),
                &claims("admin"),
            ),
        ),
        (
            "signed with another RSA key",
            jwt(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(OTHER_RSA_PRIVATE).unwrap(),
                &claims("admin"),
            ),
        ),
        ("expired", hs256(&with("exp", json!(now - 3600)))),
        ("not valid yet", hs256(&with("nbf", json!(now + 3600)))),
        (
            "another issuer",
            hs256(&with("iss", json!("https://evil.example"))),
        ),
        (
            "another audience",
            hs256(&with("aud", json!("someone-else"))),
        ),
        ("no subject", hs256(&without_sub)),
        ("no expiry", hs256(&without_exp)),
    ];
    for (what, token) in cases {
        let answer = app.send(Method::GET, "/api/workflows", Some(&token)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}");
        assert!(answer.challenge.is_some(), "{what}");
    }
}

/// A JWT of `header` and `claims` with `signature`, assembled by hand.
fn raw_jwt(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.{}",
        part(header),
        part(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[tokio::test]
async fn alg_none_is_401() {
    let app = App::new(|_| {});
    for alg in ["none", "None", "NONE"] {
        let token = raw_jwt(&json!({"alg": alg, "typ": "JWT"}), &claims("admin"), b"");
        let answer = app.send(Method::GET, "/api/workflows", Some(&token)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{alg}");
    }
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_is_401() {
    // The classic confusion: a verifier that takes the algorithm from the token would check
    // this HMAC with the public key's bytes as the secret, and anyone has those.
    let forged = jwt(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC).unwrap(),
        &claims("admin"),
    );
    let rsa_only = App::new(|g| {
        g.jwt = Some(
            JwtKeys::new(ISSUER, AUDIENCE)
                .rs256_pem(RSA_PUBLIC)
                .unwrap(),
        );
    });
    let both = App::new(|_| {});
    for app in [rsa_only, both] {
        let answer = app.send(Method::GET, "/api/workflows", Some(&forged)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
}

#[test]
fn short_hs256_secrets_and_keys_that_are_not_pem_are_refused() {
    let short = JwtKeys::new(ISSUER, AUDIENCE)
        .hs256(b"short")
        .err()
        .unwrap();
    assert!(short.to_string().contains("at least 32 bytes"), "{short}");
    assert!(
        JwtKeys::new(ISSUER, AUDIENCE)
            .rs256_pem(b"not a key")
            .is_err()
    );
    assert!(
        JwtKeys::new(ISSUER, AUDIENCE)
            .es256_pem(RSA_PUBLIC)
            .is_err()
    );
}

#[tokio::test]
async fn health_is_open_and_metrics_open_unless_protected() {
    let app = App::new(|_| {});
    assert_eq!(
        app.send(Method::GET, "/health/live", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.send(Method::GET, "/metrics", None).await.status,
        StatusCode::OK
    );
    let protected = App::new(|g| g.protect_metrics = true);
    assert_eq!(
        protected.send(Method::GET, "/metrics", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reader = protected.access.add("scraper", &["read"]);
    assert_eq!(
        protected
            .send(Method::GET, "/metrics", Some(&reader))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        protected
            .send(Method::GET, "/health/live", None)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_dashboard_page_is_open_but_the_event_stream_it_reads_is_not() {
    let app = App::new(|_| {});
    for open in ["/dashboard", "/dashboard/app.js"] {
        assert_eq!(
            app.send(Method::GET, open, None).await.status,
            StatusCode::OK,
            "{open}"
        );
    }
    assert_eq!(
        app.send(Method::GET, "/api/events", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reader = app.access.add("watcher", &["read"]);
    assert_eq!(
        app.send(Method::GET, "/api/events", Some(&reader))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn state_changing_requests_are_audited_with_who_what_and_the_status() {
    let app = App::new(|_| {});
    let admin = app.access.add("deployer", &["admin"]);
    let reader = app.access.add("viewer", &["read"]);
    app.send(Method::GET, "/api/workflows", Some(&admin)).await;
    app.send(Method::POST, "/api/workflows/execute", Some(&admin))
        .await;
    app.send(Method::POST, "/api/workflows/r-7/cancel", Some(&reader))
        .await;
    let entries = app.access.entries();
    assert_eq!(entries.len(), 2, "reads are not audited: {entries:?}");
    assert_eq!(
        entries[0],
        AuditRecord {
            actor: "deployer".into(),
            credential: Credential::Token,
            action: "POST /api/workflows/execute".into(),
            target: json!({"workflowId": "run-1"}).as_object().unwrap().clone(),
            peer: None,
            status: 202,
        }
    );
    assert_eq!(
        (
            entries[1].actor.as_str(),
            entries[1].action.as_str(),
            &entries[1].target,
            entries[1].status
        ),
        (
            "viewer",
            "POST /api/workflows/{id}/cancel",
            json!({"id": "r-7"}).as_object().unwrap(),
            403
        )
    );
}

/// Postgres cannot store a NUL character: the audit keeps the id the request named, escaped.
#[tokio::test]
async fn a_nul_character_in_an_audited_path_is_recorded_escaped() {
    let app = App::new(|_| {});
    let admin = app.access.add("deployer", &["admin"]);
    app.send(Method::POST, "/api/workflows/r%007/cancel", Some(&admin))
        .await;
    let entries = app.access.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        entries[0].target,
        *json!({"id": "r\\07"}).as_object().unwrap()
    );
}

#[tokio::test]
async fn x_forwarded_for_is_the_peer_only_when_trusted() {
    for (trusted, expected) in [(false, None), (true, Some("203.0.113.9"))] {
        let app = App::new(|g| g.trust_forwarded_for = trusted);
        let admin = app.access.add("deployer", &["admin"]);
        let request = Request::post("/api/definitions")
            .header(header::AUTHORIZATION, format!("Bearer {admin}"))
            .header("x-forwarded-for", "198.51.100.1, 203.0.113.9")
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.request(request).await.status, StatusCode::OK);
        assert_eq!(app.access.entries()[0].peer.as_deref(), expected);
    }
}

#[tokio::test]
async fn with_authentication_off_everyone_is_anonymous_with_every_scope() {
    let app = App::new(|g| g.enabled = false);
    let answer = app.send(Method::POST, "/api/definitions", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    let entries = app.access.entries();
    assert_eq!(
        (entries[0].actor.as_str(), entries[0].credential),
        ("anonymous", Credential::None)
    );
}

#[tokio::test]
async fn tokens_are_created_shown_once_listed_without_values_and_revoked() {
    let app = App::new(|_| {});
    let admin = app.access.add("root", &["admin"]);
    let request = Request::post("/api/tokens")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"name": "ci", "scopes": ["execute", "read", "read"]}).to_string(),
        ))
        .unwrap();
    let created = app.request(request).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let created: CreatedToken = serde_json::from_str(&created.body).unwrap();
    assert_eq!(created.summary.scopes, ["read", "execute"]);
    assert!(created.token.starts_with(TOKEN_PREFIX));
    assert_eq!(created.token.len(), TOKEN_PREFIX.len() + 64);
    // The new token works, within its scopes.
    let answer = app
        .send(Method::POST, "/api/workflows/execute", Some(&created.token))
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let list = app.send(Method::GET, "/api/tokens", Some(&admin)).await;
    let wrong = app.send(Method::PUT, "/api/tokens", Some(&admin)).await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into())
    );
    assert!(!list.body.contains(&created.token));
    assert!(list.body.contains("\"ci\""), "{}", list.body);
    // Only an admin manages tokens.
    let refused = app
        .send(Method::GET, "/api/tokens", Some(&created.token))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let path = format!("/api/tokens/{}", created.summary.id);
    let revoked = app.send(Method::DELETE, &path, Some(&admin)).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    let answer = app
        .send(Method::GET, "/api/workflows", Some(&created.token))
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let audit = app.access.entries();
    assert_eq!(
        audit[0].target["tokenId"],
        json!(created.summary.id.to_string())
    );
    assert_eq!(audit.last().unwrap().action, "DELETE /api/tokens/{id}");
}

#[tokio::test]
async fn a_token_request_with_no_or_unknown_scopes_is_400() {
    let app = App::new(|_| {});
    let admin = app.access.add("root", &["admin"]);
    for (body, needle) in [
        (json!({"name": "x", "scopes": []}), "at least one scope"),
        (
            json!({"name": "x", "scopes": ["root"]}),
            "unknown scope `root`",
        ),
        (json!({"name": " ", "scopes": ["read"]}), "`name`"),
        (
            json!({"name": "two words", "scopes": ["read"]}),
            "no spaces",
        ),
    ] {
        let request = Request::post("/api/tokens")
            .header(header::AUTHORIZATION, format!("Bearer {admin}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let answer = app.request(request).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(answer.body.contains(needle), "{}", answer.body);
    }
}

#[test]
fn routes_need_the_scope_of_what_they_do() {
    let cases = [
        (Method::GET, "/api/workflows/{id}", Scope::Read),
        (Method::GET, "/api/dlq", Scope::Read),
        (Method::POST, "/api/workflows/execute", Scope::Execute),
        (Method::POST, "/api/workflows/{id}/cancel", Scope::Operate),
        (
            Method::POST,
            "/api/workflows/{id}/steps/{step}/complete",
            Scope::Operate,
        ),
        (Method::POST, "/api/dlq/redrive", Scope::Operate),
        (
            Method::POST,
            "/api/agents/{name}/breaker/reset",
            Scope::Operate,
        ),
        (Method::GET, "/api/agents/breakers", Scope::Read),
        (Method::POST, "/api/definitions", Scope::Admin),
        (Method::DELETE, "/api/schedules/{id}", Scope::Admin),
        (Method::GET, "/api/tokens", Scope::Admin),
        (Method::GET, "/api/audit", Scope::Admin),
        (Method::PUT, "/api/something-new", Scope::Admin),
    ];
    for (method, route, scope) in cases {
        assert_eq!(required_scope(&method, route), scope, "{method} {route}");
    }
}

#[tokio::test]
async fn a_jwt_names_its_namespaces_and_fleet_wide_routes_need_all_of_them() {
    let app = App::new(|_| {});
    let mut team = claims("admin");
    team["namespaces"] = json!(["team-a"]);
    let team = hs256(&team);
    let mut everyone = claims("admin");
    everyone["namespaces"] = json!("*");
    let everyone = hs256(&everyone);
    // Without the claim: `default`, so not all.
    let plain = hs256(&claims("admin"));
    for credential in [&team, &plain] {
        let answer = app.send(Method::GET, "/api/audit", Some(credential)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert!(answer.body.contains("all namespaces"), "{}", answer.body);
    }
    let answer = app.send(Method::GET, "/api/audit", Some(&everyone)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    for bad in [json!("team-a"), json!([]), json!(["Team_A"])] {
        let mut claims = claims("admin");
        claims["namespaces"] = bad.clone();
        let answer = app
            .send(Method::GET, "/api/workflows", Some(&hs256(&claims)))
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
}

#[tokio::test]
async fn a_token_hands_out_only_namespaces_it_sees() {
    let app = App::new(|_| {});
    let team = app.access.add_in("team-admin", &["admin"], &["team-a"]);
    let create = |namespaces: Value| {
        Request::post("/api/tokens")
            .header(header::AUTHORIZATION, format!("Bearer {team}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"name": "ci", "scopes": ["read"], "namespaces": namespaces}).to_string(),
            ))
            .unwrap()
    };
    let answer = app.request(create(json!([]))).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let created: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(created["namespaces"], json!(["team-a"]));
    for (namespaces, status) in [
        (json!(["team-b"]), StatusCode::FORBIDDEN),
        (json!(["*"]), StatusCode::FORBIDDEN),
        (json!(["Team"]), StatusCode::BAD_REQUEST),
    ] {
        let answer = app.request(create(namespaces.clone())).await;
        assert_eq!(answer.status, status, "{namespaces}: {}", answer.body);
    }
    // It lists and revokes only tokens of its namespaces.
    let answer = app.send(Method::GET, "/api/tokens", Some(&team)).await;
    let listed: Value = serde_json::from_str(&answer.body).unwrap();
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team-admin", "ci"]);
    let other = app.access.add("root", &["admin"]);
    let id = app.access.tokens(&Namespaces::All).await.unwrap()[2].id;
    let answer = app
        .send(Method::DELETE, &format!("/api/tokens/{id}"), Some(&team))
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = app.send(Method::GET, "/api/workflows", Some(&other)).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn a_namespace_over_its_requests_per_second_is_429_and_audited() {
    let app = App::new(|guard| {
        guard.rate = RateLimiter::new(flotilla_core::quota::Quotas::parse("team-a:rps=1").unwrap());
    });
    let team = app.access.add_in("team-runner", &["execute"], &["team-a"]);
    let started = app
        .send(Method::POST, "/api/workflows/execute", Some(&team))
        .await;
    assert_eq!(started.status, StatusCode::ACCEPTED);
    let request = Request::post("/api/workflows/execute")
        .header(header::AUTHORIZATION, format!("Bearer {team}"))
        .body(Body::empty())
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let statuses: Vec<u16> = app.access.entries().iter().map(|e| e.status).collect();
    assert_eq!(statuses, [202, 429]);
}
