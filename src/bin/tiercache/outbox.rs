//! The write-behind outbox: `flush` delivers it, `dead-letters` lists, retries or discards the
//! writes GitHub refused for good.

use tiercache::Strategy;

use crate::config::Settings;
use crate::{open, read_strategy, Failure, EXIT_NOT_FOUND};

pub(crate) async fn flush(s: &Settings) -> Result<u8, Failure> {
    // The outbox exists whatever --strategy says; only the write-behind cache delivers it.
    if s.offline {
        return Err(Failure::usage(
            "flush delivers writes to GitHub; it cannot run with --offline",
        ));
    }
    let cache = open(s, Strategy::WriteBehind).await?;
    let report = cache.flush().await.map_err(|e| Failure::from_error(&e))?;
    let summary = cache
        .store_summary()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    println!(
        "delivered {}, pending {}, dead letters {}",
        report.delivered, report.pending, summary.dead_letters
    );
    for (key, err) in &report.stuck {
        eprintln!("tiercache: {key}: {err}");
    }
    if report.pending > 0 || summary.dead_letters > 0 {
        let mut parts = Vec::new();
        if report.pending > 0 {
            parts.push(format!("{} write(s) still pending", report.pending));
        }
        if summary.dead_letters > 0 {
            parts.push(format!(
                "{} dead letter(s) GitHub refused for good",
                summary.dead_letters
            ));
        }
        return Err(Failure::runtime(format!(
            "the outbox is not empty: {}",
            parts.join(", ")
        )));
    }
    Ok(0)
}
/// What `dead-letters` does: list, or retry / discard one (`Some(id)`) or all (`None`).
pub(crate) enum DeadLetterAction {
    List,
    Retry(Option<i64>),
    Discard(Option<i64>),
}

pub(crate) async fn dead_letters(
    s: &Settings,
    action: DeadLetterAction,
    json: bool,
) -> Result<u8, Failure> {
    let cache = open(s, read_strategy(s)).await?;
    let letters = cache
        .dead_letters()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let (retry, only) = match action {
        DeadLetterAction::List => {
            let mut text = String::new();
            if json {
                // One object per line; none at all when there are none.
                for d in &letters {
                    text.push_str(&format!(
                        "{}\n",
                        serde_json::to_value(d).unwrap_or_default()
                    ));
                }
            } else if letters.is_empty() {
                text.push_str("no dead letters\n");
            } else {
                text.push_str("ID\tOP\tKEY\tATTEMPTS\tCREATED\tERROR\n");
                for d in &letters {
                    text.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\t{}\n",
                        d.id,
                        d.op,
                        d.key,
                        d.attempts,
                        humantime::format_rfc3339_seconds(d.created_at),
                        d.error.as_deref().unwrap_or("")
                    ));
                }
            }
            crate::output::print(text)?;
            return Ok(0);
        }
        DeadLetterAction::Retry(only) => (true, only),
        DeadLetterAction::Discard(only) => (false, only),
    };
    let ids: Vec<i64> = match only {
        Some(id) => vec![id],
        None => letters.iter().map(|d| d.id).collect(),
    };
    let (mut done, mut superseded) = (0, 0);
    for id in &ids {
        let found = if retry {
            cache.retry_dead_letter(*id).await
        } else {
            cache.discard_dead_letter(*id).await
        };
        let found = match found {
            // `--retry-all` goes on past a letter a newer write superseded; it is reported.
            Err(e @ tiercache::Error::Superseded { .. }) if only.is_none() => {
                eprintln!("{e}");
                superseded += 1;
                continue;
            }
            other => other.map_err(|e| Failure::from_error(&e))?,
        };
        if found {
            done += 1;
        } else if only.is_some() {
            return Err(Failure {
                code: EXIT_NOT_FOUND,
                message: format!("there is no dead letter {id}"),
            });
        }
    }
    if retry {
        println!("{done} dead letter(s) moved back to the outbox; `tiercache flush` delivers them");
        if superseded > 0 {
            println!(
                "{superseded} dead letter(s) left: superseded by a newer write of their key (`--discard ID` removes one)"
            );
        }
    } else {
        println!("{done} dead letter(s) discarded");
    }
    Ok(0)
}
