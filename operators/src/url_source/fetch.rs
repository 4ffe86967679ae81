//! Downloading one image: bounded time (`timeout_s` for the whole request), bounded bytes (stop
//! reading past `max_bytes`), retries with exponential backoff for timeouts, 429 and 5xx (never
//! for other 4xx), img2dataset's opt-out courtesy (`X-Robots-Tag: noai` / `noimageai`), and a
//! check that the body is an image. Every failure has a short, stable reason.

use std::time::Duration;

use latentflow_engine::ByteBudget;
use reqwest::header::{HeaderMap, RETRY_AFTER};

const X_ROBOTS_TAG: &str = "x-robots-tag";

use crate::http::{error_reason, error_text, status_reason};

/// How images are fetched.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Retries after the first attempt, for timeouts, 429 and 5xx.
    pub retries: u32,
    /// Delay before the first retry; each later one doubles it (a server's `Retry-After` of up
    /// to 10 s is honoured instead).
    pub backoff: Duration,
    /// Bodies past this many bytes are `too_large`.
    pub max_bytes: u64,
    /// Skip responses whose `X-Robots-Tag` says `noai` or `noimageai`.
    pub skip_noai: bool,
}

/// Why a download produced no image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `http_404`, `http_5xx`, `timeout`, `too_large`, `too_many_redirects`, `connect`, `noai`,
    /// `not_an_image`, ...
    pub reason: &'static str,
    /// What happened, for the log.
    pub detail: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Failure { reason, detail: detail.into(), retry_after: None }
    }

    fn retriable(&self) -> bool {
        matches!(self.reason, "timeout" | "http_429" | "http_5xx")
    }
}

/// The image at `url`, and how many retries it took. Bytes read count against `budget` while
/// the download runs; on success the caller releases them once it hands the image on.
pub async fn fetch(
    client: &reqwest::Client,
    url: &str,
    options: &FetchOptions,
    budget: &ByteBudget,
) -> (Result<Vec<u8>, Failure>, u32) {
    let mut retries = 0;
    loop {
        match attempt(client, url, options, budget).await {
            Err(failure) if failure.retriable() && retries < options.retries => {
                let backoff = options.backoff * 2u32.saturating_pow(retries);
                tokio::time::sleep(failure.retry_after.unwrap_or(backoff)).await;
                retries += 1;
            }
            outcome => return (outcome, retries),
        }
    }
}

async fn attempt(
    client: &reqwest::Client,
    url: &str,
    options: &FetchOptions,
    budget: &ByteBudget,
) -> Result<Vec<u8>, Failure> {
    let mut response = client.get(url).send().await.map_err(|e| Failure::new(error_reason(&e), error_text(&e)))?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let mut failure = Failure::new(status_reason(status), format!("HTTP {status}"));
        failure.retry_after = retry_after(response.headers());
        return Err(failure);
    }
    if options.skip_noai {
        if let Some(tag) = opted_out(response.headers()) {
            return Err(Failure::new("noai", format!("X-Robots-Tag: {tag}")));
        }
    }
    if let Some(length) = response.content_length().filter(|&l| l > options.max_bytes) {
        return Err(Failure::new("too_large", format!("Content-Length {length} > {}", options.max_bytes)));
    }
    let mut body = Vec::new();
    let mut held = Held { budget, bytes: 0 };
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > options.max_bytes {
                    return Err(Failure::new("too_large", format!("more than {} bytes", options.max_bytes)));
                }
                held.add(chunk.len() as u64);
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::new(error_reason(&e), error_text(&e))),
        }
    }
    match image::guess_format(&body) {
        Ok(image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP) => {
            held.keep();
            Ok(body)
        }
        _ => {
            let start = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
            Err(Failure::new("not_an_image", format!("{} bytes starting {start:?}", body.len())))
        }
    }
}

/// Bytes held against the budget, released on drop unless kept.
struct Held<'a> {
    budget: &'a ByteBudget,
    bytes: u64,
}

impl Held<'_> {
    fn add(&mut self, bytes: u64) {
        self.budget.hold(bytes);
        self.bytes += bytes;
    }

    fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// The `X-Robots-Tag` value that opts out of AI training, if any (`noai`, `noimageai`, possibly
/// scoped to a user agent as `otherbot: noai`).
fn opted_out(headers: &HeaderMap) -> Option<String> {
    headers.get_all(X_ROBOTS_TAG).iter().filter_map(|v| v.to_str().ok()).find_map(|value| {
        let lower = value.to_ascii_lowercase();
        let says = lower.split([',', ':', ' ']).map(str::trim).any(|d| d == "noai" || d == "noimageai");
        says.then(|| value.to_string())
    })
}

/// A `Retry-After` in seconds, when it is at most 10 s.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (seconds <= 10).then(|| Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robots_tags_that_opt_out() {
        let tags = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(X_ROBOTS_TAG, v.parse().unwrap());
            opted_out(&h)
        };
        assert!(tags("noai").is_some());
        assert!(tags("noindex, NoImageAI").is_some());
        assert!(tags("otherbot: noai").is_some());
        assert!(tags("noindex, nofollow").is_none());
        assert!(tags("noairplane").is_none());
    }
}
