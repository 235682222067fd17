//! A typed client of the coordinator's HTTP API.

use std::time::Duration;

use flotilla_api_model::{
    DefinitionList, DefinitionSummary, ErrorBody, ExecuteRequest, ExecuteResponse,
    RegisterDefinitionRequest, RunPage, RunQuery, WorkflowResult,
};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// How long one request may take, connecting included. Requests are small; a coordinator that
/// takes longer than this is stuck, not busy.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an unexpected (non-API) error body to show.
const BODY_EXCERPT_CHARS: usize = 300;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not an http:// or https:// URL")]
    BadUrl(Url),
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
    #[error("the coordinator at {base} did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        base: Url,
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator refused the request; its message says why (e.g. every problem found in a
    /// definition).
    #[error("{0}")]
    Api(String),
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
        source: reqwest::Error,
    },
}

/// The coordinator's HTTP API.
pub struct Client {
    http: reqwest::Client,
    /// Ends with `/`, so that API paths extend it rather than replace its last segment.
    base: Url,
}

impl Client {
    pub fn new(mut base: Url) -> Result<Self, ClientError> {
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
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("flotilla-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Self { http, base })
    }

    pub async fn execute(&self, request: &ExecuteRequest) -> Result<ExecuteResponse, ClientError> {
        let url = self.url(&["workflows", "execute"]);
        self.send(self.http.post(url.clone()).json(request), url)
            .await
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
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable {
                    base: self.base.clone(),
                    source,
                }
            } else if source.is_timeout() {
                ClientError::Timeout {
                    base: self.base.clone(),
                    source,
                }
            } else {
                ClientError::Transport {
                    url: url.clone(),
                    source,
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return response
                .json()
                .await
                .map_err(|source| ClientError::Decode { url, source });
        }
        let text = response
            .text()
            .await
            .map_err(|source| ClientError::Decode {
                url: url.clone(),
                source,
            })?;
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(ErrorBody { error }) => ClientError::Api(error.message),
            Err(_) => ClientError::UnexpectedAnswer {
                url,
                status,
                excerpt: text.chars().take(BODY_EXCERPT_CHARS).collect(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(base.parse().unwrap()).unwrap()
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
    }

    #[test]
    fn only_http_urls_are_accepted() {
        let err = Client::new("ftp://example/".parse().unwrap())
            .err()
            .expect("ftp is refused");
        assert!(matches!(err, ClientError::BadUrl(_)), "{err}");
    }
}
