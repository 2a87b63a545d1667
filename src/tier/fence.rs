//! Write fences: how a slow fill from the source is kept from bringing back a value older than a
//! write that raced it (invariant I1).
//!
//! Every write that changes what a key reads as (set, delete, invalidate, a delivered or refused
//! write-behind write) bumps the key's fence **before** it touches L2 and L1. A fill (a load from
//! the source writing its answer into L2 and L1) takes the fence's token when it starts and:
//! 1. writes L1 only if the token is unchanged, re-checks it after the insert and drops its L1
//!    entry if a write bumped the fence meanwhile;
//! 2. writes L2 only if the token is still unchanged when the store runs its statement (and
//!    the row is still the one it read, which also catches another process's write), and drops
//!    its L1 entry when that write is refused (the next read then goes to L2, which holds the
//!    write).
//!
//! A write bumps the fence a second time once L2 holds its change, before it touches L1
//! ([`Fences::bump_again`]): a fill that took its token between the two bumps may have read L2
//! before the change, so its (older) answer must not reach L1 either. Without that second bump
//! such a fill passed step 1 after the write was acknowledged, and its answer was served until
//! its refused L2 write removed it (`tests/store.rs`,
//! `a_fill_begun_during_a_set_never_serves_its_older_answer_after_the_set`).
//!
//! Fences are striped: keys that share a stripe only cost each other a skipped fill (the value
//! is still returned to the reader; it is just not cached), never a wrong answer.
//!
//! Caches of one process opened on one database file share one `Fences` ([`Fences::for_file`]):
//! a write by one of them moves the fence for all, and once it is in L2 it removes the key from
//! the others' L1 ([`Fences::spread`]), so another cache of the process never serves its older
//! copy (I1 between the caches of a process). Other processes' L1s are not reached: see the
//! crate docs.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::memory::MemoryTier;

const STRIPE_BITS: u32 = 10;
const STRIPES: usize = 1 << STRIPE_BITS;

/// The write fences of one cache.
pub(crate) struct Fences {
    stripes: Box<[AtomicU64]>,
    /// The stripe hash, seeded: which keys share a stripe differs between processes.
    hasher: foldhash::fast::FixedState,
    /// The L1 of every cache sharing these fences, by peer id.
    peers: Mutex<Vec<(u64, MemoryTier)>>,
    /// How many caches share these fences (a write with no peer skips the lock).
    peer_count: AtomicUsize,
    /// Keys whose refused write is being settled: no read may put them into L1 until the
    /// refusal is recorded and every L1 copy dropped (see [`Fences::settling`]).
    settling: Mutex<Vec<String>>,
    settling_count: AtomicUsize,
}

/// The fences of each database file open in this process.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Fences>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<Fences>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

static NEXT_PEER: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Fences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fences")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

impl Default for Fences {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: foldhash::fast::FixedState::with_seed(fastrand::u64(..)),
            peers: Mutex::new(Vec::new()),
            peer_count: AtomicUsize::new(0),
            settling: Mutex::new(Vec::new()),
            settling_count: AtomicUsize::new(0),
        }
    }
}

