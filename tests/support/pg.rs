//! PostgreSQL test support: each test gets a fresh schema (a random suffix) on the real server,
//! dropped when the test ends (passed or panicked). Without a reachable server a test prints
//! why it is skipped on stderr and returns; with `TIERCACHE_POSTGRES_REQUIRED=1` (CI) it fails.
#![allow(dead_code)]

use std::str::FromStr;
use std::time::Duration;

use tiercache::tier::postgres::{PostgresStore, PostgresStoreBuilder};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// The server tests run against: `TIERCACHE_POSTGRES_URL`, or the local one (trust auth).
pub fn url() -> String {
    std::env::var("TIERCACHE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// An administrative connection (the test's own, not the store's) and a fresh schema name.
pub struct PgTest {
    pub admin: Client,
    pub schema: String,
    config: Config,
    /// Extra roles made by the test, dropped at the end.
    roles: Vec<String>,
}

/// Connects to [`url`]; `None` (after saying so on stderr) when no server answers.
pub async fn start(test: &str) -> Option<PgTest> {
    let url = url();
    let config = match Config::from_str(&url) {
        Ok(mut c) => {
            c.connect_timeout(Duration::from_secs(3));
            c
        }
        Err(e) => panic!("TIERCACHE_POSTGRES_URL does not parse: {e}"),
    };
    match config.connect(NoTls).await {
        Ok((admin, conn)) => {
            tokio::spawn(conn);
            let schema = format!("tc_test_{:016x}", fastrand::u64(..));
            Some(PgTest {
                admin,
                schema,
                config,
                roles: Vec::new(),
            })
        }
        Err(e) if std::env::var_os("TIERCACHE_POSTGRES_REQUIRED").is_some() => {
            panic!(
                "{test}: PostgreSQL is required (TIERCACHE_POSTGRES_REQUIRED) but unreachable: {e}"
            )
        }
        Err(e) => {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
            skip(
                test,
                &format!(
                    "no PostgreSQL server answers at {:?} port {:?} (set TIERCACHE_POSTGRES_URL; \
                     default postgres://root@127.0.0.1:5432/test): {e}{cause}",
                    config.get_hosts(),
                    config.get_ports()
                ),
            );
            None
        }
    }
}

/// Says on stderr that `test` is skipped and why. Written to the process's stderr itself, not
/// through `eprintln!`, which the test harness captures (and hides for a passing test).
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

impl PgTest {
    /// The URL of the test's server as `user` (key=value form).
    pub fn url_as(&self, user: &str) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("test");
        format!("host={host} port={port} user={user} dbname={db}")
    }

    /// The test server's host, port, user and database.
    pub fn server_parts(&self) -> (String, u16, String, String) {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("test").to_owned();
        (host, port, self.user(), db)
    }

    /// A builder for a store on the test's schema (as the URL's user).
    pub fn store(&self) -> PostgresStoreBuilder {
        PostgresStore::builder(url()).schema(self.schema.clone())
    }

    /// The user the tests connect as.
    pub fn user(&self) -> String {
        self.config.get_user().unwrap_or("postgres").to_owned()
    }

    /// A new login role owning nothing yet, allowed to create schemas in the database; dropped
    /// at the end of the test. `None` (said on stderr) when the test's user may not create
    /// roles.
    pub async fn role(&mut self, test: &str) -> Option<String> {
        let role = format!("{}_role", self.schema);
        let db = self.config.get_dbname().unwrap_or("test").to_owned();
        let made = self
            .admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE \"{db}\" TO {role};"
            ))
            .await;
        match made {
            Ok(()) => {
                self.roles.push(role.clone());
                Some(role)
            }
            Err(e) => {
                skip(test, &format!("the test's user cannot create a role: {e}"));
                None
            }
        }
    }

    /// `SELECT` of one `bigint`/`text` cell, for assertions.
    pub async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.schema));
        self.admin
            .query_one(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Runs statements on the admin connection (`{s}`: the test's schema).
    pub async fn exec(&self, sql: &str) {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.schema));
        self.admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for PgTest {
    /// Drops the schema and roles on a connection of its own (a thread with its own runtime:
    /// this runs inside the test's runtime, and also when the test panicked).
    fn drop(&mut self) {
        let (config, schema, roles) =
            (self.config.clone(), self.schema.clone(), self.roles.clone());
        let db = config.get_dbname().unwrap_or("test").to_owned();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let Ok((client, conn)) = config.connect(NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                // One batch is one transaction: the schema goes first, on its own.
                let mut batches = vec![format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")];
                for role in roles {
                    batches.push(format!(
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{role}';
                         REVOKE CREATE ON DATABASE \"{db}\" FROM {role}; DROP OWNED BY {role}; DROP ROLE {role};"
                    ));
                }
                for sql in batches {
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("cleanup after a test failed ({sql}): {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Polls `check` every `every` until it holds; panics with `what` after `within`. (Time here is
/// the real server's: a bounded wait for a condition, never a sleep standing in for one.)
pub async fn eventually_within<F, Fut>(within: Duration, every: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polled = tokio::time::timeout(within, async {
        while !check().await {
            tokio::time::sleep(every).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "not within {within:?}: {what}");
}

/// [`eventually_within`] 10 s, polling every 5 ms.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(
        Duration::from_secs(10),
        Duration::from_millis(5),
        what,
        check,
    )
    .await;
}
