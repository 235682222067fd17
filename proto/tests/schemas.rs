//! The JSON Schemas in `proto/schemas/` and the Rust types must describe the same documents:
//! what one side accepts the other accepts, and the documents a worker in another language could
//! get wrong are rejected by both.

use chrono::{TimeZone, Utc};
use flotilla_proto::{
    Cancel, Deregistration, Heartbeat, HeldTask, LogBatch, LogLine, LogStream, PROTOCOL_VERSION,
    Registration, ResultStatus, Task, TaskError, TaskResult, WorkerMessage, schemas,
};
use jsonschema::Validator;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

fn validator(schema: &str) -> Validator {
    let schema: Value = serde_json::from_str(schema).expect("schema is valid JSON");
    jsonschema::draft202012::meta::validate(&schema).expect("schema is valid draft 2020-12");
    jsonschema::draft202012::options()
        // `format` is only an annotation in 2020-12 unless asked for; the contract means it.
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn schema_errors(validator: &Validator, doc: &Value) -> Vec<String> {
    validator.iter_errors(doc).map(|e| e.to_string()).collect()
}

fn sample_task() -> Task {
    Task {
        v: PROTOCOL_VERSION,
        task_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        step_id: "scaffold".into(),
        attempt: 1,
        agent: "agent6".into(),
        action: "scaffold_project".into(),
        idempotency_key: "run-1/scaffold".into(),
        params: json!({"name": "demo", "sleep_ms": 10})
            .as_object()
            .cloned()
            .unwrap(),
        run_params: json!({"region": "eu"}).as_object().cloned().unwrap(),
        inputs: json!({"fetch": {"files": 3}}).as_object().cloned().unwrap(),
        dispatched_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
        heartbeat_timeout_ms: Some(30_000),
        ack_early: true,
    }
}

fn sample_results() -> Vec<TaskResult> {
    let success = TaskResult {
        v: PROTOCOL_VERSION,
        task_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        step_id: "scaffold".into(),
        attempt: 2,
        status: ResultStatus::Success,
        output: Some(json!({"files": ["a.rs"], "count": 1})),
        error: None,
        worker_id: "host-1-abc".into(),
        started_at: Utc::now(),
        finished_at: Utc::now(),
    };
    let failure = TaskResult {
        status: ResultStatus::Failure,
        output: None,
        error: Some(TaskError {
            message: "disk full".into(),
            retryable: false,
        }),
        ..success.clone()
    };
    let scalar_output = TaskResult {
        output: Some(json!(42)),
        ..success.clone()
    };
    let cancelled = TaskResult {
        status: ResultStatus::Cancelled,
        output: None,
        error: Some(TaskError {
            message: "cancelled: the run was cancelled".into(),
            retryable: false,
        }),
        ..success.clone()
    };
    vec![success, failure, scalar_output, cancelled]
}

fn sample_heartbeats() -> Vec<Heartbeat> {
    let idle = Heartbeat {
        v: PROTOCOL_VERSION,
        worker_id: "host-1-abc".into(),
        agents: vec!["agent6".into(), "echo".into()],
        concurrency: 16,
        tasks: vec![],
        sent_at: Utc::now(),
    };
    let busy = Heartbeat {
        tasks: vec![HeldTask {
            task_id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            step_id: "scaffold".into(),
            attempt: 3,
        }],
        ..idle.clone()
    };
    vec![idle, busy]
}

fn sample_cancel() -> Cancel {
    Cancel {
        v: PROTOCOL_VERSION,
        task_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        step_id: "scaffold".into(),
        attempt: 2,
        reason: "the run was cancelled".into(),
        sent_at: Utc::now(),
    }
}

fn sample_registration() -> Registration {
    Registration {
        v: PROTOCOL_VERSION,
        worker_id: "host-1-abc".into(),
        agents: vec!["agent6".into()],
        actions: vec!["scaffold_project".into()],
        sdk: "flotilla-worker/0.1.0".into(),
        concurrency: 16,
        host: "host".into(),
        pid: 1,
        labels: [("region".to_owned(), "eu".to_owned())].into(),
        started_at: Utc::now(),
        sent_at: Utc::now(),
    }
}

fn sample_deregistration() -> Deregistration {
    Deregistration {
        v: PROTOCOL_VERSION,
        worker_id: "host-1-abc".into(),
        sent_at: Utc::now(),
    }
}

fn sample_log() -> LogBatch {
    LogBatch {
        v: PROTOCOL_VERSION,
        task_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        step_id: "build".into(),
        attempt: 1,
        worker_id: "host-1-abc".into(),
        execution_id: Uuid::new_v4(),
        lines: vec![
            LogLine {
                seq: 1,
                stream: LogStream::Stdout,
                line: "Compiling demo v0.1.0".into(),
                at: Utc::now(),
            },
            LogLine {
                seq: 2,
                stream: LogStream::Stderr,
                line: "warning: unused variable".into(),
                at: Utc::now(),
            },
        ],
        sent_at: Utc::now(),
    }
}

/// Serializes a value, checks the schema accepts it, and that it reads back unchanged.
fn assert_round_trip<T>(validator: &Validator, value: &T)
where
    T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let doc = serde_json::to_value(value).unwrap();
    let errors = schema_errors(validator, &doc);
    assert!(errors.is_empty(), "schema rejects {doc}: {errors:?}");
    // Through bytes, as on the wire.
    let back: T = serde_json::from_slice(&serde_json::to_vec(value).unwrap()).unwrap();
    assert_eq!(&back, value);
}

