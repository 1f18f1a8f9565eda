//! The reconciler: brings every volume back to its wanted number of healthy
//! replicas, and removes what no volume needs.
//!
//! One agent at a time runs it (the holder of [`CONTROL_LEASE`]), one round
//! every `reconcile_period`. A round, for each volume:
//!
//! ```text
//!  Creating/Deleting for longer than stale_op_after  -> finish (or undo) it
//!  Ready:
//!   1. replica on a dead node, dropped by the nexus
//!      health record, or faulted by its own pool
//!      (ListReplicas FAULTED: it may have lost data)  -> healthy = false;
//!                                                        a pool-faulted one is
//!                                                        lost: never brought
//!                                                        back, replaced at once
//!   2. the nexus (published, or a temporary rebuild one):
//!      child FAULTED                                  -> healthy = false
//!        its node back within replace_after, with a
//!        valid dirty-region log                       -> OnlineChild (resync)
//!      child HEALTHY after a rebuild or resync        -> health record += it,
//!                                                        healthy = true,
//!                                                        the replica it
//!                                                        replaces leaves
//!      child naming no recorded replica               -> RemoveChild
//!   3. replica unhealthy longer than replace_after
//!      (or its node is gone)                          -> new replica elsewhere,
//!                                                        recorded first
//!                                                        (rebuilding = true);
//!        nowhere to place it, its node is back        -> rebuilt in place
//!                                                        (OnlineChild, or
//!                                                        AddChild)
//!   4. rebuilding replica not in the nexus            -> create, share,
//!                                                        AddChild; unpublished
//!                                                        volumes first get a
//!                                                        rebuild nexus
//!                                                        (recorded first) on
//!                                                        a healthy replica's
//!                                                        node, open to no host
//!   5. rebuild nexus with nothing left to rebuild     -> destroyed
//! ```
//!
//! then garbage collection on every online node: replicas no volume record
//! names are destroyed, nexuses where no record places one are destroyed,
//! shares no nexus needs are removed. Engines are listed before records are
//! read, and every object is recorded before it is made, so nothing in the
//! middle of being made is collected.
//!
//! Every step is idempotent: intent is written to the volume record (with
//! compare-and-put, so a concurrent change aborts the round for that
//! volume) before the engines are touched, and a round cut short anywhere
//! is finished by the next one.

use std::collections::{HashMap, HashSet};

use cairn_proto::engine::v1 as pb;
use tonic::Code;

use super::lease::CONTROL_LEASE;
use super::placement::{place, PlacementRequest};
use super::{add_child, engine_err, now_secs, Control, Holder};
use crate::error::ControlError;
use crate::model::{
    replica_of_child_uri, NexusHealth, NodeRecord, ReplicaSpec, VolumePhase, VolumeSpec,
};

/// What one reconciler round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// Replicas newly marked unhealthy.
    pub marked_unhealthy: usize,
    /// Faulted children brought back with OnlineChild.
    pub onlined: usize,
    /// Replacement replicas placed (recorded).
    pub replacements_placed: usize,
    /// Children added to a nexus to be rebuilt.
    pub rebuilds_started: usize,
    /// Rebuilt or resynced replicas marked healthy.
    pub rebuilds_finished: usize,
    /// Rebuild nexuses created for unpublished volumes.
    pub rebuild_nexuses_created: usize,
    /// Rebuild nexuses torn down after their work.
    pub rebuild_nexuses_removed: usize,
    /// Creations and deletions cut short earlier and finished now.
    pub finished_ops: usize,
    pub gc_replicas: usize,
    pub gc_nexuses: usize,
    pub gc_shares: usize,
    /// What failed (retried next round).
    pub errors: Vec<String>,
}

impl RoundReport {
    /// True when the round changed nothing and met no error.
    pub fn is_quiet(&self) -> bool {
        *self == RoundReport::default()
    }
}

