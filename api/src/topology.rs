//! Replica-group topology: which rank of an expert-parallel group holds which routed experts.
//!
//! A replica is a group of `world_size` ranks. By default the routed experts are split into contiguous shards
//! (rank r holds experts `r*E/N .. (r+1)*E/N`). Hot experts may additionally be *replicated* on other ranks; a
//! sender then picks, deterministically, the replica on its own rank when there is one, else spreads senders over
//! the replicas. Every rank of a group must agree on the placement; [`ExpertPlacement::fingerprint`] lets them check.

/// Why a placement cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("world size must be at least 1")]
    EmptyGroup,
    #[error("{experts} routed experts cannot be split evenly over {world_size} ranks")]
    Uneven { experts: usize, world_size: usize },
    #[error("rank {rank} is outside a group of {world_size}")]
    RankOutOfRange { rank: usize, world_size: usize },
    #[error("expert {expert} does not exist (the model has {experts})")]
    ExpertOutOfRange { expert: usize, experts: usize },
}

/// Expert → ranks map of one replica group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    world_size: usize,
    /// For each expert, the ranks that hold it; the first is its home rank.
    holders: Vec<Vec<u32>>,
}

impl ExpertPlacement {
    /// Contiguous shards: `n_experts / world_size` experts per rank, in order.
    pub fn contiguous(n_experts: usize, world_size: usize) -> Result<Self, TopologyError> {
        if world_size == 0 {
            return Err(TopologyError::EmptyGroup);
        }
        if !n_experts.is_multiple_of(world_size) {
            return Err(TopologyError::Uneven { experts: n_experts, world_size });
        }
        let per_rank = n_experts / world_size;
        let holders = (0..n_experts).map(|e| vec![(e / per_rank) as u32]).collect();
        Ok(Self { world_size, holders })
    }

    /// Adds redundant replicas: `(expert, rank)` pairs placing one more copy of `expert` on `rank`.
    pub fn with_replicas(mut self, replicas: &[(usize, usize)]) -> Result<Self, TopologyError> {
        for &(expert, rank) in replicas {
            let experts = self.holders.len();
            let holders = self.holders.get_mut(expert).ok_or(TopologyError::ExpertOutOfRange { expert, experts })?;
            if rank >= self.world_size {
                return Err(TopologyError::RankOutOfRange { rank, world_size: self.world_size });
            }
            if !holders.contains(&(rank as u32)) {
                holders.push(rank as u32);
            }
        }
        Ok(self)
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn n_experts(&self) -> usize {
        self.holders.len()
    }

    /// Ranks holding `expert` (home rank first).
    pub fn holders(&self, expert: usize) -> &[u32] {
        self.holders.get(expert).map_or(&[], Vec::as_slice)
    }

    /// Experts `rank` holds, ascending.
    pub fn experts_on(&self, rank: usize) -> Vec<usize> {
        (0..self.holders.len()).filter(|&e| self.holders[e].contains(&(rank as u32))).collect()
    }

    /// The rank that computes `expert` for a sender on `from_rank`: itself when it holds a replica, otherwise one
    /// replica chosen by the sender's rank, so senders spread over the replicas of a hot expert.
    pub fn route(&self, expert: usize, from_rank: usize) -> usize {
        let holders = self.holders(expert);
        if holders.contains(&(from_rank as u32)) {
            return from_rank;
        }
        holders.get(from_rank % holders.len().max(1)).map_or(0, |&r| r as usize)
    }

    /// A stable digest of the placement (FNV-1a over world size and every holder list).
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(self.world_size as u64);
        for holders in &self.holders {
            eat(holders.len() as u64);
            for &r in holders {
                eat(u64::from(r));
            }
        }
        h
    }
}

/// DeepSeek's EPLB idea, written for one group: give each of `slots` extra replicas to the expert with the highest
/// load per replica, placing it on the least loaded rank that does not hold it yet. `load[e]` is the measured token
/// count of expert `e`. Returns `(expert, rank)` pairs for [`ExpertPlacement::with_replicas`].
pub fn balance_replicas(placement: &ExpertPlacement, load: &[u64], slots: usize) -> Vec<(usize, usize)> {
    let n = placement.n_experts().min(load.len());
    let world = placement.world_size();
    let mut copies: Vec<usize> = (0..n).map(|e| placement.holders(e).len().max(1)).collect();
    let mut holders: Vec<Vec<u32>> = (0..n).map(|e| placement.holders(e).to_vec()).collect();
    let per_replica = |e: usize, copies: &[usize]| load[e] as f64 / copies[e] as f64;
    let mut rank_load = vec![0f64; world];
    for (e, held_by) in holders.iter().enumerate() {
        for &r in held_by {
            rank_load[r as usize] += per_replica(e, &copies);
        }
    }
    let mut out = Vec::new();
    for _ in 0..slots {
        let Some(hot) = (0..n)
            .filter(|&e| holders[e].len() < world)
            .max_by(|&a, &b| per_replica(a, &copies).total_cmp(&per_replica(b, &copies)).then(b.cmp(&a)))
        else {
            break;
        };
        let Some(target) = (0..world)
            .filter(|&r| !holders[hot].contains(&(r as u32)))
            .min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)))
        else {
            break;
        };
        let before = per_replica(hot, &copies);
        for &r in &holders[hot] {
            rank_load[r as usize] -= before;
        }
        copies[hot] += 1;
        holders[hot].push(target as u32);
        let after = per_replica(hot, &copies);
        for &r in &holders[hot] {
            rank_load[r as usize] += after;
        }
        out.push((hot, target));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_shards_split_experts_in_order() {
        let p = ExpertPlacement::contiguous(8, 4).unwrap();
        assert_eq!(p.experts_on(0), vec![0, 1]);
        assert_eq!(p.experts_on(3), vec![6, 7]);
        assert_eq!(p.route(5, 0), 2);
        assert_eq!(ExpertPlacement::contiguous(8, 3).unwrap_err(), TopologyError::Uneven { experts: 8, world_size: 3 });
    }

    #[test]
    fn replicas_are_preferred_locally_and_change_the_fingerprint() {
        let base = ExpertPlacement::contiguous(8, 2).unwrap();
        let p = base.clone().with_replicas(&[(0, 1)]).unwrap();
        assert_eq!(p.holders(0), &[0, 1]);
        assert_eq!(p.route(0, 1), 1);
        assert_eq!(p.route(0, 0), 0);
        assert_eq!(p.experts_on(1), vec![0, 4, 5, 6, 7]);
        assert_ne!(p.fingerprint(), base.fingerprint());
        assert!(base.with_replicas(&[(9, 0)]).is_err());
    }

    #[test]
    fn balancing_replicates_the_hottest_expert_onto_the_coolest_rank() {
        let p = ExpertPlacement::contiguous(4, 2).unwrap();
        // Expert 1 (rank 0) is hot; rank 1 is cool.
        let picks = balance_replicas(&p, &[10, 100, 5, 5], 1);
        assert_eq!(picks, vec![(1, 1)]);
    }
}