/// Both the schema and serde must reject `doc`.
fn assert_rejected_by_both<T: DeserializeOwned + std::fmt::Debug>(
    validator: &Validator,
    doc: &Value,
    why: &str,
) {
    assert!(
        !validator.is_valid(doc),
        "schema accepts a document with {why}: {doc}"
    );
    let parsed = serde_json::from_value::<T>(doc.clone());
    assert!(
        parsed.is_err(),
        "serde accepts a document with {why}: {parsed:?}"
    );
}

/// Invalid variants of a valid document, each with a description.
fn invalid_variants(valid: &Value, other_type: &str) -> Vec<(Value, String)> {
    let object = valid.as_object().unwrap();
    let mut variants = Vec::new();
    for field in object.keys() {
        let mut missing = object.clone();
        missing.remove(field);
        // Fields with a serde default may be absent; the schema leaves them optional too.
        if [
            "params",
            "run_params",
            "inputs",
            "tasks",
            "output",
            "error",
            "heartbeat_timeout_ms",
            "ack_early",
            "actions",
            "labels",
        ]
        .contains(&field.as_str())
        {
            continue;
        }
        variants.push((Value::Object(missing), format!("`{field}` missing")));
    }
    for (field, wrong) in [
        ("v", json!("1")),
        ("attempt", json!("one")),
        ("task_id", json!(17)),
        ("run_id", json!(true)),
        ("step_id", json!(3)),
        ("worker_id", json!(["w"])),
        ("agents", json!("agent6")),
        ("concurrency", json!(-1)),
        ("params", json!([1, 2])),
        ("status", json!("done")),
        ("heartbeat_timeout_ms", json!(-5)),
        ("ack_early", json!("yes")),
        ("pid", json!(-1)),
        ("labels", json!({"gpu": true})),
        ("sdk", json!(1)),
    ] {
        if object.contains_key(field) {
            let mut doc = object.clone();
            doc.insert(field.into(), wrong.clone());
            variants.push((Value::Object(doc), format!("`{field}` = {wrong}")));
        }
    }
    let mut unknown = object.clone();
    unknown.insert("priority".into(), json!(5));
    variants.push((Value::Object(unknown), "an unknown field".into()));

    let mut wrong_type = object.clone();
    wrong_type.insert("type".into(), json!(other_type));
    variants.push((Value::Object(wrong_type), format!("type `{other_type}`")));
    variants
}

#[test]
fn task_samples_match_the_schema() {
    let validator = validator(schemas::TASK);
    assert_round_trip(&validator, &sample_task());

    // The maps default to empty when absent.
    let mut doc = serde_json::to_value(sample_task()).unwrap();
    for field in ["params", "run_params", "inputs"] {
        doc.as_object_mut().unwrap().remove(field);
    }
    assert!(validator.is_valid(&doc));
    let task: Task = serde_json::from_value(doc).unwrap();
    assert!(task.params.is_empty() && task.run_params.is_empty() && task.inputs.is_empty());
}

#[test]
fn result_samples_match_the_schema() {
    let validator = validator(schemas::RESULT);
    for result in sample_results() {
        assert_round_trip(&validator, &result);
    }

    // `retryable` defaults to true, in both.
    let mut doc = serde_json::to_value(&sample_results()[1]).unwrap();
    doc["error"] = json!({"message": "timeout"});
    assert!(validator.is_valid(&doc));
    let result: TaskResult = serde_json::from_value(doc).unwrap();
    assert!(result.error.unwrap().retryable);
}

