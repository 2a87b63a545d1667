use std::time::Duration;

use tiercache::source::github::GitHubSource;
use tiercache::{Freshness, TieredCache};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // GitHub's REST API. With GITHUB_TOKEN set: 5,000 requests an hour instead of 60.
    let github = GitHubSource::builder().token_from_env().build()?;
    let cache = TieredCache::builder()
        .source(github)
        // Without this line L2 is an in-memory database: nothing survives a restart.
        .sqlite_path("components.db")
        .ttl(Duration::from_secs(300)) // fresh for 5 minutes,
        .stale_ttl(Duration::from_secs(7 * 86_400)) // then served stale for a week if GitHub fails
        .build()?;

    let key = "rust-lang/rust/README.md@master"; // OWNER/REPO/PATH[@REF]
    match cache.lookup(key).await {
        Ok(Some(hit)) => {
            if let Freshness::Stale { reason } = hit.freshness {
                eprintln!("a stale copy ({reason}), {}s old", hit.age.as_secs());
            }
            println!("{} bytes from {}", hit.value.len(), hit.tier);
        }
        Ok(None) => println!("{key} does not exist"),
        Err(e) if e.is_unavailable() => eprintln!("GitHub is unavailable, nothing cached: {e}"),
        Err(e) => return Err(e.into()),
    }
    println!("{}", cache.stats().await);
    cache.close().await?;
    Ok(())
}
