//! GitHub's rate limits: the `x-ratelimit-limit/remaining/reset` budget of every answer, the
//! `Retry-After` of a rate-limited one, and which 403/429 answers are rate limits at all. While a
//! limit is known to be in force, calls are refused before anything is sent.
//!
//! REST and GraphQL have separate primary budgets (GitHub names the one an answer counted
//! against in `x-ratelimit-resource`: `core` for REST, `graphql` for GraphQL): each is kept on
//! its own, and a spent GraphQL budget holds off GraphQL requests only. Secondary rate limits are
//! shared by both APIs, so a `Retry-After` holds off both.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

use super::codec;
use super::transport::Answer;
use super::GitHubSource;
use crate::source::{RateLimit, SourceError};

/// How long to hold off after a secondary rate limit that gave no `Retry-After` (GitHub's docs:
/// "wait for at least one minute").
const SECONDARY_DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Which of GitHub's APIs a request goes to: each has its own primary budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    /// The REST API (`x-ratelimit-resource: core`).
    Rest,
    /// The GraphQL API (`x-ratelimit-resource: graphql`).
    Graphql,
}

#[derive(Debug, Default)]
pub(super) struct Limits {
    /// The last REST budget seen in `x-ratelimit-*` headers (any resource but `graphql`).
    budget: Option<RateLimit>,
    /// The last GraphQL budget seen (`x-ratelimit-resource: graphql`).
    graphql_budget: Option<RateLimit>,
    /// A rate-limited answer (a secondary limit, or REST's primary one) holds calls off until
    /// then.
    blocked_until: Option<SystemTime>,
    /// GraphQL's primary limit holds GraphQL requests (only) off until then.
    graphql_blocked_until: Option<SystemTime>,
    /// GitHub's text from the last rate-limited answer.
    last_message: Option<String>,
}

impl GitHubSource {
    /// Refuses at once while a rate limit on `api` is known to be in force.
    pub(super) fn gate(&self, api: Api) -> Result<(), SourceError> {
        let now = self.clock.now();
        let l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let said = l
            .last_message
            .as_deref()
            .map(|m| format!("{m}; "))
            .unwrap_or_default();
        let (budget, what, unit) = match api {
            Api::Rest => (l.budget, "rate-limit budget", "requests"),
            Api::Graphql => (l.graphql_budget, "GraphQL rate-limit budget", "points"),
        };
        if let Some(b) = budget {
            if b.remaining == 0 && b.reset > now {
                return Err(SourceError::RateLimited {
                    until: b.reset,
                    status: None,
                    message: format!(
                        "{said}the {what} of {} {unit} is spent until its reset; nothing was sent",
                        b.limit
                    ),
                });
            }
        }
        let graphql_hold = l.graphql_blocked_until.filter(|_| api == Api::Graphql);
        if let Some(until) = graphql_hold.filter(|u| *u > now) {
            return Err(SourceError::RateLimited {
                until,
                status: None,
                message: format!(
                    "{said}holding GraphQL requests off after its rate limit; nothing was sent"
                ),
            });
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
            let budget = Some(RateLimit::new(limit, remaining, reset));
            let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
            if is_graphql(headers) {
                l.graphql_budget = budget;
            } else {
                l.budget = budget;
            }
        }
    }

    /// The last REST budget seen, if any.
    pub(super) fn budget(&self) -> Option<RateLimit> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner()).budget
    }

    /// The last GraphQL budget seen, if any.
    pub(super) fn graphql_budget(&self) -> Option<RateLimit> {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .graphql_budget
    }

    /// GraphQL's primary limit, reported in a 200 answer's `errors`: holds GraphQL requests off
    /// until `x-ratelimit-reset` (whatever `x-ratelimit-remaining` says: it is not always 0 on
    /// such an answer), else a `Retry-After`, else a minute. Returns that instant.
    pub(super) fn hold_graphql(&self, a: &Answer, message: &str) -> SystemTime {
        let now = self.clock.now();
        let until = header_reset(a)
            .or_else(|| retry_after(a, now))
            .unwrap_or(now + SECONDARY_DEFAULT_WAIT);
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.graphql_blocked_until = Some(l.graphql_blocked_until.map_or(until, |u| u.max(until)));
        l.last_message = Some(message.to_owned());
        until
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
        let retry_after = retry_after(a, now);
        let spent = a
            .header("x-ratelimit-remaining")
            .is_some_and(|r| r.trim() == "0");
        let reset = header_reset(a);
        // A spent GraphQL budget holds GraphQL off, not REST (a `Retry-After` holds both).
        let graphql_primary = retry_after.is_none() && spent && reset.is_some() && a.is_graphql();
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
        let hold = if graphql_primary {
            &mut l.graphql_blocked_until
        } else {
            &mut l.blocked_until
        };
        *hold = Some(hold.map_or(until, |u| u.max(until)));
        Some(until)
    }
}

/// Whether an answer's `x-ratelimit-resource` is GraphQL's budget.
pub(super) fn is_graphql(headers: &HeaderMap) -> bool {
    headers
        .get("x-ratelimit-resource")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|r| r.trim().eq_ignore_ascii_case("graphql"))
}

/// `x-ratelimit-reset` as an instant.
fn header_reset(a: &Answer) -> Option<SystemTime> {
    a.header("x-ratelimit-reset")
        .and_then(|r| r.trim().parse::<u64>().ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

/// `Retry-After` (seconds or an HTTP date) as an instant.
fn retry_after(a: &Answer, now: SystemTime) -> Option<SystemTime> {
    a.header(http::header::RETRY_AFTER).and_then(|v| {
        v.trim()
            .parse::<u64>()
            .ok()
            .map(|s| now + Duration::from_secs(s))
            .or_else(|| codec::parse_http_date(v))
    })
}
