//! Notifications of approval requests: a generic JSON POST, or Slack's
//! incoming-webhook shape. Each is sent from its own task and retried with
//! exponential backoff; a failure is logged and never holds up a session.

use std::time::Duration;

use serde_json::json;
use tracing::{debug, warn};

use super::Request;
use crate::config::{WebhookConfig, WebhookFormat};
use crate::runtime::Runtime;

/// Posts `what` happened to `request` to every configured webhook.
pub fn notify(runtime: &Runtime, request: &Request, what: &str) {
    let Some(config) = runtime.config.approvals.as_ref().map(|a| a.get_ref()) else {
        return;
    };
    let link = format!("{}/approvals/{}", config.base_url(), request.id);
    for hook in &config.webhooks {
        let body = body(hook.format, request, what, &link);
        let hook = hook.clone();
        tokio::spawn(async move { deliver(&hook, &body).await });
    }
}

/// The payload for one webhook.
pub fn body(format: WebhookFormat, request: &Request, what: &str, link: &str) -> serde_json::Value {
    match format {
        WebhookFormat::Json => json!({
            "event": what,
            "url": link,
            "request": request,
        }),
        WebhookFormat::Slack => {
            let headline = match what {
                "requested" => format!(
                    "*Approval needed* ({}) for `{}` on {}/{}",
                    request.id, request.principal, request.target, request.database
                ),
                other => format!("Approval {} {}", request.id, other.replace('_', " ")),
            };
            json!({
                "text": format!(
                    "{headline}\n```{}```\nRule {}: {}\n<{link}|Review it> or run `interceptor approvals approve {}`",
                    request.statement.replace("```", "'''"),
                    request.rule,
                    request.reason,
                    request.id
                ),
            })
        }
    }
}

/// Posts `body`, retrying failures with backoff from 1 s.
pub async fn deliver(hook: &WebhookConfig, body: &serde_json::Value) -> bool {
    let client = match client(hook) {
        Ok(c) => c,
        Err(e) => {
            warn!(url = %hook.url, "webhook not sent: {e}");
            return false;
        }
    };
    let attempts = hook.attempts.max(1);
    for attempt in 1..=attempts {
        match client.post(&hook.url).json(body).send().await {
            Ok(r) if r.status().is_success() => {
                debug!(url = %hook.url, attempt, "webhook delivered");
                return true;
            }
            Ok(r) => warn!(url = %hook.url, attempt, status = %r.status(), "webhook refused"),
            Err(e) => warn!(
                url = %hook.url,
                attempt,
                "webhook failed: {}",
                crate::oidc::error_chain(&e)
            ),
        }
        if attempt < attempts {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(6))).await;
        }
    }
    warn!(url = %hook.url, attempts, "webhook given up");
    false
}

fn client(hook: &WebhookConfig) -> anyhow::Result<reqwest::Client> {
    let tls = crate::tls::https_client_config(hook.ca_file.as_deref())?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()?)
}
