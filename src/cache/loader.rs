//! Per-call loaders: `get_with` and `try_get_with`, the read pipeline with the application's own
//! loader in the source's place (moka's `get_with`, FusionCache's `GetOrSet`).

use std::future::Future;

use bytes::Bytes;

use super::load::CustomLoad;
use super::*;

impl TieredCache {
    /// The value of `key`; on a miss, `loader` produces it. The loader runs at most once for
    /// concurrent callers of one key (single-flight, as its own task: it finishes and fills the
    /// tiers even if every caller gives up), and its value is written to L1 and L2 with the
    /// default TTL. Works under every strategy and with no [`Source`] configured.
    ///
    /// `None` when the key is known not to exist: a fresh "not found" is cached, or a pending
    /// write-behind delete (I2). Pending write-behind writes are read back as themselves; the
    /// loader is not called for them.
    ///
    /// # Errors
    /// [`Error::InvalidKey`]; [`Error::Closed`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
    /// let v = cache.get_with("greeting", || async { "hello" }).await?;
    /// assert_eq!(v.unwrap(), "hello");
    /// // Cached: the second loader is not called.
    /// let v = cache.get_with("greeting", || async { "ignored" }).await?;
    /// assert_eq!(v.unwrap(), "hello");
    /// # Ok(()) }
    /// ```
    pub async fn get_with<F, Fut, V>(&self, key: &str, loader: F) -> Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = V> + Send + 'static,
        V: Into<Bytes>,
    {
        self.try_get_with(key, move || async move {
            Ok::<_, std::convert::Infallible>(Some(loader().await))
        })
        .await
    }

    /// [`get_with`](Self::get_with) with a loader that may fail or say the key does not exist
    /// (`Ok(None)`, remembered as "not found" for the negative TTL).
    ///
    /// # Errors
    /// When the loader fails and no stale copy is within its stale window:
    /// [`Error::Unavailable`] with reason [`StaleReason::SourceError`], the loader's error as
    /// the source of its [`SourceError::Other`]. With a stale copy, that copy is returned (as
    /// [`lookup`](Self::lookup) would mark it stale). Also [`Error::InvalidKey`],
    /// [`Error::Closed`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
    /// use tiercache::{Strategy, TieredCache};
    ///
    /// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
    /// let missing = cache
    ///     .try_get_with("user/42", || async { Ok::<Option<&str>, std::io::Error>(None) })
    ///     .await?;
    /// assert!(missing.is_none());
    /// let failed = cache
    ///     .try_get_with("user/7", || async {
    ///         Err::<Option<&str>, _>(std::io::Error::other("db down"))
    ///     })
    ///     .await;
    /// assert!(failed.unwrap_err().is_unavailable());
    /// # Ok(()) }
    /// ```
    pub async fn try_get_with<F, Fut, V, E>(&self, key: &str, loader: F) -> Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        V: Into<Bytes>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let custom: CustomLoad = Box::new(move || {
            Box::pin(async move {
                loader()
                    .await
                    .map(|v| v.map(Into::into))
                    .map_err(Into::into)
            })
        });
        Ok(self
            .lookup_inner(key, None, Some(custom))
            .await?
            .map(|l| l.value))
    }
}
