//! What every HTTP request latentflow makes has in common: a user agent naming latentflow (so
//! site owners can tell who fetches, as img2dataset does) and bounded redirects.

use std::time::Duration;

/// The `User-Agent` of every request.
pub const USER_AGENT: &str =
    concat!("latentflow/", env!("CARGO_PKG_VERSION"), " (+https://example.invalid/latentflow; image-dataset loader)");

/// The client of `url_source`: `timeout` bounds each whole request, body included.
pub fn client(timeout: Duration, max_redirects: usize, concurrency: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(concurrency)
        .redirect(reqwest::redirect::Policy::limited(max_redirects))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}

/// A blocking client for streamed downloads (webdataset shards): `timeout` bounds connecting
/// and each read of the body (reqwest's blocking client applies it per operation), not the
/// whole body, so a large shard can take as long as it needs.
pub fn blocking_client(timeout: Duration, max_redirects: usize) -> Result<reqwest::blocking::Client, String> {
    reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(max_redirects))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))
}

/// A short, stable reason for a failed request, as rejections name it: `timeout`, `connect`,
/// `too_many_redirects`, `http_404`, `http_5xx` (all server errors), `http_4xx` for the rarer
/// client errors, else `http_error`.
///
/// ```
/// assert_eq!(latentflow_operators::http::status_reason(404), "http_404");
/// assert_eq!(latentflow_operators::http::status_reason(503), "http_5xx");
/// ```
pub fn status_reason(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        401 => "http_401",
        403 => "http_403",
        404 => "http_404",
        410 => "http_410",
        429 => "http_429",
        402 | 405..=409 | 411..=428 | 430..=499 => "http_4xx",
        500..=599 => "http_5xx",
        _ => "http_status",
    }
}

/// The reason for a transport error.
pub fn error_reason(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_redirect() {
        "too_many_redirects"
    } else if error.is_connect() {
        "connect"
    } else if let Some(status) = error.status() {
        status_reason(status.as_u16())
    } else if error.is_body() || error.is_decode() {
        "truncated_body"
    } else {
        "http_error"
    }
}

/// The full text of a transport error, with its causes (reqwest's own message is only the top).
pub fn error_text(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
