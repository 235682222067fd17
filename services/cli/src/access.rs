//! `flotilla tokens` and `flotilla audit`.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use flotilla_api_model::{AuditPage, AuditQuery, NewTokenRequest, TokenList};
use uuid::Uuid;

use crate::cli::Output;
use crate::client::Client;
use crate::commands::{Outcome, print_json};
use crate::out::{out, outln};
use crate::render::{table, time};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token and print its value, which is shown only this once.
    Create {
        /// Who or what holds it; recorded as the actor of what it does.
        name: String,
        /// What it may do: read, execute, operate or admin (admin implies the others); repeat
        /// for several.
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Let it see every namespace (`*`); without this, it sees the namespace of
        /// --namespace (FLOTILLA_NAMESPACE), or else the creating credential's.
        #[arg(long)]
        all_namespaces: bool,
    },
    /// List the tokens (never their values).
    List,
    /// Revoke a token: it is refused from now on.
    Revoke {
        /// The token's id, as `tokens list` shows it.
        id: Uuid,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries at or after this time (RFC 3339, e.g. 2026-01-31T12:00:00Z).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Only entries of this actor (a token's name or a JWT's subject).
    #[arg(long)]
    actor: Option<String>,
    /// At most this many (1 to 500; the coordinator's default is 50).
    #[arg(long)]
    limit: Option<u32>,
    /// Continue after an earlier page: the cursor it printed.
    #[arg(long)]
    cursor: Option<i64>,
}

pub async fn tokens(
    client: &Client,
    command: TokensCommand,
    output: Output,
) -> anyhow::Result<Outcome> {
    match command {
        TokensCommand::Create {
            name,
            scopes,
            all_namespaces,
        } => {
            let namespaces = if all_namespaces {
                vec!["*".to_string()]
            } else {
                Vec::new()
            };
            let created = client
                .create_token(&NewTokenRequest {
                    name,
                    scopes,
                    namespaces,
                })
                .await?;
            match output {
                Output::Text => {
                    eprintln!(
                        "created token {} ({}; namespaces {}); its value is shown only this once:",
                        created.summary.id,
                        created.summary.scopes.join(" "),
                        created.summary.namespaces.join(" ")
                    );
                    outln!("{}", created.token);
                }
                Output::Json => print_json(&created)?,
            }
        }
        TokensCommand::List => {
            let list = client.tokens().await?;
            match output {
                Output::Text => out!("{}", render_tokens(&list)),
                Output::Json => print_json(&list)?,
            }
        }
        TokensCommand::Revoke { id } => {
            let revoked = client
                .revoke_token(id)
                .await
                .with_context(|| format!("revoking token {id}"))?;
            match output {
                Output::Text => outln!("revoked token {} ({})", revoked.id, revoked.name),
                Output::Json => print_json(&revoked)?,
            }
        }
    }
    Ok(Outcome::Done)
}

pub async fn audit(client: &Client, args: AuditArgs, output: Output) -> anyhow::Result<Outcome> {
    let AuditArgs {
        since,
        actor,
        limit,
        cursor,
    } = args;
    let page = client
        .audit(&AuditQuery {
            since,
            actor,
            limit,
            cursor,
        })
        .await?;
    match output {
        Output::Text => out!("{}", render_audit(&page)),
        Output::Json => print_json(&page)?,
    }
    Ok(Outcome::Done)
}

fn render_tokens(list: &TokenList) -> String {
    if list.tokens.is_empty() {
        return "no tokens\n".to_string();
    }
    let rows = list
        .tokens
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.name.clone(),
                t.scopes.join(" "),
                t.namespaces.join(" "),
                time(t.created_at),
                t.last_used_at.map(time).unwrap_or_default(),
                t.revoked_at.map(time).unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "SCOPES",
            "NAMESPACES",
            "CREATED",
            "LAST USED",
            "REVOKED",
        ],
        rows,
    )
}

fn render_audit(page: &AuditPage) -> String {
    if page.entries.is_empty() {
        return "no audit entries\n".to_string();
    }
    let rows = page
        .entries
        .iter()
        .map(|e| {
            let target: Vec<String> = e
                .target
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            vec![
                time(e.at),
                e.actor.clone(),
                e.action.clone(),
                target.join(" "),
                e.status.to_string(),
                e.peer.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(&["AT", "ACTOR", "ACTION", "TARGET", "STATUS", "FROM"], rows);
    if let Some(cursor) = page.next_cursor {
        out.push_str(&format!("more: --cursor {cursor}\n"));
    }
    out
}
