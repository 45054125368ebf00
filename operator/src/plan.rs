//! Which groups to create and which to delete: scaling adds and removes whole groups; a spec change rolls out
//! group by group, a new group ready before an old one goes (bounded by `maxSurge`).
//!
//! Pure: the controller observes the groups (their StatefulSets), calls [`plan`], and applies the result. Calling
//! it again after every change converges: each call moves as far as availability allows and no further.

use crate::resources::GroupRef;

/// A group as observed in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedGroup {
    /// Which revision and index it is.
    pub group: GroupRef,
    /// Every rank pod of the group is ready.
    pub ready: bool,
}

/// What to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Groups to create, at the current revision.
    pub create: Vec<GroupRef>,
    /// Groups to delete (whole groups: StatefulSet and headless Service).
    pub delete: Vec<GroupRef>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty()
    }
}

/// The next step toward `replicas` groups of `revision`.
///
/// - Groups of other revisions are *old*. While any exist, at most `replicas + max_surge` groups exist at once,
///   and an old ready group is deleted only while at least `replicas` groups stay ready (with `max_surge` 0,
///   `replicas - 1`: one group is replaced in place). Old groups that are not ready go first: they serve nothing.
/// - Scaling down removes current groups that are not ready first, then the highest indices.
/// - New groups take the lowest free indices of the current revision.
pub fn plan(replicas: u32, revision: &str, max_surge: u32, observed: &[ObservedGroup]) -> Plan {
    let replicas = replicas as usize;
    let surge = max_surge as usize;
    let (current, old): (Vec<&ObservedGroup>, Vec<&ObservedGroup>) =
        observed.iter().partition(|g| g.group.revision == revision);
    let mut plan = Plan::default();

    // Scale the current revision down past `replicas`: not-ready first, then the highest index.
    if current.len() > replicas {
        let mut extra = current.clone();
        extra.sort_by_key(|g| (g.ready, std::cmp::Reverse(g.group.index)));
        plan.delete.extend(extra.iter().take(current.len() - replicas).map(|g| g.group.clone()));
    }
    let kept_current = current.len().min(replicas);

    // Delete old groups as far as availability allows. Ready groups that stay: current ones kept, plus old ones.
    let max_unavailable = usize::from(surge == 0);
    let min_ready = replicas.saturating_sub(max_unavailable);
    let mut ready_after =
        current.iter().filter(|g| g.ready).count().min(kept_current) + old.iter().filter(|g| g.ready).count();
    let mut old_sorted = old.clone();
    old_sorted.sort_by_key(|g| (g.ready, std::cmp::Reverse(g.group.index)));
    let mut old_left = old.len();
    for g in old_sorted {
        if g.ready {
            // Removing a ready old group must leave `min_ready` ready groups, and there must be enough current
            // groups (existing or about to exist) to take over, else the old group is still needed.
            if ready_after <= min_ready {
                break;
            }
            ready_after -= 1;
        }
        plan.delete.push(g.group.clone());
        old_left -= 1;
    }
    // With nothing of the current revision at all and nothing deletable, `max_surge` 0 still has to make room:
    // that is the one unavailable group it allows — already counted above via `min_ready`.

    // Create current groups up to `replicas`, within `replicas + max_surge` groups in total while old ones remain.
    let want = replicas.saturating_sub(kept_current);
    let room = if old_left == 0 { want } else { (replicas + surge).saturating_sub(kept_current + old_left) };
    let taken: Vec<u32> = current.iter().map(|g| g.group.index).collect();
    let mut index = 0u32;
    while plan.create.len() < want.min(room) {
        if !taken.contains(&index) {
            plan.create.push(GroupRef { revision: revision.to_string(), index });
        }
        index += 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn g(revision: &str, index: u32, ready: bool) -> ObservedGroup {
        ObservedGroup { group: GroupRef { revision: revision.into(), index }, ready }
    }

    fn r(revision: &str, index: u32) -> GroupRef {
        GroupRef { revision: revision.into(), index }
    }

    #[test]
    fn a_new_deployment_creates_every_group_at_once() {
        let p = plan(3, "new", 1, &[]);
        assert_eq!(p.create, [r("new", 0), r("new", 1), r("new", 2)]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn steady_state_does_nothing() {
        assert!(plan(2, "new", 1, &[g("new", 0, true), g("new", 1, false)]).is_empty());
    }

    #[test]
    fn scaling_up_takes_the_lowest_free_indices() {
        let p = plan(4, "new", 1, &[g("new", 0, true), g("new", 2, true)]);
        assert_eq!(p.create, [r("new", 1), r("new", 3)]);
    }

    #[test]
    fn scaling_down_removes_unready_then_highest_groups() {
        let p = plan(1, "new", 1, &[g("new", 0, true), g("new", 1, false), g("new", 2, true)]);
        assert_eq!(p.delete, [r("new", 1), r("new", 2)]);
        assert!(p.create.is_empty());
        let p = plan(0, "new", 1, &[g("new", 0, true), g("new", 1, true)]);
        assert_eq!(p.delete.len(), 2, "scale to zero removes every group");
    }

    #[test]
    fn a_rollout_surges_then_replaces_one_group_per_ready_new_group() {
        // Two old groups ready; surge 1: one new group first, nothing old goes yet.
        let old = [g("old", 0, true), g("old", 1, true)];
        let p = plan(2, "new", 1, &old);
        assert_eq!(p.create, [r("new", 0)]);
        assert!(p.delete.is_empty());
        // The new group is starting: wait.
        let p = plan(2, "new", 1, &[old[0].clone(), old[1].clone(), g("new", 0, false)]);
        assert!(p.is_empty(), "{p:?}");
        // It is ready: one old group goes, and the freed slot takes the second new group in the same step.
        let p = plan(2, "new", 1, &[old[0].clone(), old[1].clone(), g("new", 0, true)]);
        assert_eq!(p.delete, [r("old", 1)]);
        assert_eq!(p.create, [r("new", 1)]);
        // The second new group is starting: the last old group stays.
        let p = plan(2, "new", 1, &[old[0].clone(), g("new", 0, true), g("new", 1, false)]);
        assert!(p.is_empty(), "{p:?}");
        // Both new ready: the last old group goes.
        let p = plan(2, "new", 1, &[old[0].clone(), g("new", 0, true), g("new", 1, true)]);
        assert_eq!(p.delete, [r("old", 0)]);
        assert!(p.create.is_empty());
    }

    #[test]
    fn a_larger_surge_creates_more_new_groups_at_once() {
        let old = [g("old", 0, true), g("old", 1, true), g("old", 2, true)];
        let p = plan(3, "new", 2, &old);
        assert_eq!(p.create, [r("new", 0), r("new", 1)]);
    }

    #[test]
    fn surge_zero_replaces_in_place_one_group_at_a_time() {
        let old = [g("old", 0, true), g("old", 1, true)];
        let p = plan(2, "new", 0, &old);
        assert_eq!(p.delete, [r("old", 1)]);
        assert_eq!(p.create, [r("new", 0)]);
        // While the new group starts, the remaining old group must stay.
        let p = plan(2, "new", 0, &[old[0].clone(), g("new", 0, false)]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn old_groups_that_are_not_ready_go_first_and_at_once() {
        let p = plan(2, "new", 1, &[g("old", 0, false), g("old", 1, false)]);
        assert_eq!(p.delete, [r("old", 1), r("old", 0)]);
        assert_eq!(p.create, [r("new", 0), r("new", 1)]);
    }

    #[test]
    fn a_rollout_to_zero_replicas_removes_everything() {
        let p = plan(0, "new", 1, &[g("old", 0, true), g("new", 0, true)]);
        assert_eq!(p.delete.len(), 2);
        assert!(p.create.is_empty());
    }

    #[test]
    fn repeated_plans_converge_without_dropping_below_the_availability_floor() {
        // Apply each plan; a group created in one step is ready at the next.
        for (replicas, surge) in [(1u32, 1u32), (3, 1), (3, 0), (4, 2), (2, 5), (1, 0)] {
            let floor = replicas as usize - usize::from(surge == 0);
            let most = replicas as usize + if surge == 0 { 0 } else { surge as usize };
            let mut groups: Vec<ObservedGroup> = (0..replicas).map(|i| g("old", i, true)).collect();
            let mut steps = 0;
            loop {
                let p = plan(replicas, "new", surge, &groups);
                if p.is_empty() && groups.iter().all(|x| x.ready && x.group.revision == "new") {
                    break;
                }
                let ready_left = groups.iter().filter(|x| x.ready && !p.delete.contains(&x.group)).count();
                assert!(ready_left >= floor, "{replicas}/{surge}: ready fell to {ready_left} (floor {floor})");
                // Time passes: what existed before this step is ready now.
                for x in &mut groups {
                    x.ready = true;
                }
                groups.retain(|x| !p.delete.contains(&x.group));
                groups.extend(p.create.iter().map(|c| ObservedGroup { group: c.clone(), ready: false }));
                assert!(groups.len() <= most, "{replicas}/{surge}: {} groups", groups.len());
                steps += 1;
                assert!(steps < 50, "{replicas}/{surge}: no convergence: {groups:?}");
            }
            assert_eq!(groups.len(), replicas as usize, "{replicas}/{surge}: {groups:?}");
            assert!(groups.iter().all(|x| x.group.revision == "new"), "{replicas}/{surge}: {groups:?}");
        }
    }
}
