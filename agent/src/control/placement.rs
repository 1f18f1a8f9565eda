//! Replica placement: a pure function of the registered nodes.

use std::collections::BTreeMap;

use crate::model::NodeRecord;

/// A topology segment: labels that must all match a node's.
pub type Segment = BTreeMap<String, String>;

/// What to place.
#[derive(Debug, Clone)]
pub struct PlacementRequest {
    pub size: u64,
    pub count: u32,
    pub thin: bool,
    /// Thin replicas may commit up to this percentage of a pool's capacity.
    pub overcommit_pct: u64,
    /// Acceptable segments; empty means anywhere.
    pub requisite: Vec<Segment>,
    /// Segments to try first.
    pub preferred: Vec<Segment>,
    /// Nodes that must not be chosen (they already hold a replica).
    pub exclude: Vec<String>,
}

/// One chosen location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub pool: String,
}

fn matches(node: &NodeRecord, seg: &Segment) -> bool {
    seg.iter().all(|(k, v)| node.topology.get(k) == Some(v))
}

/// Chooses `count` pools on distinct online nodes, most free space first,
/// preferred segments before others. Returns why it could not.
pub fn place(
    nodes: &[NodeRecord],
    online: impl Fn(&NodeRecord) -> bool,
    req: &PlacementRequest,
) -> Result<Vec<Placement>, String> {
    let mut candidates: Vec<(bool, u64, &str, &str)> = Vec::new();
    let mut considered = 0;
    for node in nodes {
        if !online(node) || req.exclude.contains(&node.id) {
            continue;
        }
        if !req.requisite.is_empty() && !req.requisite.iter().any(|s| matches(node, s)) {
            continue;
        }
        considered += 1;
        let best = node
            .pools
            .iter()
            .filter_map(|p| {
                let free = p.capacity_bytes.saturating_sub(p.used_bytes);
                let fits = if req.thin {
                    let limit = p.capacity_bytes.saturating_mul(req.overcommit_pct) / 100;
                    p.committed_bytes.saturating_add(req.size) <= limit
                } else {
                    let uncommitted = p.capacity_bytes.saturating_sub(p.committed_bytes);
                    free >= req.size && uncommitted >= req.size
                };
                fits.then_some((free, p.name.as_str()))
            })
            .max_by_key(|(free, _)| *free);
        if let Some((free, pool)) = best {
            let preferred = req.preferred.iter().any(|s| matches(node, s));
            candidates.push((preferred, free, node.id.as_str(), pool));
        }
    }
    // Preferred first, then most free space, then node id for determinism.
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    if candidates.len() < req.count as usize {
        return Err(format!(
            "{} eligible node(s) with room out of {considered} online and matching",
            candidates.len()
        ));
    }
    Ok(candidates
        .into_iter()
        .take(req.count as usize)
        .map(|(_, _, node, pool)| Placement {
            node: node.to_owned(),
            pool: pool.to_owned(),
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::PoolRecord;

    /// A node in `zone` with one pool of `cap` bytes.
    pub(crate) fn node(id: &str, zone: &str, cap: u64, used: u64, committed: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            engine_endpoint: String::new(),
            nvmf_address: String::new(),
            engine_host_nqn: String::new(),
            host_nqn: String::new(),
            topology: [("zone".to_string(), zone.to_string())].into(),
            pools: vec![PoolRecord {
                name: format!("{id}-pool"),
                disk: String::new(),
                capacity_bytes: cap,
                used_bytes: used,
                committed_bytes: committed,
            }],
            last_seen: 0,
        }
    }

    fn req(count: u32, size: u64, thin: bool) -> PlacementRequest {
        PlacementRequest {
            size,
            count,
            thin,
            overcommit_pct: 1000,
            requisite: vec![],
            preferred: vec![],
            exclude: vec![],
        }
    }

    #[test]
    fn distinct_nodes_most_free_first() {
        let nodes = vec![
            node("a", "z1", 100, 90, 90),
            node("b", "z1", 100, 10, 10),
            node("c", "z2", 100, 50, 50),
        ];
        let p = place(&nodes, |_| true, &req(2, 10, true)).unwrap();
        assert_eq!(
            p.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        assert!(place(&nodes, |_| true, &req(4, 10, true)).is_err());
        assert!(place(&nodes, |n| n.id != "b", &req(3, 10, true)).is_err());
    }

    #[test]
    fn thick_needs_real_space_thin_respects_overcommit() {
        let nodes = vec![node("a", "z1", 100, 0, 950)];
        assert!(place(&nodes, |_| true, &req(1, 60, false)).is_err());
        assert!(place(&nodes, |_| true, &req(1, 50, true)).is_ok());
        assert!(place(&nodes, |_| true, &req(1, 51, true)).is_err());
    }

    #[test]
    fn topology_requisite_and_preferred() {
        let nodes = vec![node("a", "z1", 100, 0, 0), node("b", "z2", 100, 50, 0)];
        let mut r = req(1, 10, true);
        r.requisite = vec![[("zone".to_string(), "z2".to_string())].into()];
        assert_eq!(place(&nodes, |_| true, &r).unwrap()[0].node, "b");
        let mut r = req(1, 10, true);
        r.preferred = vec![[("zone".to_string(), "z2".to_string())].into()];
        assert_eq!(place(&nodes, |_| true, &r).unwrap()[0].node, "b");
    }
}