/// Runs reconciler rounds for as long as the future lives, whenever
/// `holder` holds (or can take) the control lease.
pub async fn run(control: Control, holder: String) {
    let period = control.cfg.reconcile_period;
    loop {
        match control.acquire_lease(CONTROL_LEASE, &holder).await {
            Ok(true) => {
                let report = control.round(Some(CONTROL_LEASE)).await;
                if !report.is_quiet() {
                    tracing::info!(holder = %holder, ?report, "reconciler round");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(holder = %holder, error = %e, "cannot take the control lease"),
        }
        tokio::time::sleep(period).await;
    }
}

/// Where a replacement replica of `vol` may go: on a node holding none of
/// its replicas, under the topology the volume was created with.
fn replacement_request(vol: &VolumeSpec, overcommit_pct: u64) -> PlacementRequest {
    PlacementRequest {
        size: vol.size_bytes,
        count: 1,
        thin: vol.thin,
        overcommit_pct,
        requisite: vol.requisite.clone(),
        preferred: vol.preferred.clone(),
        exclude: vol.replicas.iter().map(|r| r.node.clone()).collect(),
    }
}

/// The registered nodes, with their liveness fixed for one round.
struct View {
    nodes: Vec<NodeRecord>,
    online: HashSet<String>,
    /// Nodes offline for longer than the node lease plus `replace_after`:
    /// their replicas count as lost, not as away for a blip.
    dead: HashSet<String>,
    /// Each node's nexuses, listed once per round on first use (one call
    /// per node, not one per volume).
    nexuses: std::sync::Mutex<HashMap<String, std::sync::Arc<Vec<pb::Nexus>>>>,
    /// Each node's replicas that its pools faulted, listed the same way.
    pool_faulted: std::sync::Mutex<HashMap<String, std::sync::Arc<HashSet<String>>>>,
}

impl View {
    fn is_dead(&self, id: &str) -> bool {
        self.dead.contains(id) || !self.known(id)
    }

    fn is_online(&self, id: &str) -> bool {
        self.online.contains(id)
    }

    fn online_node(&self, id: &str) -> Option<&NodeRecord> {
        self.nodes
            .iter()
            .find(|n| n.id == id && self.online.contains(id))
    }

    fn known(&self, id: &str) -> bool {
        self.nodes.iter().any(|n| n.id == id)
    }
}

fn retire(r: &mut ReplicaSpec, now: i64) {
    r.healthy = false;
    r.unhealthy_since = now;
}

/// Retires the replicas in `lost` (faulted by their own pool); returns how
/// many were healthy.
fn retire_lost(vol: &mut VolumeSpec, lost: &HashSet<String>, now: i64) -> usize {
    let mut n = 0;
    for r in vol.replicas.iter_mut().filter(|r| lost.contains(&r.uuid)) {
        if r.healthy {
            retire(r, now);
            n += 1;
        }
    }
    n
}

fn local_uri(uuid: &str) -> String {
    format!("replica:///{uuid}")
}

/// What a nexus's children say about a volume's replicas.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChildAssessment {
    /// The child URI of each replica in the nexus.
    uri_of: HashMap<String, String>,
    /// Children to remove: URIs naming no replica, replicas the volume no
    /// longer records, failed replacements.
    remove_uris: Vec<String>,
    /// Rebuilt or resynced replicas, healthy in the nexus now.
    became_healthy: Vec<String>,
    /// Replacements whose child failed: they leave the volume.
    drop_uuids: Vec<String>,
    /// Faulted children whose node is online: (replica, URI, whether the
    /// dirty-region log can tell what they missed).
    faulted_back: Vec<(String, String, bool)>,
    /// Replicas marked unhealthy.
    marked: usize,
}

/// Compares the nexus's children with the volume record: retires replicas
/// behind faulted children, and healthy ones the nexus does not write to.
fn assess_children(
    vol: &mut VolumeSpec,
    children: &[pb::NexusChild],
    online: impl Fn(&str) -> bool,
    now: i64,
) -> ChildAssessment {
    let replaced: HashSet<String> = vol
        .replicas
        .iter()
        .filter_map(|r| r.replaces.clone())
        .collect();
    let mut a = ChildAssessment::default();
    for c in children {
        let Some(u) = replica_of_child_uri(&c.uri) else {
            a.remove_uris.push(c.uri.clone());
            continue;
        };
        a.uri_of.insert(u.to_owned(), c.uri.clone());
        let Some(r) = vol.replicas.iter_mut().find(|r| r.uuid == u) else {
            a.remove_uris.push(c.uri.clone());
            continue;
        };
        match pb::ChildState::try_from(c.state) {
            Ok(pb::ChildState::Faulted) => {
                if r.healthy {
                    retire(r, now);
                    a.marked += 1;
                }
                if r.rebuilding && r.replaces.is_some() {
                    a.drop_uuids.push(r.uuid.clone());
                    a.remove_uris.push(c.uri.clone());
                } else if !replaced.contains(&r.uuid) && online(&r.node) {
                    a.faulted_back
                        .push((r.uuid.clone(), c.uri.clone(), c.dirty_bytes.is_some()));
                }
            }
            Ok(pb::ChildState::Healthy)
                if r.rebuilding || (!r.healthy && !replaced.contains(&r.uuid)) =>
            {
                a.became_healthy.push(r.uuid.clone());
            }
            _ => {}
        }
    }
    for r in vol.replicas.iter_mut() {
        if r.healthy && !a.uri_of.contains_key(&r.uuid) {
            retire(r, now);
            a.marked += 1;
        }
    }
    a
}

/// Marks rebuilt replicas healthy; returns the replicas they replace,
/// which leave the volume.
fn finish_rebuilds(vol: &mut VolumeSpec, healthy: &[String]) -> Vec<String> {
    let mut old = Vec::new();
    for r in vol
        .replicas
        .iter_mut()
        .filter(|r| healthy.contains(&r.uuid))
    {
        r.healthy = true;
        r.rebuilding = false;
        r.unhealthy_since = 0;
        old.extend(r.replaces.take());
    }
    old
}

/// Replicas to replace: unhealthy for `replace_after` seconds, on a dead
/// node or `lost` (their pool faulted them), not being rebuilt, not already
/// being replaced, and not brought back this round.
fn due_for_replacement(
    vol: &VolumeSpec,
    now: i64,
    replace_after: i64,
    dead: impl Fn(&str) -> bool,
    lost: &HashSet<String>,
    skip: &HashSet<String>,
) -> Vec<String> {
    let replaced: HashSet<&str> = vol
        .replicas
        .iter()
        .filter_map(|r| r.replaces.as_deref())
        .collect();
    vol.replicas
        .iter()
        .filter(|r| {
            !r.healthy
                && !r.rebuilding
                && !replaced.contains(r.uuid.as_str())
                && !skip.contains(&r.uuid)
                && (now.saturating_sub(r.unhealthy_since) >= replace_after
                    || dead(&r.node)
                    || lost.contains(&r.uuid))
        })
        .map(|r| r.uuid.clone())
        .collect()
}

impl Control {
    /// One reconciler round over every volume, then garbage collection.
    /// Errors are collected in the report; the next round retries.
    pub async fn reconcile_once(&self) -> RoundReport {
        self.round(None).await
    }

    /// A round; with `lease`, it stops early once this process's hold on
    /// that lease has lapsed (another agent may have taken over).
    async fn round(&self, lease: Option<&str>) -> RoundReport {
        let mut rep = RoundReport::default();
        let lapsed = || lease.is_some_and(|l| !self.holds_lease(l));
        let nodes = match self.nodes().await {
            Ok(n) => n,
            Err(e) => {
                rep.errors.push(e.to_string());
                return rep;
            }
        };
        let online = nodes
            .iter()
            .filter(|n| self.is_online(n))
            .map(|n| n.id.clone())
            .collect();
        let dead_after = (self.cfg.node_lease + self.cfg.replace_after).as_secs() as i64;
        let dead = nodes
            .iter()
            .filter(|n| now_secs().saturating_sub(n.last_seen) > dead_after)
            .map(|n| n.id.clone())
            .collect();
        let view = View {
            nodes,
            online,
            dead,
            nexuses: Default::default(),
            pool_faulted: Default::default(),
        };
        let ids: Vec<String> = match self.volumes().await {
            Ok(v) => v.into_iter().map(|v| v.id).collect(),
            Err(e) => {
                rep.errors.push(e.to_string());
                return rep;
            }
        };
        for id in ids {
            if lapsed() {
                rep.errors
                    .push("the control lease lapsed during the round".into());
                return rep;
            }
            if let Err(e) = self.reconcile_volume(&id, &view, &mut rep).await {
                rep.errors.push(format!("volume {id}: {e}"));
            }
        }
        if self.cfg.garbage_collect && !lapsed() {
            if let Err(e) = self.collect_garbage(&view, &mut rep).await {
                rep.errors.push(format!("garbage collection: {e}"));
            }
        }
        rep
    }

    /// Writes the volume record if nobody changed it since `ver`.
    async fn commit(&self, vol: &VolumeSpec, ver: &mut u64) -> Result<bool, ControlError> {
        match self.save_if(vol, *ver).await? {
            Some(v) => {
                *ver = v;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Volume `id`'s nexus on `node` as the node's engine listed it this
    /// round.
    async fn find_nexus(
        &self,
        view: &View,
        node: &NodeRecord,
        id: &str,
    ) -> Result<Option<pb::Nexus>, ControlError> {
        let cached = view
            .nexuses
            .lock()
            .expect("poisoned")
            .get(&node.id)
            .cloned();
        let listed = match cached {
            Some(l) => l,
            None => {
                let l = std::sync::Arc::new(self.list_nexuses_on(node).await?);
                view.nexuses
                    .lock()
                    .expect("poisoned")
                    .insert(node.id.clone(), l.clone());
                l
            }
        };
        Ok(listed.iter().find(|n| n.uuid == id).cloned())
    }

    /// The replicas `node`'s pools faulted, as its engine listed them this
    /// round (none when the listing fails: the node's nexus faults a child
    /// that fails I/O anyway).
    async fn pool_faulted_on(
        &self,
        view: &View,
        node: &NodeRecord,
    ) -> std::sync::Arc<HashSet<String>> {
        let cached = view
            .pool_faulted
            .lock()
            .expect("poisoned")
            .get(&node.id)
            .cloned();
        if let Some(c) = cached {
            return c;
        }
        let listed = match self.engine(node) {
            Ok(mut e) => e
                .list_replicas(pb::ListReplicasRequest::default())
                .await
                .map(|r| r.into_inner().replicas)
                .map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let set: HashSet<String> = match listed {
            Ok(reps) => reps
                .into_iter()
                .filter(|r| r.state == pb::ReplicaState::Faulted as i32)
                .map(|r| r.uuid)
                .collect(),
            Err(e) => {
                tracing::warn!(node = %node.id, error = %e, "listing replicas failed");
                HashSet::new()
            }
        };
        let set = std::sync::Arc::new(set);
        view.pool_faulted
            .lock()
            .expect("poisoned")
            .insert(node.id.clone(), set.clone());
        set
    }

    async fn reconcile_volume(
        &self,
        id: &str,
        view: &View,
        rep: &mut RoundReport,
    ) -> Result<(), ControlError> {
        // Busy: an operation on the volume is running here; next round.
        let Ok(_guard) = self.try_lock(id, Holder::Reconciler) else {
            return Ok(());
        };
        let Some((mut vol, mut ver)) = self.load::<VolumeSpec>(id).await? else {
            return Ok(());
        };
        let now = now_secs();
        let stale = now.saturating_sub(vol.phase_since) >= self.cfg.stale_op_after.as_secs() as i64;
        match vol.phase {
            VolumePhase::Creating if stale => {
                if vol.replicas.iter().all(|r| view.is_online(&r.node)) {
                    self.finish_create(&mut vol, ver).await?;
                } else {
                    // A chosen node is gone: undo; a retried create
                    // places the volume again.
                    vol.phase = VolumePhase::Deleting;
                    vol.phase_since = now;
                    if !self.commit(&vol, &mut ver).await? {
                        return Ok(());
                    }
                    self.finish_delete(&vol).await?;
                }
                rep.finished_ops += 1;
                return Ok(());
            }
            VolumePhase::Deleting if stale => {
                self.finish_delete(&vol).await?;
                rep.finished_ops += 1;
                return Ok(());
            }
            VolumePhase::Ready => {}
            VolumePhase::Creating | VolumePhase::Deleting => return Ok(()),
        }
        let (record, record_ver) = match self.load::<NexusHealth>(id).await? {
            Some((h, v)) => (Some(h), v),
            None => (None, 0),
        };

        // Replicas their own pool faulted (a damaged group header may have
        // held their clusters) are lost, like a dead node's.
        let mut lost: HashSet<String> = HashSet::new();
        let replica_nodes: HashSet<String> = vol.replicas.iter().map(|r| r.node.clone()).collect();
        for n in &replica_nodes {
            if let Some(node) = view.online_node(n) {
                let faulted = self.pool_faulted_on(view, node).await;
                lost.extend(
                    vol.replicas
                        .iter()
                        .filter(|r| &r.node == n && faulted.contains(&r.uuid))
                        .map(|r| r.uuid.clone()),
                );
            }
        }

        // 1. Dead nodes, the health record and faulting pools retire
        // replicas; a replacement whose node died is dropped (placed again
        // later). A node away for a blip retires nothing by itself: a nexus
        // that writes while it is away faults the child and records that.
        let mut changed = false;
        let n = retire_lost(&mut vol, &lost, now);
        if n > 0 {
            tracing::warn!(volume = %id, replicas = ?lost, "replicas faulted by their pool marked unhealthy");
            rep.marked_unhealthy += n;
            changed = true;
        }
        let before = vol.replicas.len();
        vol.replicas
            .retain(|r| !(r.rebuilding && r.replaces.is_some() && view.is_dead(&r.node)));
        changed |= vol.replicas.len() != before;
        for r in vol.replicas.iter_mut() {
            let dropped = record
                .as_ref()
                .is_some_and(|h| !h.healthy.contains(&r.uuid));
            if r.healthy && (view.is_dead(&r.node) || dropped) {
                retire(r, now);
                rep.marked_unhealthy += 1;
                changed = true;
                tracing::warn!(volume = %id, replica = %r.uuid, node = %r.node, "replica marked unhealthy");
            } else if !r.healthy && r.unhealthy_since == 0 {
                r.unhealthy_since = now;
                changed = true;
            }
            if r.rebuilding && r.replaces.is_none() && !view.is_online(&r.node) {
                r.rebuilding = false;
                changed = true;
            }
        }
        if changed && !self.commit(&vol, &mut ver).await? {
            return Ok(());
        }
        changed = false;

        // 2. The nexus that serves or rebuilds the volume.
        let mut nexus: Option<(NodeRecord, pb::Nexus)> = None;
        if let Some(nn) = vol.nexus_node().map(str::to_owned) {
            let Some(node) = view.online_node(&nn).cloned() else {
                if vol.target.is_none() {
                    // The rebuild nexus's node is gone: start over elsewhere.
                    vol.rebuild_nexus = None;
                    for r in vol.replicas.iter_mut() {
                        r.rebuilding &= r.replaces.is_some();
                    }
                    vol.replicas
                        .retain(|r| !(r.rebuilding && r.replaces.is_some()));
                    self.commit(&vol, &mut ver).await?;
                }
                // A published volume whose nexus node is down waits for it.
                return Ok(());
            };
            match self.find_nexus(view, &node, id).await? {
                Some(nx) => nexus = Some((node, nx)),
                None => {
                    // The engine lost it (restart): build it again; the
                    // next round drives it.
                    let hosts = if vol.target.is_some() {
                        vec![node.host_nqn.clone()]
                    } else {
                        vec![node.engine_host_nqn.clone()]
                    };
                    self.ensure_nexus(&mut vol, &node, hosts).await?;
                    tracing::info!(volume = %id, node = %node.id, "nexus re-created");
                    return Ok(());
                }
            }
        }

        // 3. The nexus's children.
        let ChildAssessment {
            uri_of,
            mut remove_uris,
            mut became_healthy,
            mut drop_uuids,
            faulted_back,
            marked,
        } = match &nexus {
            Some((_, nx)) => assess_children(&mut vol, &nx.children, |n| view.is_online(n), now),
            None => ChildAssessment::default(),
        };
        // A child whose pool faulted it may look healthy to its nexus until
        // it fails an I/O: it never becomes healthy again, and the nexus is
        // told to fault it now.
        became_healthy.retain(|u| !lost.contains(u));
        if let Some((node, nx)) = &nexus {
            for c in nx.children.iter().filter(|c| {
                c.state != pb::ChildState::Faulted as i32
                    && replica_of_child_uri(&c.uri).is_some_and(|u| lost.contains(u))
            }) {
                let faulted = match self.engine(node) {
                    Ok(mut e) => e
                        .fault_child(pb::FaultChildRequest {
                            uuid: id.to_owned(),
                            uri: c.uri.clone(),
                        })
                        .await
                        .map(|_| ())
                        .map_err(|s| s.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = faulted {
                    rep.errors
                        .push(format!("volume {id}: fault child {}: {e}", c.uri));
                }
            }
        }
        rep.marked_unhealthy += marked;
        changed |= marked > 0 || !drop_uuids.is_empty();
        let mut retired: Vec<ReplicaSpec> = Vec::new();
        if !became_healthy.is_empty()
            && self
                .add_to_health_record(id, record_ver, &became_healthy)
                .await?
        {
            drop_uuids.extend(finish_rebuilds(&mut vol, &became_healthy));
            rep.rebuilds_finished += became_healthy.len();
            tracing::info!(volume = %id, replicas = ?became_healthy, "replicas healthy again");
            changed = true;
        }
        if !drop_uuids.is_empty() {
            retired = vol
                .replicas
                .iter()
                .filter(|r| drop_uuids.contains(&r.uuid))
                .cloned()
                .collect();
            vol.replicas.retain(|r| !drop_uuids.contains(&r.uuid));
            changed = true;
            for r in &retired {
                if let Some(uri) = uri_of.get(&r.uuid) {
                    if !remove_uris.contains(uri) {
                        remove_uris.push(uri.clone());
                    }
                }
            }
        }
        if changed && !self.commit(&vol, &mut ver).await? {
            return Ok(());
        }
        changed = false;
        if let Some((node, _)) = &nexus {
            let mut engine = self.engine(node)?;
            for uri in &remove_uris {
                match engine
                    .remove_child(pb::RemoveChildRequest {
                        uuid: id.to_owned(),
                        uri: uri.clone(),
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => rep
                        .errors
                        .push(format!("volume {id}: remove child {uri}: {s}")),
                }
            }
        }
        for r in &retired {
            // An unreachable node's replica is collected when it returns.
            if let Err(e) = self.destroy_replica(r).await {
                rep.errors
                    .push(format!("volume {id}: destroy replica {}: {e}", r.uuid));
            }
        }

        // Faulted children whose node is back after a short outage, with a
        // usable log: resync. After `replace_after` they are replaced
        // instead (a child that keeps failing must not be resynced for
        // ever), and resynced only when there is nowhere else to go.
        let replace_after = self.cfg.replace_after.as_secs() as i64;
        let mut onlined: HashSet<String> = HashSet::new();
        if let Some((node, _)) = &nexus {
            for (u, uri, dirty) in &faulted_back {
                if lost.contains(u) {
                    continue;
                }
                let recent = vol
                    .replicas
                    .iter()
                    .any(|r| &r.uuid == u && now.saturating_sub(r.unhealthy_since) < replace_after);
                if *dirty && recent && self.online_child(&vol, node, view, u, uri, rep).await {
                    onlined.insert(u.clone());
                }
            }
        }

        // 4. Replace replicas unhealthy for too long.
        let has_source = vol
            .replicas
            .iter()
            .any(|r| r.healthy && view.is_online(&r.node));
        let due = due_for_replacement(
            &vol,
            now,
            replace_after,
            |n| view.is_dead(n),
            &lost,
            &onlined,
        );
        let mut full_online: Vec<String> = Vec::new();
        if has_source {
            for old in due {
                let placed = place(
                    &view.nodes,
                    |n| view.is_online(&n.id),
                    &replacement_request(&vol, self.cfg.overcommit_pct),
                );
                match placed {
                    Ok(p) if !p.is_empty() => {
                        let new = ReplicaSpec {
                            uuid: uuid::Uuid::new_v4().to_string(),
                            node: p[0].node.clone(),
                            pool: p[0].pool.clone(),
                            healthy: false,
                            unhealthy_since: now,
                            rebuilding: true,
                            replaces: Some(old.clone()),
                        };
                        tracing::info!(volume = %id, old = %old, new = %new.uuid, node = %new.node, "replacement replica placed");
                        vol.replicas.push(new);
                        rep.replacements_placed += 1;
                        changed = true;
                    }
                    _ => {
                        // Nowhere else to go: rebuild it in place once its
                        // node is back (a full copy).
                        let Some(r) = vol.replicas.iter_mut().find(|r| r.uuid == old) else {
                            continue;
                        };
                        // A replica its pool faulted cannot be rebuilt in
                        // place: it fails every I/O.
                        if !view.is_online(&r.node) || lost.contains(&old) {
                            continue;
                        }
                        if uri_of.contains_key(&old) {
                            full_online.push(old.clone());
                        } else {
                            r.rebuilding = true;
                            changed = true;
                        }
                    }
                }
            }
        }
        if changed && !self.commit(&vol, &mut ver).await? {
            return Ok(());
        }
        if let Some((node, _)) = &nexus {
            for u in &full_online {
                if let Some(uri) = uri_of.get(u) {
                    self.online_child(&vol, node, view, u, uri, rep).await;
                }
            }
        }

        // 5. Rebuilding replicas the nexus lacks: add them.
        let pending: Vec<ReplicaSpec> = vol
            .replicas
            .iter()
            .filter(|r| r.rebuilding && !uri_of.contains_key(&r.uuid) && view.is_online(&r.node))
            .cloned()
            .collect();
        if !pending.is_empty() {
            let node = match &nexus {
                Some((node, _)) => node.clone(),
                None => {
                    let source = vol.replicas.iter().find(|r| {
                        r.healthy
                            && view.is_online(&r.node)
                            && record.as_ref().is_none_or(|h| h.healthy.contains(&r.uuid))
                    });
                    let Some(node) = source.and_then(|r| view.online_node(&r.node)).cloned() else {
                        return Ok(());
                    };
                    // Intent first, so a crash leaves a nexus that is found.
                    vol.rebuild_nexus = Some(node.id.clone());
                    if !self.commit(&vol, &mut ver).await? {
                        return Ok(());
                    }
                    // Open to no host: only this engine's own NQN.
                    self.ensure_nexus(&mut vol, &node, vec![node.engine_host_nqn.clone()])
                        .await?;
                    rep.rebuild_nexuses_created += 1;
                    tracing::info!(volume = %id, node = %node.id, "rebuild nexus created");
                    node
                }
            };
            for r in &pending {
                if let Err(e) = self.add_rebuild_child(&vol, &node, view, r).await {
                    rep.errors
                        .push(format!("volume {id}: add child {}: {e}", r.uuid));
                } else {
                    rep.rebuilds_started += 1;
                }
            }
            return Ok(());
        }

        // 6. A rebuild nexus with nothing left to rebuild goes.
        if vol.target.is_none() && !vol.replicas.iter().any(|r| r.rebuilding) {
            if let Some(nn) = vol.rebuild_nexus.take() {
                if !self.commit(&vol, &mut ver).await? {
                    return Ok(());
                }
                self.destroy_nexus(&nn, id).await?;
                rep.rebuild_nexuses_removed += 1;
                tracing::info!(volume = %id, node = %nn, "rebuild nexus removed");
            }
        }
        Ok(())
    }

    /// Shares a faulted child's replica again (its engine may have
    /// restarted) and brings it back with OnlineChild. True on success.
    async fn online_child(
        &self,
        vol: &VolumeSpec,
        nexus_node: &NodeRecord,
        view: &View,
        uuid: &str,
        uri: &str,
        rep: &mut RoundReport,
    ) -> bool {
        let Some(r) = vol.replicas.iter().find(|r| r.uuid == uuid) else {
            return false;
        };
        let step = async {
            if r.node != nexus_node.id {
                let holder = view.online_node(&r.node).ok_or(ControlError::NotFound {
                    kind: "node",
                    id: r.node.clone(),
                })?;
                self.share_to(holder, uuid, &nexus_node.engine_host_nqn)
                    .await?;
            }
            let mut engine = self.engine(nexus_node)?;
            engine
                .online_child(pb::OnlineChildRequest {
                    uuid: vol.id.clone(),
                    uri: uri.to_owned(),
                })
                .await
                .map_err(engine_err(&nexus_node.id))?;
            Ok::<_, ControlError>(())
        };
        match step.await {
            Ok(()) => {
                rep.onlined += 1;
                tracing::info!(volume = %vol.id, replica = %uuid, "faulted child brought back");
                true
            }
            Err(e) => {
                rep.errors
                    .push(format!("volume {}: online child {uri}: {e}", vol.id));
                false
            }
        }
    }

    /// Creates a rebuilding replica, shares it to the nexus's engine and
    /// adds it to the nexus.
    async fn add_rebuild_child(
        &self,
        vol: &VolumeSpec,
        nexus_node: &NodeRecord,
        view: &View,
        r: &ReplicaSpec,
    ) -> Result<(), ControlError> {
        let holder = view.online_node(&r.node).ok_or(ControlError::NotFound {
            kind: "node",
            id: r.node.clone(),
        })?;
        self.create_replica(holder, r, vol).await?;
        let uri = if r.node == nexus_node.id {
            local_uri(&r.uuid)
        } else {
            self.share_to(holder, &r.uuid, &nexus_node.engine_host_nqn)
                .await?
        };
        let mut engine = self.engine(nexus_node)?;
        add_child(&mut engine, &vol.id, &uri, &nexus_node.id).await?;
        tracing::info!(volume = %vol.id, replica = %r.uuid, node = %r.node, nexus = %nexus_node.id, "rebuild started");
        Ok(())
    }

    /// Destroys, on online nodes, replicas no volume record names, nexuses
    /// where no volume record places one, and shares no nexus needs.
    async fn collect_garbage(
        &self,
        view: &View,
        rep: &mut RoundReport,
    ) -> Result<(), ControlError> {
        // Engines first, records second: whatever an engine holds was
        // recorded before it was made, so it shows in the later read.
        let mut seen = Vec::new();
        for node in view.nodes.iter().filter(|n| view.is_online(&n.id)) {
            let mut engine = self.engine(node)?;
            let listed = async {
                let replicas = engine
                    .list_replicas(pb::ListReplicasRequest::default())
                    .await?
                    .into_inner()
                    .replicas;
                let nexuses = engine
                    .list_nexuses(pb::ListNexusesRequest {})
                    .await?
                    .into_inner()
                    .nexuses;
                Ok::<_, tonic::Status>((replicas, nexuses))
            };
            match listed.await {
                Ok((replicas, nexuses)) => seen.push((node, replicas, nexuses)),
                Err(s) => rep.errors.push(format!("listing node {}: {s}", node.id)),
            }
        }
        let volumes: HashMap<String, VolumeSpec> = self
            .volumes()
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let owner: HashMap<&str, &VolumeSpec> = volumes
            .values()
            .flat_map(|v| v.replicas.iter().map(move |r| (r.uuid.as_str(), v)))
            .collect();
        let busy: HashSet<String> = self
            .busy
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        for (node, replicas, nexuses) in seen {
            let mut engine = self.engine(node)?;
            for nx in nexuses {
                let keep = busy.contains(&nx.uuid)
                    || volumes.get(&nx.uuid).is_some_and(|v| {
                        v.nexus_node() == Some(node.id.as_str()) || v.phase == VolumePhase::Deleting
                    });
                if keep {
                    continue;
                }
                match engine
                    .destroy_nexus(pb::DestroyNexusRequest {
                        uuid: nx.uuid.clone(),
                    })
                    .await
                {
                    Ok(_) => {
                        rep.gc_nexuses += 1;
                        tracing::info!(node = %node.id, nexus = %nx.uuid, "orphaned nexus destroyed");
                    }
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => rep
                        .errors
                        .push(format!("destroy nexus {} on {}: {s}", nx.uuid, node.id)),
                }
            }
            for r in replicas {
                match owner.get(r.uuid.as_str()) {
                    None => match engine
                        .destroy_replica(pb::DestroyReplicaRequest {
                            uuid: r.uuid.clone(),
                        })
                        .await
                    {
                        Ok(_) => {
                            rep.gc_replicas += 1;
                            tracing::info!(node = %node.id, replica = %r.uuid, "orphaned replica destroyed");
                        }
                        Err(s) if s.code() == Code::NotFound => {}
                        Err(s) => rep
                            .errors
                            .push(format!("destroy replica {} on {}: {s}", r.uuid, node.id)),
                    },
                    Some(v) => {
                        let needed = v.nexus_node().is_some_and(|n| n != node.id);
                        if r.share_nqn.is_empty() || needed || busy.contains(&v.id) {
                            continue;
                        }
                        match engine
                            .unshare_replica(pb::UnshareReplicaRequest {
                                uuid: r.uuid.clone(),
                            })
                            .await
                        {
                            Ok(_) => rep.gc_shares += 1,
                            Err(s) if s.code() == Code::NotFound => {}
                            Err(s) => rep
                                .errors
                                .push(format!("unshare {} on {}: {s}", r.uuid, node.id)),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
    const B: &str = "0b0b0b0b-0000-4000-8000-00000000000b";
    const C: &str = "0c0c0c0c-0000-4000-8000-00000000000c";

    fn vol(replicas: Vec<ReplicaSpec>) -> VolumeSpec {
        VolumeSpec {
            id: "v".into(),
            name: "v".into(),
            size_bytes: 1 << 20,
            replicas_wanted: 2,
            thin: true,
            phase: VolumePhase::Ready,
            replicas,
            target: None,
            topology: Default::default(),
            rebuild_nexus: None,
            nexus_instance: String::new(),
            phase_since: 0,
            requisite: vec![],
            preferred: vec![],
        }
    }

    fn replica(uuid: &str, node: &str) -> ReplicaSpec {
        ReplicaSpec::new(uuid.into(), node.into(), "p".into())
    }

    #[test]
    fn a_replacement_keeps_the_volumes_topology_and_avoids_its_nodes() {
        use crate::control::placement::tests::node;
        // n2 (zone b) has the most room, but the volume was made for zone a.
        let nodes = vec![
            node("n1", "a", 1 << 30, 0, 0),
            node("n2", "b", 8 << 30, 0, 0),
            node("n3", "a", 1 << 30, 0, 0),
        ];
        let mut v = vol(vec![replica("r1", "n1")]);
        v.requisite = vec![[("zone".to_string(), "a".to_string())].into()];
        let req = replacement_request(&v, 1000);
        assert_eq!(req.exclude, vec!["n1".to_owned()]);
        let placed = place(&nodes, |_| true, &req).unwrap();
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].node, "n3");
        // Without a constraint the roomiest other node wins.
        v.requisite.clear();
        let placed = place(&nodes, |_| true, &replacement_request(&v, 1000)).unwrap();
        assert_eq!(placed[0].node, "n2");
    }

    fn child(uuid: &str, state: pb::ChildState, dirty: Option<u64>) -> pb::NexusChild {
        pb::NexusChild {
            uri: format!("nvmf://h:1/nqn.2024-01.dev.cairn:replica:{uuid}"),
            state: state as i32,
            dirty_bytes: dirty,
            ..Default::default()
        }
    }

    #[test]
    fn a_faulted_child_is_retired_and_offered_back_when_its_node_is_up() {
        let mut v = vol(vec![replica(A, "n1"), replica(B, "n2")]);
        let children = [
            child(A, pb::ChildState::Healthy, None),
            child(B, pb::ChildState::Faulted, Some(4096)),
        ];
        let a = assess_children(&mut v, &children, |_| true, 100);
        assert_eq!(a.marked, 1);
        assert!(v.replicas[0].healthy);
        assert!(!v.replicas[1].healthy);
        assert_eq!(v.replicas[1].unhealthy_since, 100);
        assert_eq!(a.faulted_back.len(), 1);
        assert_eq!(a.faulted_back[0].0, B);
        assert!(a.faulted_back[0].2, "the log can tell");
        assert!(a.remove_uris.is_empty() && a.drop_uuids.is_empty());

        // Its node down: retired, not offered back.
        let mut v = vol(vec![replica(A, "n1"), replica(B, "n2")]);
        let a = assess_children(&mut v, &children, |n| n != "n2", 100);
        assert!(a.faulted_back.is_empty());
        assert_eq!(a.marked, 1);
    }

    #[test]
    fn a_failed_replacement_is_dropped_and_a_finished_one_replaces_the_old() {
        let mut new = replica(C, "n3");
        new.healthy = false;
        new.rebuilding = true;
        new.replaces = Some(B.into());
        let mut old = replica(B, "n2");
        old.healthy = false;
        old.unhealthy_since = 5;
        let mut v = vol(vec![replica(A, "n1"), old, new]);

        let failed = [
            child(A, pb::ChildState::Healthy, None),
            child(B, pb::ChildState::Faulted, Some(0)),
            child(C, pb::ChildState::Faulted, None),
        ];
        let a = assess_children(&mut v.clone(), &failed, |_| true, 9);
        assert_eq!(a.drop_uuids, vec![C.to_owned()]);
        assert_eq!(a.remove_uris.len(), 1);
        assert!(a.remove_uris[0].ends_with(C));
        // The old replica is being replaced: not offered back.
        assert!(a.faulted_back.is_empty());

        let done = [
            child(A, pb::ChildState::Healthy, None),
            child(B, pb::ChildState::Faulted, Some(0)),
            child(C, pb::ChildState::Healthy, None),
        ];
        let a = assess_children(&mut v, &done, |_| true, 9);
        assert_eq!(a.became_healthy, vec![C.to_owned()]);
        let gone = finish_rebuilds(&mut v, &a.became_healthy);
        assert_eq!(gone, vec![B.to_owned()]);
        let c = v.replicas.iter().find(|r| r.uuid == C).unwrap();
        assert!(c.healthy && !c.rebuilding && c.replaces.is_none());
    }

    #[test]
    fn children_naming_nothing_recorded_go_and_missing_ones_are_retired() {
        let mut v = vol(vec![replica(A, "n1"), replica(B, "n2")]);
        let children = [
            child(A, pb::ChildState::Healthy, None),
            child(C, pb::ChildState::Healthy, None),
            pb::NexusChild {
                uri: "bogus".into(),
                state: pb::ChildState::Healthy as i32,
                ..Default::default()
            },
        ];
        let a = assess_children(&mut v, &children, |_| true, 7);
        assert_eq!(a.remove_uris.len(), 2);
        assert!(a.remove_uris.iter().any(|u| u.ends_with(C)));
        assert!(a.remove_uris.contains(&"bogus".to_owned()));
        // B is healthy in the record but the nexus does not write to it.
        assert!(!v.replicas[1].healthy);
        assert_eq!(a.marked, 1);
    }

    #[test]
    fn replacement_waits_for_replace_after_unless_the_node_is_dead() {
        let mut b = replica(B, "n2");
        b.healthy = false;
        b.unhealthy_since = 100;
        let mut v = vol(vec![replica(A, "n1"), b]);
        let none = HashSet::new();
        assert!(due_for_replacement(&v, 105, 10, |_| false, &none, &none).is_empty());
        assert_eq!(
            due_for_replacement(&v, 110, 10, |_| false, &none, &none),
            vec![B.to_owned()]
        );
        assert_eq!(
            due_for_replacement(&v, 101, 10, |n| n == "n2", &none, &none),
            vec![B.to_owned()]
        );
        // Brought back this round, or already being replaced: not due.
        let skip = HashSet::from([B.to_owned()]);
        assert!(due_for_replacement(&v, 110, 10, |_| false, &none, &skip).is_empty());
        let mut c = replica(C, "n3");
        c.healthy = false;
        c.rebuilding = true;
        c.replaces = Some(B.into());
        v.replicas.push(c);
        assert!(due_for_replacement(&v, 500, 10, |_| true, &none, &none).is_empty());
    }

    #[test]
    fn a_replica_its_pool_faulted_is_retired_and_replaced_at_once() {
        let mut v = vol(vec![replica(A, "n1"), replica(B, "n2")]);
        let lost = HashSet::from([B.to_owned()]);
        let none = HashSet::new();
        assert_eq!(retire_lost(&mut v, &lost, 100), 1);
        assert!(v.replicas[0].healthy);
        assert!(!v.replicas[1].healthy);
        assert_eq!(v.replicas[1].unhealthy_since, 100);
        // Already retired: nothing new.
        assert_eq!(retire_lost(&mut v, &lost, 101), 0);
        // Its node is up and it was unhealthy for no time at all, yet it is
        // due: it will never serve again.
        assert_eq!(
            due_for_replacement(&v, 100, 600, |_| false, &lost, &none),
            vec![B.to_owned()]
        );
        assert!(due_for_replacement(&v, 100, 600, |_| false, &none, &none).is_empty());
    }
}
