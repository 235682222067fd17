//! `notify:` steps: the coordinator serves the notify agent itself and posts each message as
//! Slack-compatible JSON to the webhook configured for its channel.

use std::time::Duration;

use flotilla_worker::{HandlerError, TaskContext};
use serde_json::{Value, json};

/// The environment variable that holds the webhook URL of a channel: `slack` →
/// `FLOTILLA_NOTIFY_SLACK_URL`.
pub fn url_variable(channel: &str) -> String {
    let name: String = channel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("FLOTILLA_NOTIFY_{name}_URL")
}

/// Posts one notification.
pub async fn handle(http: reqwest::Client, ctx: TaskContext) -> Result<Value, HandlerError> {
    let channel = ctx
        .params()
        .get("channel")
        .and_then(Value::as_str)
        .ok_or_else(|| HandlerError::fatal("notify: the step has no channel"))?
        .to_string();
    let variable = url_variable(&channel);
    let url = std::env::var(&variable).map_err(|_| {
        HandlerError::fatal(format!(
            "notify: no webhook is configured for channel `{channel}`: set {variable} on the coordinator"
        ))
    })?;
    let task = ctx.task();
    let text = ctx
        .params()
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(
            || format!("Flotilla run {} failed", task.run_id),
            str::to_string,
        );
    let body = json!({
        "text": text,
        "channel": channel,
        "workflowId": task.run_id,
        // An escalation's notice names the step that escalated.
        "stepId": ctx.params().get("step").and_then(Value::as_str).unwrap_or(&task.step_id),
        "params": task.run_params,
    });
    let response = http
        .post(&url)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            HandlerError::retryable(format!(
                "notify: posting to channel `{channel}` failed: {}",
                e.without_url()
            ))
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(json!({"channel": channel, "status": status.as_u16()}))
    } else if status.is_server_error() || status.as_u16() == 429 {
        Err(HandlerError::retryable(format!(
            "notify: the `{channel}` webhook answered {status}"
        )))
    } else {
        Err(HandlerError::fatal(format!(
            "notify: the `{channel}` webhook answered {status}"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn channel_names_map_to_variables() {
        assert_eq!(super::url_variable("slack"), "FLOTILLA_NOTIFY_SLACK_URL");
        assert_eq!(
            super::url_variable("ops-team"),
            "FLOTILLA_NOTIFY_OPS_TEAM_URL"
        );
    }
}
