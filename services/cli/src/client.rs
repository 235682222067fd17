//! A typed client of the coordinator's HTTP API.

use std::time::Duration;

use flotilla_api_model::{
    ACTOR_HEADER, AgentHealth, AgentList, AuditPage, AuditQuery, BreakerList, BreakerSummary,
    CompleteRequest, CreatedToken, DeadLetterList, DeadLetterQuery, DefinitionDetail,
    DefinitionList, DefinitionSummary, DefinitionVersions, ErrorBody, ExecuteRequest,
    ExecuteResponse, HealthAudit, HealthAuditQuery, IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENT_REPLAYED_HEADER, LogQuery, MetricsSummary, NAMESPACE_HEADER, NewTokenRequest,
    OperateResponse, Operation, RedriveRequest, RedriveResponse, RegisterDefinitionRequest,
    RetryRequest, RunEventList, RunPage, RunQuery, RunReport, ScheduleList, ScheduleRequest,
    ScheduleSummary, StepLogs, Submitted, TokenList, TokenSummary, WorkflowResult,
};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use uuid::Uuid;

/// How long one request may take, connecting included. Requests are small; a coordinator that
/// takes longer than this is stuck, not busy.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one attempt of a submission may take. Shorter than other requests because asking
/// again under the same idempotency key is safe, and a submission is one short transaction.
const SUBMIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of an unexpected (non-API) error body to show.
const BODY_EXCERPT_CHARS: usize = 300;
/// The `error.code` of a request the coordinator understood but would not carry out, because the
/// state of what it names does not allow it.
const CONFLICT_CODE: &str = "conflict";

/// How a submission is repeated after a network failure: refused or dropped connections five
/// times within about 3 s, which rides out a coordinator restarting behind a proxy; attempts that
/// time out three times, so that a stuck coordinator is given up on after about 30 s, as long as
/// one plain request may take.
const EXECUTE_BACKOFF: Backoff = Backoff {
    attempts: 5,
    first_delay: Duration::from_millis(200),
    window: Duration::from_secs(30),
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not an http:// or https:// URL")]
    BadUrl(Url),
    #[error("FLOTILLA_API_TOKEN holds characters no HTTP header may carry")]
    BadCredential,
    #[error("the namespace holds characters no HTTP header may carry")]
    BadNamespace,
    #[error("could not set up the HTTP client")]
    Setup(#[source] reqwest::Error),
    #[error(
        "could not reach the Flotilla coordinator at {base}; is it running? Start it with \
         `flotilla-coordinator`, or point --url (or FLOTILLA_URL) at it"
    )]
    Unreachable {
        base: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("the coordinator at {base} did not answer within {}s", after.as_secs())]
    Timeout {
        base: Url,
        after: Duration,
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator refused the request; its message says why (e.g. every problem found in a
    /// definition).
    #[error("{0}")]
    Api(String),
    /// The coordinator understood the request but the state of what it names does not allow it
    /// (e.g. resuming a run that is not paused); the message says why.
    #[error("{0}")]
    Refused(String),
    /// Something answered that is not the coordinator's API (a proxy, another service).
    #[error("{url} answered {status}, not a Flotilla API response: {excerpt}")]
    UnexpectedAnswer {
        url: Url,
        status: StatusCode,
        excerpt: String,
    },
    #[error("the request to {url} failed")]
    Transport {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("could not read the answer of {url}")]
    Decode {
        url: Url,
        #[source]
        source: serde_json::Error,
    },
    /// A submission got no answer although it may have reached the coordinator: only the same
    /// idempotency key can tell whether it started a run without risking a second one.
    #[error(
        "no answer from the coordinator at {base} after {attempts} attempts, so whether the run \
         started is not known; the same command with `--idempotency-key {key}` prints the run if \
         it started, and starts it if not"
    )]
    Unanswered {
        base: Url,
        attempts: u32,
        key: String,
        #[source]
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Whether the request failed in the network (no connection, a connection lost, no answer
    /// in time) rather than being answered, so that sending it again may succeed.
    fn is_network(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Transport { source, .. } => source.is_request() || source.is_body(),
            _ => false,
        }
    }
}

