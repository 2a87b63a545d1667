//! The four strategies side by side: the same small workload, and how often each one calls the
//! source of truth.
//!
//! The source is an in-process map that counts its calls (no network).
//!
//! ```text
//! cargo run --example strategies
//! ```

mod common;

use common::CountingSource;
use tiercache::source::{Fetched, Source};
use tiercache::{Strategy, TieredCache};

/// Reads `key` as an app would: under cache-aside the app loads misses itself and fills the
/// cache. Returns the value and whether the app had to load it.
async fn read(
    cache: &TieredCache,
    source: &CountingSource,
    key: &str,
) -> tiercache::Result<(Option<String>, bool)> {
    if let Some(v) = cache.get(key).await? {
        return Ok((Some(String::from_utf8_lossy(&v).into_owned()), false));
    }
    if cache.strategy() != Strategy::CacheAside {
        return Ok((None, false));
    }
    match source.fetch(key, None).await {
        Ok(Fetched::Value { value, .. }) => {
            cache.set(key, value.clone()).await?;
            Ok((Some(String::from_utf8_lossy(&value).into_owned()), true))
        }
        _ => Ok((None, true)),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("workload: read a, a, a, b; write a=2; read a; write c=1; read c\n");
    println!(
        "{:<14} {:>14} {:>12} {:>14} {:>18} {:>12}",
        "strategy", "source fetches", "source puts", "app loads", "source has a", "source has c"
    );
    for strategy in Strategy::ALL {
        let source = CountingSource::with(&[("a", "1"), ("b", "1")]);
        let cache = TieredCache::builder()
            .sqlite_in_memory()
            .source(source.clone())
            .strategy(strategy)
            .build()?;
        let mut app_loads = 0;
        let mut step = |loaded: bool| app_loads += usize::from(loaded);
        for key in ["a", "a", "a", "b"] {
            step(read(&cache, &source, key).await?.1);
        }
        cache.set("a", "2").await?;
        let (a, loaded) = read(&cache, &source, "a").await?;
        step(loaded);
        assert_eq!(
            a.as_deref(),
            Some("2"),
            "every strategy reads its own write"
        );
        cache.set("c", "1").await?;
        step(read(&cache, &source, "c").await?.1);
        // Write-behind delivers in the background; wait for it to be done before counting.
        cache.close().await?;
        println!(
            "{:<14} {:>14} {:>12} {:>14} {:>18} {:>12}",
            strategy.as_str(),
            source.fetches(),
            source.puts(),
            app_loads,
            source.value("a").unwrap_or_else(|| "-".into()),
            source.value("c").unwrap_or_else(|| "-".into()),
        );
    }
    println!(
        "\nread-through and write-through load misses themselves (one fetch per key: a, b);\n\
         cache-aside: the cache never calls the source; its 2 fetches are the app's own loads;\n\
         read-through and cache-aside keep writes local, so the source still has a=1 and no c;\n\
         write-through puts before it returns; write-behind acknowledges at once and delivers later."
    );
    Ok(())
}