#[test]
fn heartbeat_samples_match_the_schema() {
    let validator = validator(schemas::HEARTBEAT);
    for heartbeat in sample_heartbeats() {
        assert_round_trip(&validator, &heartbeat);
    }
}

#[test]
fn cancel_samples_match_the_schema() {
    assert_round_trip(&validator(schemas::CANCEL), &sample_cancel());
}

#[test]
fn registration_samples_match_the_schema() {
    let registrations = validator(schemas::REGISTRATION);
    assert_round_trip(&registrations, &sample_registration());
    let mut doc = serde_json::to_value(sample_registration()).unwrap();
    for field in ["actions", "labels"] {
        doc.as_object_mut().unwrap().remove(field);
    }
    assert!(registrations.is_valid(&doc));
    let registration: Registration = serde_json::from_value(doc).unwrap();
    assert!(registration.actions.is_empty() && registration.labels.is_empty());
    assert_round_trip(
        &validator(schemas::DEREGISTRATION),
        &sample_deregistration(),
    );
}

#[test]
fn log_samples_match_the_schema() {
    let validator = validator(schemas::LOG);
    assert_round_trip(&validator, &sample_log());
    let valid = serde_json::to_value(sample_log()).unwrap();
    for (doc, why) in invalid_variants(&valid, "heartbeat") {
        assert_rejected_by_both::<LogBatch>(&validator, &doc, &why);
    }
    let mut bad_line = valid.clone();
    bad_line["lines"][0]["stream"] = json!("stdin");
    assert_rejected_by_both::<LogBatch>(&validator, &bad_line, "an unknown stream");
    bad_line["lines"][0] = json!({"seq": 1, "stream": "stdout", "line": "x"});
    assert_rejected_by_both::<LogBatch>(&validator, &bad_line, "a line without `at`");
    let mut first = valid;
    first["lines"][0]["seq"] = json!(0);
    assert!(!validator.is_valid(&first), "line 0 accepted");
}

#[test]
fn invalid_registrations_are_rejected_by_schema_and_serde() {
    let validator = validator(schemas::REGISTRATION);
    let valid = serde_json::to_value(sample_registration()).unwrap();
    for (doc, why) in invalid_variants(&valid, "heartbeat") {
        assert_rejected_by_both::<Registration>(&validator, &doc, &why);
    }
    let goodbyes = self::validator(schemas::DEREGISTRATION);
    let valid = serde_json::to_value(sample_deregistration()).unwrap();
    for (doc, why) in invalid_variants(&valid, "registration") {
        assert_rejected_by_both::<Deregistration>(&goodbyes, &doc, &why);
    }
}

#[test]
fn the_heartbeats_queue_carries_three_kinds() {
    fn body(value: &impl serde::Serialize) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }
    let registration = sample_registration();
    assert_eq!(
        WorkerMessage::decode(&body(&registration)).unwrap(),
        WorkerMessage::Registration(registration)
    );
    let heartbeat = sample_heartbeats().remove(1);
    assert_eq!(
        WorkerMessage::decode(&body(&heartbeat)).unwrap(),
        WorkerMessage::Heartbeat(heartbeat)
    );
    let goodbye = sample_deregistration();
    assert_eq!(
        WorkerMessage::decode(&body(&goodbye)).unwrap(),
        WorkerMessage::Deregistration(goodbye)
    );
    for wrong in [json!({"type": "task"}), json!({"v": 1}), json!([1])] {
        let error = WorkerMessage::decode(&serde_json::to_vec(&wrong).unwrap());
        assert!(error.is_err(), "{wrong} read as {error:?}");
    }
}

#[test]
fn invalid_cancels_are_rejected_by_schema_and_serde() {
    let validator = validator(schemas::CANCEL);
    let valid = serde_json::to_value(sample_cancel()).unwrap();
    let variants = invalid_variants(&valid, "task");
    assert!(variants.len() >= 12, "too few variants: {}", variants.len());
    for (doc, why) in variants {
        assert_rejected_by_both::<Cancel>(&validator, &doc, &why);
    }
}