/// Retries of a request that is safe to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    /// Attempts in all, the first one included.
    attempts: u32,
    /// The wait after the first failure; each later wait is twice the one before.
    first_delay: Duration,
    /// No attempt starts later than this after the first one started.
    window: Duration,
}

impl Backoff {
    /// The wait before the next attempt, once `made` attempts (at least one) have failed and
    /// `elapsed` has passed since the first started; `None` to give up.
    fn delay(&self, made: u32, elapsed: Duration) -> Option<Duration> {
        if made >= self.attempts {
            return None;
        }
        let delay = self
            .first_delay
            .checked_mul(2u32.checked_pow(made.saturating_sub(1))?)?;
        (elapsed + delay <= self.window).then_some(delay)
    }
}

/// A whole HTTP answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The coordinator's HTTP API.
pub struct Client {
    http: reqwest::Client,
    /// Ends with `/`, so that API paths extend it rather than replace its last segment.
    base: Url,
}

impl Client {
    /// A client of the API at `base`, sending `credential` (an API token or a JWT) as
    /// `Authorization: Bearer`, and `namespace` (checked) as the [`NAMESPACE_HEADER`], with
    /// every request.
    pub fn new(
        mut base: Url,
        credential: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Self, ClientError> {
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::BadUrl(base));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        // reqwest is built without a TLS crypto provider of its own and refuses to build a client
        // until the process has one. An error only says one is installed already, which serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = HeaderMap::new();
        if let Some(credential) = credential {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", credential.trim()))
                .map_err(|_| ClientError::BadCredential)?;
            // Kept out of any debug output of the request.
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        if let Some(namespace) = namespace {
            let value = HeaderValue::from_str(namespace).map_err(|_| ClientError::BadNamespace)?;
            headers.insert(NAMESPACE_HEADER, value);
        }
        // Each request sets its own timeout (see `exchange`).
        let http = reqwest::Client::builder()
            .user_agent(concat!("flotilla-cli/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Self { http, base })
    }

    /// Submits a run under an idempotency key. A request that fails in the network is sent again
    /// with the same key (see [`EXECUTE_BACKOFF`]), so that a request whose answer was lost is
    /// answered with the run it started rather than starting a second one.
    pub async fn execute(
        &self,
        request: &ExecuteRequest,
        key: &str,
    ) -> Result<Submitted, ClientError> {
        let url = self.url(&["workflows", "execute"]);
        let build = || {
            self.http
                .post(url.clone())
                .header(IDEMPOTENCY_KEY_HEADER, key)
                .json(request)
        };
        let started = Instant::now();
        let mut made = 0;
        // Whether a failed attempt may have reached the coordinator (and started the run).
        let mut maybe_delivered = false;
        let answer = loop {
            made += 1;
            let err = match self.exchange(build(), &url, SUBMIT_ATTEMPT_TIMEOUT).await {
                Ok(answer) => break answer,
                Err(err) if err.is_network() => err,
                Err(err) => return Err(err),
            };
            // A connection that could not be made carried nothing; anything later may have.
            maybe_delivered |= !matches!(err, ClientError::Unreachable { .. });
            match EXECUTE_BACKOFF.delay(made, started.elapsed()) {
                Some(delay) => tokio::time::sleep(delay).await,
                None if maybe_delivered => {
                    return Err(ClientError::Unanswered {
                        base: self.base.clone(),
                        attempts: made,
                        key: key.to_string(),
                        last: Box::new(err),
                    });
                }
                None => return Err(err),
            }
        };
        let replayed = answer
            .headers
            .get(IDEMPOTENT_REPLAYED_HEADER)
            .is_some_and(|value| value == "true");
        let ExecuteResponse { workflow_id } = decode(answer, url)?;
        Ok(Submitted {
            workflow_id,
            replayed,
        })
    }

    pub async fn run(&self, id: Uuid) -> Result<WorkflowResult, ClientError> {
        let url = self.url(&["workflows", &id.to_string()]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn runs(&self, query: &RunQuery) -> Result<RunPage, ClientError> {
        let mut url = self.url(&["workflows"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(status) = &query.status {
                pairs.append_pair("status", status);
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = &query.cursor {
                pairs.append_pair("cursor", cursor);
            }
        }
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn register_definition(
        &self,
        request: &RegisterDefinitionRequest,
    ) -> Result<DefinitionSummary, ClientError> {
        let url = self.url(&["definitions"]);
        self.send(self.http.post(url.clone()).json(request), url)
            .await
    }

    pub async fn definitions(&self) -> Result<DefinitionList, ClientError> {
        let url = self.url(&["definitions"]);
        self.send(self.http.get(url.clone()), url).await
    }

    /// Definition `name`: its latest revision, or the one `version` names.
    pub async fn definition(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<DefinitionDetail, ClientError> {
        let mut url = self.url(&["definitions", name]);
        if let Some(version) = version {
            url.query_pairs_mut().append_pair("version", version);
        }
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn definition_versions(&self, name: &str) -> Result<DefinitionVersions, ClientError> {
        let url = self.url(&["definitions", name, "versions"]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<DeadLetterList, ClientError> {
        let mut url = self.url(&["dlq"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(pending) = query.pending {
                pairs.append_pair("pending", &pending.to_string());
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
        }
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn breakers(&self) -> Result<BreakerList, ClientError> {
        let url = self.url(&["agents", "breakers"]);
        self.send(self.http.get(url.clone()), url).await
    }

    /// Closes `agent`'s circuit breaker, recorded as done by `actor` (visible ASCII).
    pub async fn reset_breaker(
        &self,
        agent: &str,
        actor: &str,
    ) -> Result<BreakerSummary, ClientError> {
        let url = self.url(&["agents", agent, "breaker", "reset"]);
        self.send(self.http.post(url.clone()).header(ACTOR_HEADER, actor), url)
            .await
    }

    /// Not repeated after a network failure: a repeat would report the dead letters the lost
    /// request retried as "not pending", which reads as a failure.
    pub async fn redrive(&self, request: &RedriveRequest) -> Result<RedriveResponse, ClientError> {
        let url = self.url(&["dlq", "redrive"]);
        self.send(self.http.post(url.clone()).json(request), url)
            .await
    }

    /// Carries out an operator's action on run `id`, recorded as done by `actor` (visible ASCII).
    ///
    /// Not repeated after a network failure: the lost request may have been carried out, and
    /// its repeat would then be refused (resuming a resumed run) or, worse, done a second time
    /// (retrying the run again).
    pub async fn operate(
        &self,
        id: Uuid,
        operation: &Operation,
        actor: &str,
    ) -> Result<OperateResponse, ClientError> {
        let run = id.to_string();
        let action = operation.action();
        let url = match operation {
            Operation::Skip { step } | Operation::Complete { step, .. } => {
                self.url(&["workflows", &run, "steps", step, action])
            }
            Operation::Cancel
            | Operation::Pause
            | Operation::Resume
            | Operation::Retry { .. }
            | Operation::Rollback => self.url(&["workflows", &run, action]),
        };
        let request = self.http.post(url.clone()).header(ACTOR_HEADER, actor);
        let request = match operation {
            Operation::Retry { step } => request.json(&RetryRequest { step: step.clone() }),
            Operation::Complete { output, .. } => request.json(&CompleteRequest {
                output: output.clone(),
            }),
            Operation::Cancel
            | Operation::Pause
            | Operation::Resume
            | Operation::Skip { .. }
            | Operation::Rollback => request,
        };
        self.send(request, url).await
    }

    pub async fn agents(&self) -> Result<AgentList, ClientError> {
        let url = self.url(&["agents"]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn agent_health(&self, name: &str) -> Result<AgentHealth, ClientError> {
        let url = self.url(&["agents", name, "health"]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn schedules(&self) -> Result<ScheduleList, ClientError> {
        let url = self.url(&["schedules"]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn add_schedule(
        &self,
        request: &ScheduleRequest,
    ) -> Result<ScheduleSummary, ClientError> {
        let url = self.url(&["schedules"]);
        self.send(self.http.post(url.clone()).json(request), url)
            .await
    }

    /// Removes schedule `id`; the answer has no body.
    pub async fn remove_schedule(&self, id: &str) -> Result<(), ClientError> {
        let url = self.url(&["schedules", id]);
        let answer = self
            .exchange(self.http.delete(url.clone()), &url, REQUEST_TIMEOUT)
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(failure(answer.status, &answer.body, url))
        }
    }

    pub async fn report(&self, id: Uuid) -> Result<RunReport, ClientError> {
        let url = self.url(&["workflows", &id.to_string(), "report"]);
        self.send(self.http.get(url.clone()), url).await
    }

    /// Lines of run `id`'s step logs, as `query` asks; with `wait`, the request lasts that much
    /// longer.
    pub async fn logs(&self, id: Uuid, query: &LogQuery) -> Result<StepLogs, ClientError> {
        let mut url = self.url(&["workflows", &id.to_string(), "logs"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(step) = &query.step {
                pairs.append_pair("step", step);
            }
            let numbers = [
                ("attempt", query.attempt),
                ("limit", query.limit),
                ("wait", query.wait),
            ];
            for (name, value) in numbers {
                if let Some(value) = value {
                    pairs.append_pair(name, &value.to_string());
                }
            }
            if let Some(after) = query.after {
                pairs.append_pair("after", &after.to_string());
            }
        }
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(u64::from(query.wait.unwrap_or(0)));
        let answer = self
            .exchange(self.http.get(url.clone()), &url, timeout)
            .await?;
        decode(answer, url)
    }

    /// The history of run `id`, oldest first.
    pub async fn events(&self, id: Uuid) -> Result<RunEventList, ClientError> {
        let url = self.url(&["workflows", &id.to_string(), "events"]);
        self.send(self.http.get(url.clone()), url).await
    }

    /// The fleet audit (`GET /api/health/audit`).
    pub async fn health_audit(&self, query: &HealthAuditQuery) -> Result<HealthAudit, ClientError> {
        let mut url = self.url(&["health", "audit"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(window) = &query.window {
                pairs.append_pair("window", window);
            }
            for (name, value) in [
                ("maxErrorRate", query.max_error_rate),
                ("maxP95Ms", query.max_p95_ms),
                ("maxPoolUse", query.max_pool_use),
                ("maxFailoverSecs", query.max_failover_secs),
            ] {
                if let Some(value) = value {
                    pairs.append_pair(name, &value.to_string());
                }
            }
        }
        self.send(self.http.get(url.clone()), url).await
    }

    /// The attempts that ended over `range` (e.g. `1h`), from `/api/metrics/summary`.
    pub async fn metrics_summary(&self, range: &str) -> Result<MetricsSummary, ClientError> {
        let mut url = self.url(&["metrics", "summary"]);
        url.query_pairs_mut().append_pair("range", range);
        self.send(self.http.get(url.clone()), url).await
    }

    /// The coordinator's metrics, in the Prometheus text format (`{base}/metrics`).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("`new` admits only http(s) URLs, which have a path")
            .pop_if_empty()
            .push("metrics");
        let answer = self
            .exchange(self.http.get(url.clone()), &url, REQUEST_TIMEOUT)
            .await?;
        if !answer.status.is_success() {
            return Err(failure(answer.status, &answer.body, url));
        }
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    pub async fn create_token(
        &self,
        request: &NewTokenRequest,
    ) -> Result<CreatedToken, ClientError> {
        let url = self.url(&["tokens"]);
        self.send(self.http.post(url.clone()).json(request), url)
            .await
    }

    pub async fn tokens(&self) -> Result<TokenList, ClientError> {
        let url = self.url(&["tokens"]);
        self.send(self.http.get(url.clone()), url).await
    }

    pub async fn revoke_token(&self, id: Uuid) -> Result<TokenSummary, ClientError> {
        let url = self.url(&["tokens", &id.to_string()]);
        self.send(self.http.delete(url.clone()), url).await
    }

    pub async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, ClientError> {
        let mut url = self.url(&["audit"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(since) = query.since {
                pairs.append_pair("since", &since.to_rfc3339());
            }
            if let Some(actor) = &query.actor {
                pairs.append_pair("actor", actor);
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = query.cursor {
                pairs.append_pair("cursor", &cursor.to_string());
            }
        }
        self.send(self.http.get(url.clone()), url).await
    }

    /// `{base}/api/{segments...}`, each segment escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("`new` admits only http(s) URLs, which have a path")
            .pop_if_empty()
            .push("api")
            .extend(segments);
        url
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        url: Url,
    ) -> Result<T, ClientError> {
        let answer = self.exchange(request, &url, REQUEST_TIMEOUT).await?;
        decode(answer, url)
    }

    /// Sends the request and reads the whole answer, whatever its status, within `timeout`:
    /// every error here is one of the network (or of a request that cannot be built).
    async fn exchange(
        &self,
        request: RequestBuilder,
        url: &Url,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let failed = |source: reqwest::Error| {
            if source.is_connect() {
                ClientError::Unreachable {
                    base: self.base.clone(),
                    source,
                }
            } else if source.is_timeout() {
                ClientError::Timeout {
                    base: self.base.clone(),
                    after: timeout,
                    source,
                }
            } else {
                ClientError::Transport {
                    url: url.clone(),
                    source,
                }
            }
        };
        let response = request.timeout(timeout).send().await.map_err(failed)?;
        let status = response.status();
        let headers = response.headers().clone();
        // An answer cut off halfway is as lost as one that never came.
        let body = response.bytes().await.map_err(failed)?;
        Ok(Answer {
            status,
            headers,
            body: body.into(),
        })
    }
}

/// The answer's JSON on success; otherwise the coordinator's error message.
fn decode<T: DeserializeOwned>(answer: Answer, url: Url) -> Result<T, ClientError> {
    let Answer { status, body, .. } = answer;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|source| ClientError::Decode { url, source });
    }
    Err(failure(status, &body, url))
}

/// The coordinator's error message of an answer that is not a success.
fn failure(status: StatusCode, body: &[u8], url: Url) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) if error.code == CONFLICT_CODE => {
            ClientError::Refused(error.message)
        }
        Ok(ErrorBody { error }) => ClientError::Api(error.message),
        Err(_) => ClientError::UnexpectedAnswer {
            url,
            status,
            excerpt: String::from_utf8_lossy(body)
                .chars()
                .take(BODY_EXCERPT_CHARS)
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(base.parse().unwrap(), None, None).unwrap()
    }

    #[test]
    fn api_paths_extend_the_base_url() {
        assert_eq!(
            client("http://127.0.0.1:3020").url(&["workflows"]).as_str(),
            "http://127.0.0.1:3020/api/workflows"
        );
        assert_eq!(
            client("https://ops.example/flotilla")
                .url(&["workflows", "execute"])
                .as_str(),
            "https://ops.example/flotilla/api/workflows/execute"
        );
        assert_eq!(
            client("https://ops.example/flotilla/")
                .url(&["definitions"])
                .as_str(),
            "https://ops.example/flotilla/api/definitions"
        );
        // A step id is one segment, whatever it holds.
        assert_eq!(
            client("http://127.0.0.1:3020")
                .url(&["workflows", "r", "steps", "a/b c?", "skip"])
                .as_str(),
            "http://127.0.0.1:3020/api/workflows/r/steps/a%2Fb%20c%3F/skip"
        );
    }

    #[test]
    fn submissions_back_off_doubling_within_attempts_and_window() {
        let at = Duration::from_millis;
        let delays: Vec<Option<Duration>> = (1..=5)
            .map(|made| EXECUTE_BACKOFF.delay(made, Duration::ZERO))
            .collect();
        assert_eq!(
            delays,
            [
                Some(at(200)),
                Some(at(400)),
                Some(at(800)),
                Some(at(1600)),
                None
            ]
        );
        // No attempt starts after the window, however few were made: attempts that time out
        // are made three times.
        let timed_out = |n: u32| SUBMIT_ATTEMPT_TIMEOUT * n;
        assert_eq!(EXECUTE_BACKOFF.delay(1, timed_out(1)), Some(at(200)));
        assert_eq!(
            EXECUTE_BACKOFF.delay(2, timed_out(2) + at(200)),
            Some(at(400))
        );
        assert_eq!(EXECUTE_BACKOFF.delay(3, timed_out(3) + at(600)), None);
        assert_eq!(EXECUTE_BACKOFF.delay(1, at(29_800)), Some(at(200)));
        assert_eq!(EXECUTE_BACKOFF.delay(1, at(29_801)), None);
    }

    #[test]
    fn only_http_urls_are_accepted() {
        let err = Client::new("ftp://example/".parse().unwrap(), None, None)
            .err()
            .expect("ftp is refused");
        assert!(matches!(err, ClientError::BadUrl(_)), "{err}");
    }
}
