//! GitHub's rate limits: the `x-ratelimit-limit/remaining/reset` budget of every answer, the
//! `Retry-After` of a rate-limited one, and which 403/429 answers are rate limits at all. While a
//! limit is known to be in force, calls are refused before anything is sent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

use super::codec;
use super::transport::Answer;
use super::GitHubSource;
use crate::source::{RateLimit, SourceError};

/// How long to hold off after a secondary rate limit that gave no `Retry-After` (GitHub's docs:
/// "wait for at least one minute").
const SECONDARY_DEFAULT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub(super) struct Limits {
    /// The last budget seen in `x-ratelimit-*` headers.
    budget: Option<RateLimit>,
    /// A rate-limited answer (primary or secondary) holds calls off until then.
    blocked_until: Option<SystemTime>,
    /// GitHub's text from the last rate-limited answer.
    last_message: Option<String>,
}

impl GitHubSource {
    /// Refuses at once while a rate limit is known to be in force.
    pub(super) fn gate(&self) -> Result<(), SourceError> {
        let now = self.clock.now();
        let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let said = l
            .last_message
            .as_deref()
            .map(|m| format!("{m}; "))
            .unwrap_or_default();
        if let Some(b) = l.budget {
            if b.remaining == 0 && b.reset > now {
                return Err(SourceError::RateLimited {
                    until: b.reset,
                    status: None,
                    message: format!(
                        "{said}the rate-limit budget of {} requests is spent until its reset; \
                         nothing was sent",
                        b.limit
                    ),
                });
            }
        }
        if let Some(until) = l.blocked_until {
            if until > now {
                return Err(SourceError::RateLimited {
                    until,
                    status: None,
                    message: format!(
                        "{said}holding off after a rate-limited answer; nothing was sent"
                    ),
                });
            }
        }
        Ok(())
    }

    pub(super) fn record_budget(&self, headers: &HeaderMap) {
        let num = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(limit), Some(remaining), Some(reset)) = (
            num("x-ratelimit-limit"),
            num("x-ratelimit-remaining"),
            num("x-ratelimit-reset"),
        ) {
            let reset = UNIX_EPOCH + Duration::from_secs(reset);
            let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            l.budget = Some(RateLimit::new(limit, remaining, reset));
        }
    }

    /// The last budget seen, if any.
    pub(super) fn budget(&self) -> Option<RateLimit> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner()).budget
    }

    /// Classifies a 403 or 429: a rate limit (calls are held off until it passes), or a plain
    /// refusal (permissions).
    pub(super) fn refusal(&self, a: &Answer, status: Option<u16>, message: String) -> SourceError {
        match self.rate_limit_until(a, &message) {
            Some(until) => {
                let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
                l.last_message = Some(message.clone());
                SourceError::RateLimited {
                    until,
                    status,
                    message,
                }
            }
            None => SourceError::Rejected { status, message },
        }
    }

    /// GitHub's rules for a 403/429: `Retry-After` first; else a spent budget waits for its
    /// reset; else a secondary limit (or any 429) waits a minute. `None`: a plain 403
    /// (permissions).
    fn rate_limit_until(&self, a: &Answer, message: &str) -> Option<SystemTime> {
        let now = self.clock.now();
        let retry_after = a.header(http::header::RETRY_AFTER).and_then(|v| {
            v.trim()
                .parse::<u64>()
                .ok()
                .map(|s| now + Duration::from_secs(s))
                .or_else(|| codec::parse_http_date(v))
        });
        let spent = a
            .header("x-ratelimit-remaining")
            .is_some_and(|r| r.trim() == "0");
        let reset = a
            .header("x-ratelimit-reset")
            .and_then(|r| r.trim().parse::<u64>().ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        let lower = message.to_ascii_lowercase();
        let secondary = lower.contains("secondary rate limit") || lower.contains("abuse");
        let until = if let Some(t) = retry_after {
            Some(t)
        } else if spent && reset.is_some() {
            reset
        } else if secondary
            || a.status == StatusCode::TOO_MANY_REQUESTS
            || lower.contains("rate limit")
        {
            Some(now + SECONDARY_DEFAULT_WAIT)
        } else {
            None
        }?;
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.blocked_until = Some(l.blocked_until.map_or(until, |u| u.max(until)));
        Some(until)
    }
}
