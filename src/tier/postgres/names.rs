//! Names: the schema's (checked) and the server's (shown without its password).

use std::str::FromStr;

use tokio_postgres::config::Host;

use crate::error::{Error, Result};

pub(super) fn validate_schema_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 && !name.starts_with("pg_") {
        return Ok(());
    }
    Err(Error::Config(format!(
        "schema {name:?} is not a usable name: lowercase ASCII letters, digits and '_', starting \
         with a letter or '_', at most 63 bytes, not starting with 'pg_'"
    )))
}

/// The server of `config` as `postgres://user@host:port/db`, built from its parts: never the
/// password.
pub(super) fn server_name(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// `url` without its password: the parsed server, or a placeholder when it does not parse.
pub(super) fn redacted(url: &str) -> String {
    tokio_postgres::Config::from_str(url).map_or_else(
        |_| "<an unparsable URL, not shown>".to_owned(),
        |c| server_name(&c),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::postgres::PostgresStore;

    #[test]
    fn the_server_name_never_holds_the_password() {
        for url in [
            "postgres://alice:s3cret@db.example:6543/cache",
            "postgresql://alice:s3cret@db.example/cache?password=s3cret",
            "host=db.example user=alice password=s3cret dbname=cache",
        ] {
            let shown = redacted(url);
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("alice@db.example"), "{shown}");
        }
        assert_eq!(
            redacted("postgres://alice:s3cret@db.example:6543/cache"),
            "postgres://alice@db.example:6543/cache"
        );
        let builder = PostgresStore::builder("postgres://alice:s3cret@db.example/cache");
        assert!(!format!("{builder:?}").contains("s3cret"));
    }

    #[test]
    fn schema_names_are_checked() {
        for good in ["tiercache", "_x", "cache_2"] {
            assert!(validate_schema_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Tier",
            "1abc",
            "a-b",
            "a\"b",
            "pg_cache",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_schema_name(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }
}