#[test]
fn invalid_tasks_are_rejected_by_schema_and_serde() {
    let validator = validator(schemas::TASK);
    let valid = serde_json::to_value(sample_task()).unwrap();
    let variants = invalid_variants(&valid, "result");
    assert!(variants.len() >= 12, "too few variants: {}", variants.len());
    for (doc, why) in variants {
        assert_rejected_by_both::<Task>(&validator, &doc, &why);
    }
}

#[test]
fn invalid_results_are_rejected_by_schema_and_serde() {
    let validator = validator(schemas::RESULT);
    let valid = serde_json::to_value(&sample_results()[1]).unwrap();
    for (doc, why) in invalid_variants(&valid, "task") {
        assert_rejected_by_both::<TaskResult>(&validator, &doc, &why);
    }
    let mut bad_error = valid.clone();
    bad_error["error"] = json!({"message": "x", "retryable": false, "code": 3});
    assert_rejected_by_both::<TaskResult>(&validator, &bad_error, "an unknown error field");
    bad_error["error"] = json!({"retryable": false});
    assert_rejected_by_both::<TaskResult>(&validator, &bad_error, "an error without message");
}

#[test]
fn invalid_heartbeats_are_rejected_by_schema_and_serde() {
    let validator = validator(schemas::HEARTBEAT);
    let valid = serde_json::to_value(&sample_heartbeats()[1]).unwrap();
    for (doc, why) in invalid_variants(&valid, "task") {
        assert_rejected_by_both::<Heartbeat>(&validator, &doc, &why);
    }
    let mut bad_task = valid.clone();
    bad_task["tasks"][0]["agent"] = json!("echo");
    assert_rejected_by_both::<Heartbeat>(&validator, &bad_task, "an unknown held-task field");
}

/// Constraints the schema states beyond what serde checks: a worker written against the schema
/// is held to them.
#[test]
fn schema_constraints_beyond_serde() {
    let task = validator(schemas::TASK);
    let valid = serde_json::to_value(sample_task()).unwrap();

    let mut doc = valid.clone();
    doc["attempt"] = json!(0);
    assert!(!task.is_valid(&doc), "attempt 0 accepted");

    let mut doc = valid.clone();
    doc["v"] = json!(2);
    assert!(!task.is_valid(&doc), "version 2 accepted");

    let mut doc = valid.clone();
    doc["task_id"] = json!("not-a-uuid");
    assert!(!task.is_valid(&doc), "malformed uuid accepted");
    assert!(serde_json::from_value::<Task>(doc).is_err());

    let mut doc = valid;
    doc["dispatched_at"] = json!("yesterday");
    assert!(!task.is_valid(&doc), "malformed date-time accepted");
    assert!(serde_json::from_value::<Task>(doc).is_err());
}

/// The examples in the README are valid messages: a worker author may copy them.
#[test]
fn readme_examples_are_valid() {
    let readme = include_str!("../README.md");
    let examples: Vec<Value> = readme
        .split("```json\n")
        .skip(1)
        .map(|block| {
            let json = &block[..block.find("```").expect("closed code block")];
            serde_json::from_str(json).unwrap_or_else(|e| panic!("invalid JSON {json}: {e}"))
        })
        .collect();
    assert_eq!(examples.len(), 8);
    for example in examples {
        let (schema, parsed) = match example["type"].as_str() {
            Some("task") => (
                schemas::TASK,
                serde_json::from_value::<Task>(example.clone()).err(),
            ),
            Some("result") => (
                schemas::RESULT,
                serde_json::from_value::<TaskResult>(example.clone()).err(),
            ),
            Some("heartbeat") => (
                schemas::HEARTBEAT,
                serde_json::from_value::<Heartbeat>(example.clone()).err(),
            ),
            Some("cancel") => (
                schemas::CANCEL,
                serde_json::from_value::<Cancel>(example.clone()).err(),
            ),
            Some("registration") => (
                schemas::REGISTRATION,
                serde_json::from_value::<Registration>(example.clone()).err(),
            ),
            Some("deregistration") => (
                schemas::DEREGISTRATION,
                serde_json::from_value::<Deregistration>(example.clone()).err(),
            ),
            Some("log") => (
                schemas::LOG,
                serde_json::from_value::<LogBatch>(example.clone()).err(),
            ),
            other => panic!("example of unknown type {other:?}"),
        };
        let errors = schema_errors(&validator(schema), &example);
        assert!(errors.is_empty(), "{example}: {errors:?}");
        assert!(parsed.is_none(), "{example}: {parsed:?}");
    }
}
