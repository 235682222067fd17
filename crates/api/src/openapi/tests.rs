use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::tests::FakeAccess;
use crate::routes::tests::{FakeBackend, FakeProbe};
use crate::{Guard, Limits, router_with_health, secure};

/// What the coordinator serves: the API, health and metrics, tokens and audit; with
/// authentication on or off, and `/metrics` behind it when on.
fn app(authentication: bool) -> Router {
    let guard = Guard {
        access: Arc::new(FakeAccess::default()),
        jwt: None,
        enabled: authentication,
        protect_metrics: authentication,
        trust_forwarded_for: false,
        rate: crate::RateLimiter::default(),
    };
    secure(
        router_with_health(
            Arc::new(FakeBackend::default()),
            FakeProbe::new(Vec::new()),
            Limits::default(),
        ),
        guard,
        Limits::default(),
    )
}

/// The route patterns of `app`, read from the router's table: its `Debug` form lists every
/// registered path, then the fallback router's (`/` and internal patterns), left out.
fn route_patterns(app: &Router) -> BTreeSet<String> {
    let table = format!("{app:?}");
    let (routes, _fallbacks) = table
        .split_once("fallback_router")
        .expect("a router's Debug form names its fallback router");
    routes
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/') && !s.contains("__private__"))
        .map(str::to_string)
        .collect()
}

/// The methods `app` routes for `pattern`: those not answered 405 on a path of that pattern.
async fn routed_methods(app: &Router, pattern: &str) -> BTreeSet<String> {
    let path: String = pattern
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "x"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    let mut methods = BTreeSet::new();
    for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
        let request = Request::builder()
            .method(method)
            .uri(&path)
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        if response.status() != StatusCode::METHOD_NOT_ALLOWED {
            methods.insert(method.to_lowercase());
        }
    }
    methods
}

fn document_json() -> Value {
    serde_json::to_value(super::document()).unwrap()
}

/// Methods per path in the document.
fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "put", "post", "delete", "patch"].contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

#[tokio::test]
async fn every_route_of_the_router_is_documented_with_its_methods() {
    // Authentication off, so that a request reaches its route and a wrong method gets 405.
    let app = app(false);
    let patterns = route_patterns(&app);
    // The table was read: a change of its form must fail here, not pass with nothing checked.
    for known in [
        "/api/workflows/{id}/cancel",
        "/api/tokens",
        "/health/ready",
        "/metrics",
    ] {
        assert!(patterns.contains(known), "{known} not among {patterns:?}");
    }
    let mut routed = BTreeMap::new();
    for pattern in patterns {
        let methods = routed_methods(&app, &pattern).await;
        routed.insert(pattern, methods);
    }
    assert_eq!(documented(&document_json()), routed);
}

#[tokio::test]
async fn the_document_is_served_without_credentials() {
    let app = app(true);
    let request = Request::builder()
        .uri(super::PATH)
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, document_json());
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
}

#[test]
fn every_error_answer_is_the_one_error_shape() {
    let doc = document_json();
    let error_ref = "#/components/schemas/ErrorBody";
    let mut errors = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.contains_key("500"),
                "{method} {path} documents no 500"
            );
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    errors += 1;
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"], error_ref,
                        "{method} {path} answers {status} in another shape"
                    );
                }
            }
        }
    }
    assert!(errors > 0);
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["error"]), "{error}");
}

#[test]
fn each_guarded_operation_names_the_scope_it_needs() {
    let doc = document_json();
    let operation = &doc["paths"]["/api/workflows/{id}/cancel"]["post"];
    assert_eq!(
        operation["security"],
        serde_json::json!([{ "bearer": ["operate"] }])
    );
    assert!(
        operation["description"]
            .as_str()
            .unwrap()
            .contains("Needs scope `operate`")
    );
    assert_eq!(
        doc["paths"]["/api/tokens"]["post"]["security"],
        serde_json::json!([{ "bearer": ["admin"] }])
    );
    for open in ["/health/ready", "/metrics", super::PATH] {
        let operation = &doc["paths"][open]["get"];
        assert!(operation.get("security").is_none(), "{open}: {operation}");
        assert!(operation["responses"].get("401").is_none(), "{open}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

/// Every `$ref` of `value`, wherever it is.
fn refs(value: &Value, found: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                found.insert(target.clone());
            }
            map.values().for_each(|v| refs(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

#[test]
fn every_reference_names_a_schema_of_the_document() {
    let doc = document_json();
    let mut found = BTreeSet::new();
    refs(&doc, &mut found);
    assert!(found.contains("#/components/schemas/OperateResponse"));
    for target in found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{target} is not a schema reference"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{target} is named but not in the document"
        );
    }
}

/// What a client may send is stated as tightly as the server checks it, so that a request the
/// document calls valid is accepted (the contract test, tests/tests/contract.rs, checks both).
#[test]
fn parameters_state_the_values_the_server_accepts() {
    let doc = document_json();
    let parameter = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))["schema"]
            .clone()
    };
    for (path, method) in [
        ("/api/workflows/{id}", "get"),
        ("/api/workflows/{id}/steps/{step}/skip", "post"),
        ("/api/tokens/{id}", "delete"),
    ] {
        assert_eq!(parameter(path, method, "id")["format"], "uuid", "{path}");
    }
    for path in ["/api/workflows", "/api/dlq", "/api/audit"] {
        let limit = parameter(path, "get", "limit");
        assert_eq!(
            (&limit["minimum"], &limit["maximum"]),
            (&1.into(), &500.into())
        );
    }
    let statuses: Vec<&str> = crate::routes::RUN_STATUSES
        .iter()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(
        parameter("/api/workflows", "get", "status")["enum"],
        serde_json::json!(statuses)
    );
}
