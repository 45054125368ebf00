//! Block bookkeeping for the paged latent cache: a free list, reference counts, and prefix caching.
//!
//! A *full* block's identity is the hash of its tokens chained with the hash of the block before it, so equal
//! prompt prefixes map to equal hash chains. Full blocks are registered under their hash; a new sequence reuses
//! every leading block whose hash is registered (reference counted, never written again). Blocks whose count
//! drops to zero stay cached and reusable until the allocator needs them, least recently used first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Hash of a full block: its tokens chained with the previous block's hash (SipHash with the standard library's
/// fixed keys, so equal across processes of one build).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    prefix_caching: bool,
    ref_count: Vec<u32>,
    /// Blocks holding nothing worth keeping: released ones at the front (most recently released first, so the
    /// working set stays in memory already touched and in cache), never-used ones behind them.
    free: VecDeque<u32>,
    /// Registered full blocks by hash, and each block's hash.
    by_hash: HashMap<u64, u32>,
    hash_of: Vec<Option<u64>>,
    /// Unreferenced but cached blocks by last-use tick (oldest first), and each one's tick.
    evictable: BTreeMap<u64, u32>,
    tick_of: Vec<u64>,
    tick: u64,
}

/// The cached prefix found for a prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<u32>,
    /// Hash chain of those blocks (the last one is the parent of the next full block).
    pub hashes: Vec<u64>,
    pub tokens: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            prefix_caching,
            ref_count: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
            evictable: BTreeMap::new(),
            tick_of: vec![0; num_blocks],
            tick: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Fraction of blocks referenced by live sequences (vllm:kv_cache_usage_perc).
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks();
        if total == 0 { 0.0 } else { (total - self.available()) as f64 / total as f64 }
    }

    /// The longest run of registered full blocks that prefixes `tokens`, covering at most `max_tokens` tokens.
    /// The blocks returned are referenced on behalf of the caller.
    pub fn match_prefix(&mut self, tokens: &[u32], max_tokens: usize) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching {
            return hit;
        }
        let mut parent = 0u64;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(self.block_size) {
            let h = block_hash(parent, chunk);
            let Some(&block) = self.by_hash.get(&h) else { break };
            self.retain(block);
            hit.blocks.push(block);
            hit.hashes.push(h);
            hit.tokens += self.block_size;
            parent = h;
        }
        hit
    }

    fn retain(&mut self, block: u32) {
        let b = block as usize;
        if self.ref_count[b] == 0 {
            self.evictable.remove(&self.tick_of[b]);
        }
        self.ref_count[b] += 1;
    }

    /// A block for new rows: a free one, else the least recently used cached one (its hash is forgotten).
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.ref_count[block as usize] = 1;
        Some(block)
    }

    /// Records that `block` is full and holds the tokens hashed as `hash`. If an identical block is already
    /// registered, the existing one stays canonical.
    pub fn register(&mut self, block: u32, hash: u64) {
        if !self.prefix_caching || self.hash_of[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(block);
            self.hash_of[block as usize] = Some(hash);
        }
    }

    /// Drops one reference to each block. Unreferenced registered blocks stay cached (evictable); others are free.
    pub fn release(&mut self, blocks: &[u32]) {
        for &block in blocks.iter().rev() {
            let b = block as usize;
            if self.ref_count[b] == 0 {
                continue;
            }
            self.ref_count[b] -= 1;
            if self.ref_count[b] == 0 {
                if self.hash_of[b].is_some() {
                    self.tick += 1;
                    self.tick_of[b] = self.tick;
                    self.evictable.insert(self.tick, block);
                } else {
                    self.free.push_front(block);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_reuses_full_blocks_only() {
        let mut a = BlockAllocator::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let blocks: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        let h0 = block_hash(0, &prompt[0..4]);
        let h1 = block_hash(h0, &prompt[4..8]);
        a.register(blocks[0], h0);
        a.register(blocks[1], h1);
        let hit = a.match_prefix(&prompt, prompt.len() - 1);
        assert_eq!(hit.tokens, 8);
        assert_eq!(hit.blocks, blocks[..2].to_vec());
        // A different second block matches only the first.
        let other: Vec<u32> = (0..4).chain(100..106).collect();
        assert_eq!(a.match_prefix(&other, 9).tokens, 4);
    }

    #[test]
    fn released_cached_blocks_are_reused_then_evicted_lru() {
        let mut a = BlockAllocator::new(2, 2, true);
        let b0 = a.allocate().unwrap();
        let b1 = a.allocate().unwrap();
        a.register(b0, 11);
        a.register(b1, 22);
        a.release(&[b0]);
        a.release(&[b1]);
        assert_eq!(a.available(), 2);
        assert_eq!(a.usage(), 0.0);
        // Allocating evicts the least recently released block (b0, released first... in reverse order: b0 then b1).
        let first = a.allocate().unwrap();
        assert_eq!(first, b0);
        assert!(!a.by_hash.contains_key(&11) && a.by_hash.get(&22) == Some(&b1));
        assert!(a.allocate().is_some());
        assert!(a.allocate().is_none());
    }

    /// A released block is handed out again before any never-used one: the pool's touched memory does not grow
    /// while the live set does not.
    #[test]
    fn released_blocks_are_reused_before_never_used_ones() {
        let mut a = BlockAllocator::new(100, 2, false);
        let first: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(first, vec![0, 1, 2]);
        a.release(&first);
        for _ in 0..10 {
            let again: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
            assert!(again.iter().all(|&b| b < 3), "{again:?}");
            a.release(&again);
        }
        assert_eq!(a.available(), 100);
    }

    #[test]
    fn without_prefix_caching_nothing_matches() {
        let mut a = BlockAllocator::new(4, 2, false);
        let b = a.allocate().unwrap();
        a.register(b, block_hash(0, &[1, 2]));
        assert_eq!(a.match_prefix(&[1, 2, 3], 2).tokens, 0);
        a.release(&[b]);
        assert_eq!(a.available(), 4);
    }
}