impl Fences {
    /// The fences shared by this process's caches on the database file at `path` (`None`: a
    /// memory database, its own), with `l1` joined as a peer. Returns the fences and the peer id
    /// to [`leave`](Self::leave) with.
    pub(crate) fn for_file(path: Option<&Path>, l1: &MemoryTier) -> (Arc<Fences>, u64) {
        let fences = match path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())) {
            Some(path) => {
                let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
                map.retain(|_, w| w.strong_count() > 0);
                match map.get(&path).and_then(Weak::upgrade) {
                    Some(f) => f,
                    None => {
                        let f = Arc::new(Fences::default());
                        map.insert(path, Arc::downgrade(&f));
                        f
                    }
                }
            }
            None => Arc::new(Fences::default()),
        };
        let id = NEXT_PEER.fetch_add(1, Ordering::Relaxed);
        let mut peers = fences.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.push((id, l1.clone()));
        fences.peer_count.store(peers.len(), Ordering::Release);
        drop(peers);
        (fences, id)
    }

    /// Marks `key` as being settled (a refusal between its first L1 drop and its last): reads
    /// keep it out of L1 meanwhile. Returns a guard that ends the mark.
    pub(crate) fn settling<'a>(self: &'a Arc<Self>, key: &str) -> Settling<'a> {
        self.settling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key.to_owned());
        self.settling_count.fetch_add(1, Ordering::AcqRel);
        Settling {
            fences: self,
            key: key.to_owned(),
        }
    }

    /// Whether `key` is being settled (one atomic load when nothing is).
    pub(crate) fn is_settling(&self, key: &str) -> bool {
        self.settling_count.load(Ordering::Acquire) > 0
            && self
                .settling
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|k| k == key)
    }

    /// Whether a read that took `token` may (still) hold `key` in L1.
    pub(crate) fn may_cache(&self, key: &str, token: u64) -> bool {
        self.unchanged(key, token) && !self.is_settling(key)
    }

    /// A cache closing or dropped stops being a peer.
    pub(crate) fn leave(&self, id: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|(p, _)| *p != id);
        self.peer_count.store(peers.len(), Ordering::Release);
    }

    /// After a write of `key` by peer `me` reached L2: the other caches of this process on the
    /// same file drop their L1 copy.
    pub(crate) async fn spread(&self, me: u64, key: &str) {
        if self.peer_count.load(Ordering::Acquire) <= 1 {
            return;
        }
        let others: Vec<MemoryTier> = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| *p != me)
            .map(|(_, l1)| l1.clone())
            .collect();
        for l1 in others {
            l1.remove(key).await;
        }
    }

    /// The index of `key`'s stripe.
    fn index(&self, key: &str) -> usize {
        // `STRIPES` is a power of two. foldhash, seeded per process: SipHash cost 150-200
        // instructions a key. A stripe needs spread, not resistance to chosen keys: keys that
        // share one only cost each other a skipped fill, never a wrong answer.
        (self.hasher.hash_one(key) as usize) & (STRIPES - 1)
    }

    #[cfg(test)]
    fn stripe(&self, key: &str) -> &AtomicU64 {
        &self.stripes[self.index(key)]
    }

    /// A token: the stripe's count with the stripe's index in its low bits, so that a holder
    /// checks or bumps its stripe again without hashing the key again (a read takes one token
    /// and checks it twice; a write bumps twice and checks once).
    fn pack(count: u64, index: usize) -> u64 {
        (count << STRIPE_BITS) | index as u64
    }

    /// The stripe a token was taken from.
    fn stripe_of(&self, key: &str, token: u64) -> (usize, &AtomicU64) {
        let index = (token as usize) & (STRIPES - 1);
        debug_assert_eq!(index, self.index(key), "a token of another key's stripe");
        (index, &self.stripes[index])
    }

    /// The token a fill holds from its start.
    pub(crate) fn token(&self, key: &str) -> u64 {
        let index = self.index(key);
        Self::pack(self.stripes[index].load(Ordering::Acquire), index)
    }

    /// Called by every write before it touches a tier. Returns the new token (what a writer
    /// checks afterwards to learn whether another write followed it).
    pub(crate) fn bump(&self, key: &str) -> u64 {
        let index = self.index(key);
        let count = self.stripes[index].fetch_add(1, Ordering::AcqRel);
        Self::pack(count.wrapping_add(1), index)
    }

    /// Called by a write once L2 holds its change, before it touches L1: moves the fence again,
    /// so a fill that took its token while the write was under way (after the first bump, its
    /// L2 read perhaps made before the change) is refused too, in L1 and in L2. Returns the new
    /// token, or `None` when another write of the stripe moved the fence between the two bumps.
    /// `token` is what [`bump`](Self::bump) returned for `key`.
    pub(crate) fn bump_again(&self, key: &str, token: u64) -> Option<u64> {
        let (index, stripe) = self.stripe_of(key, token);
        let now = Self::pack(stripe.fetch_add(1, Ordering::AcqRel).wrapping_add(1), index);
        (now == Self::pack((token >> STRIPE_BITS).wrapping_add(1), index)).then_some(now)
    }

    /// Moves every fence: no fill or read that started before may cache what it found (another
    /// instance changed keys this cache cannot name, see [`Invalidation::All`]).
    ///
    /// [`Invalidation::All`]: crate::tier::Invalidation::All
    pub(crate) fn bump_all(&self) {
        for stripe in self.stripes.iter() {
            stripe.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether no write of `key` (or of a key on its stripe) began since `token` was taken.
    /// `token` is one taken (or returned by a bump) for `key`.
    pub(crate) fn unchanged(&self, key: &str, token: u64) -> bool {
        let (index, stripe) = self.stripe_of(key, token);
        Self::pack(stripe.load(Ordering::Acquire), index) == token
    }
}

/// Ends a [`Fences::settling`] mark when dropped.
pub(crate) struct Settling<'a> {
    fences: &'a Arc<Fences>,
    key: String,
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        let mut keys = self
            .fences
            .settling
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = keys.iter().position(|k| *k == self.key) {
            keys.swap_remove(i);
            self.fences.settling_count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_invalidates_earlier_tokens_only() {
        let f = Fences::default();
        let t = f.token("k");
        assert!(f.unchanged("k", t));
        f.bump("k");
        assert!(!f.unchanged("k", t));
        let t2 = f.token("k");
        assert!(f.unchanged("k", t2));
        f.bump_all();
        assert!(!f.unchanged("k", t2));
    }

    #[test]
    fn a_second_bump_tells_whether_another_write_came_between() {
        let f = Fences::default();
        let t = f.bump("k");
        let t2 = f.bump_again("k", t).expect("no other write between");
        assert!(f.unchanged("k", t2));
        assert_eq!(f.token("k"), t2);
        let t3 = f.bump("k");
        f.bump("k");
        assert_eq!(f.bump_again("k", t3), None);
        // Tokens of two keys on two stripes are told apart even when their counts match.
        let other = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| f.index(k) != f.index("k"))
            .expect("another stripe");
        assert_ne!(
            f.token(&other) & (STRIPES as u64 - 1),
            f.token("k") & (STRIPES as u64 - 1)
        );
    }

    #[test]
    fn keys_that_differ_in_one_byte_spread_over_the_stripes() {
        let f = Fences::default();
        for at in 0..24 {
            let stripes: std::collections::HashSet<*const AtomicU64> = (b'0'..=b'z')
                .map(|b| {
                    let mut key = vec![b'k'; 24];
                    key[at] = b;
                    let key = String::from_utf8(key).expect("ASCII");
                    std::ptr::from_ref(f.stripe(&key))
                })
                .collect();
            // 75 keys over 1024 stripes: a few may share one.
            assert!(stripes.len() > 65, "byte {at}: {} stripes", stripes.len());
        }
    }
}
