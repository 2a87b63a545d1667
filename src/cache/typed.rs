//! Typed values decoded once: [`Typed`], a view of the cache whose L1 hits hand out the value
//! already decoded (JSON), so a hot key is parsed once per write, not once per read.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;

/// A typed view of a [`TieredCache`]: values are JSON-encoded in every tier and handed out as
/// `Arc<T>`. The first read of an entry decodes it and keeps the decoded value with the entry
/// in L1; later L1 hits clone an `Arc`. Every write replaces the whole entry, so a decoded value
/// never outlives its bytes. Made by [`TieredCache::typed`]; cheap to clone.
///
/// One decoded type is kept per entry: reading one key as two types works, but decodes on every
/// read of the second type.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tiercache::Result<()> {
/// use serde::{Deserialize, Serialize};
/// use tiercache::{Strategy, TieredCache};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Config {
///     port: u16,
/// }
///
/// let cache = TieredCache::builder().strategy(Strategy::CacheAside).build()?;
/// let configs = cache.typed::<Config>();
/// configs.set("prod", &Config { port: 8080 }).await?;
/// let first = configs.get("prod").await?.unwrap(); // decoded here
/// let again = configs.get("prod").await?.unwrap(); // an Arc clone: no parsing
/// assert!(std::sync::Arc::ptr_eq(&first, &again));
/// assert_eq!(again.port, 8080);
/// # Ok(()) }
/// ```
pub struct Typed<T> {
    cache: TieredCache,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Typed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("type", &std::any::type_name::<T>())
            .field("cache", &self.cache)
            .finish()
    }
}

impl TieredCache {
    /// A view of this cache whose values are `T`, JSON-encoded in the tiers and decoded once per
    /// entry (see [`Typed`]).
    pub fn typed<T>(&self) -> Typed<T>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        Typed {
            cache: self.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> Typed<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The cache this view reads.
    pub fn cache(&self) -> &TieredCache {
        &self.cache
    }

    /// The value of `key`, decoded. An L1 hit of an entry decoded before costs about what a
    /// bytes hit costs.
    ///
    /// # Errors
    /// As [`TieredCache::get`], and [`Error::Decode`] when the bytes are not a `T` (the entry
    /// stays cached: the caller asked for the wrong type).
    pub async fn get(&self, key: &str) -> Result<Option<Arc<T>>> {
        let inner = &*self.cache.inner;
        if inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let timer = inner.stats.start_sampled();
        let now = self.cache.now();
        if let Some(e) = inner.l1.get(key, now).await {
            if now < e.fresh_until {
                if let Some(v) = e.decoded::<T>() {
                    inner.stats.hit(Tier::L1);
                    inner.stats.record(Tier::L1, Op::Get, timer);
                    self.cache.consider_refresh(key, &e, now);
                    return Ok(Some(v));
                }
            }
        }
        match self.cache.get(key).await? {
            Some(bytes) => self.decode_and_keep(key, bytes).await.map(Some),
            None => Ok(None),
        }
    }

    /// Encodes `value` and writes it per the strategy, as [`TieredCache::set`].
    ///
    /// # Errors
    /// As [`TieredCache::set`], and [`Error::Encode`].
    pub async fn set(&self, key: &str, value: &T) -> Result<()> {
        self.cache.set_json(key, value).await
    }

    /// Deletes `key` per the strategy, as [`TieredCache::delete`].
    ///
    /// # Errors
    /// As [`TieredCache::delete`].
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.cache.delete(key).await
    }

    /// The value of `key`; on a miss, `loader` produces it (single-flight; see
    /// [`TieredCache::try_get_with`]). `Ok(None)` from the loader means "does not exist".
    ///
    /// # Errors
    /// As [`TieredCache::try_get_with`], and [`Error::Decode`].
    pub async fn try_get_with<F, Fut, E>(&self, key: &str, loader: F) -> Result<Option<Arc<T>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let owned_key = key.to_owned();
        let bytes = self
            .cache
            .try_get_with(key, move || async move {
                match loader().await.map_err(Into::into)? {
                    Some(v) => serde_json::to_vec(&v)
                        .map(|b| Some(Bytes::from(b)))
                        .map_err(|e| {
                            Box::new(Error::Encode {
                                key: owned_key,
                                message: e.to_string(),
                            })
                                as Box<dyn std::error::Error + Send + Sync>
                        }),
                    None => Ok(None),
                }
            })
            .await?;
        match bytes {
            Some(bytes) => self.decode_and_keep(key, bytes).await.map(Some),
            None => Ok(None),
        }
    }

    /// Decodes `bytes` and, when L1 still holds exactly these bytes for `key`, keeps the
    /// decoded value with that entry.
    async fn decode_and_keep(&self, key: &str, bytes: Bytes) -> Result<Arc<T>> {
        let inner = &*self.cache.inner;
        let value: Arc<T> = match serde_json::from_slice(&bytes) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                inner.stats.decode_error();
                return Err(Error::Decode {
                    key: key.to_owned(),
                    message: e.to_string(),
                });
            }
        };
        if let Some(e) = inner.l1.get(key, self.cache.now()).await {
            if e.value.as_ref() == Some(&bytes) {
                let _ = e.decoded.set(value.clone());
            }
        }
        Ok(value)
    }
}
