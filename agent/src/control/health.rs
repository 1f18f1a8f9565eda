//! Nexus health records: the durable healthy set of each volume's nexus.
//!
//! An engine calls RecordNexusHealth before it acknowledges a write with
//! fewer healthy children than before, and waits for success; only then
//! may the write complete. The record lists the replicas that hold every
//! acknowledged write, so a replica that missed writes is never used as a
//! source after a crash. Records of one nexus instance are ordered by their
//! generation; a lower generation from the same instance is stale and
//! ignored. Writes use compare-and-put, so two concurrent records never
//! interleave.
//!
//! **Fencing.** A record is stored only if it comes from the nexus instance
//! the volume record names as current, and the volume record is compared
//! in the same transaction as the write: a nexus still running on a
//! partitioned old node, whose volume has a new nexus elsewhere, can no
//! longer retire the new nexus's replicas. Its writes then fail (it cannot
//! record a smaller healthy set), which is what a fenced nexus must do.

use std::collections::HashSet;

use crate::error::ControlError;
use crate::model::{encode, replica_of_child_uri, NexusHealth, Record, VolumeSpec};

use super::{now_secs, Control};

/// Attempts at a compare-and-put before giving up on a busy key.
const CAS_ATTEMPTS: usize = 8;

/// One health report from a nexus.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub volume_id: String,
    /// Child URIs holding every acknowledged write.
    pub healthy_children: Vec<String>,
    pub clean_shutdown: bool,
    pub generation: u64,
    pub instance: String,
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthOutcome {
    /// The record now holds the report.
    Recorded,
    /// A newer report of the same nexus instance is already recorded.
    Stale,
    /// No such volume: nothing to record.
    UnknownVolume,
    /// The volume names another nexus instance as current: the report's
    /// nexus is fenced off and nothing was recorded.
    Fenced,
}

impl Control {
    /// The health record of a volume's nexus, if one was written.
    pub async fn nexus_health(&self, volume_id: &str) -> Result<Option<NexusHealth>, ControlError> {
        Ok(self.load::<NexusHealth>(volume_id).await?.map(|(h, _)| h))
    }

    /// Records a nexus's healthy set, then retires from the volume's
    /// healthy replicas every replica the set drops. Fails (with a store
    /// error, UNAVAILABLE at the API) when the store cannot take it: the
    /// engine retries and holds the write meanwhile.
    pub async fn record_nexus_health(
        &self,
        report: &HealthReport,
    ) -> Result<HealthOutcome, ControlError> {
        if report.volume_id.is_empty() {
            return Err(ControlError::InvalidArgument("volume_id is empty".into()));
        }
        if report.instance.is_empty() {
            return Err(ControlError::InvalidArgument("instance is empty".into()));
        }
        let mut healthy = Vec::new();
        for uri in &report.healthy_children {
            match replica_of_child_uri(uri) {
                Some(u) => healthy.push(u.to_owned()),
                None => {
                    return Err(ControlError::InvalidArgument(format!(
                        "child {uri:?} names no replica"
                    )))
                }
            }
        }
        healthy.sort();
        healthy.dedup();
        let rec = NexusHealth {
            volume_id: report.volume_id.clone(),
            instance: report.instance.clone(),
            generation: report.generation,
            healthy: healthy.clone(),
            clean_shutdown: report.clean_shutdown,
            updated: now_secs(),
        };
        let mut recorded = false;
        for _ in 0..CAS_ATTEMPTS {
            let Some((vol, vol_version)) = self.load::<VolumeSpec>(&report.volume_id).await? else {
                return Ok(HealthOutcome::UnknownVolume);
            };
            if vol.nexus_instance != report.instance {
                tracing::warn!(
                    volume = %report.volume_id,
                    instance = %report.instance,
                    current = %vol.nexus_instance,
                    "health record from a nexus instance that is not the volume's current one refused"
                );
                return Ok(HealthOutcome::Fenced);
            }
            let version = match self.load::<NexusHealth>(&report.volume_id).await? {
                Some((old, _))
                    if old.instance == report.instance && report.generation < old.generation =>
                {
                    return Ok(HealthOutcome::Stale)
                }
                Some((_, v)) => v,
                None => 0,
            };
            // The volume record is compared in the same transaction: a new
            // nexus named meanwhile makes this write fail, and the loop
            // reads the volume again.
            if self
                .store
                .compare_and_put_guarded(
                    &NexusHealth::key_of(&report.volume_id),
                    &encode(&rec),
                    version,
                    &VolumeSpec::key_of(&report.volume_id),
                    vol_version,
                )
                .await?
                .is_some()
            {
                recorded = true;
                break;
            }
        }
        if !recorded {
            return Err(ControlError::Busy {
                id: report.volume_id.clone(),
            });
        }
        tracing::info!(
            volume = %report.volume_id,
            instance = %report.instance,
            generation = report.generation,
            healthy = ?healthy,
            "nexus health recorded"
        );
        // The record is what protects data; marking the volume's replicas
        // is bookkeeping the reconciler repeats if it is lost to a race.
        self.retire_unrecorded(&report.volume_id, &healthy.into_iter().collect())
            .await?;
        Ok(HealthOutcome::Recorded)
    }

    /// Marks unhealthy every healthy replica of the volume not in `healthy`.
    async fn retire_unrecorded(
        &self,
        volume_id: &str,
        healthy: &HashSet<String>,
    ) -> Result<(), ControlError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut vol, version)) = self.load::<VolumeSpec>(volume_id).await? else {
                return Ok(());
            };
            let mut changed = false;
            for r in vol.replicas.iter_mut() {
                if r.healthy && !healthy.contains(&r.uuid) {
                    r.healthy = false;
                    r.unhealthy_since = now_secs();
                    changed = true;
                    tracing::warn!(volume = %volume_id, replica = %r.uuid, node = %r.node, "replica left the nexus's healthy set");
                }
            }
            if !changed || self.save_if(&vol, version).await?.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Adds replicas to a volume's health record if the record is still at
    /// `version` (read before the replicas were seen healthy); false when
    /// the record changed meanwhile. No record: nothing to add to.
    pub(crate) async fn add_to_health_record(
        &self,
        volume_id: &str,
        version: u64,
        uuids: &[String],
    ) -> Result<bool, ControlError> {
        let Some((mut rec, current)) = self.load::<NexusHealth>(volume_id).await? else {
            return Ok(true);
        };
        if current != version {
            return Ok(false);
        }
        let before = rec.healthy.len();
        for u in uuids {
            if !rec.healthy.contains(u) {
                rec.healthy.push(u.clone());
            }
        }
        if rec.healthy.len() == before {
            return Ok(true);
        }
        rec.healthy.sort();
        rec.updated = now_secs();
        Ok(self.save_if(&rec, version).await?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::control::ControlConfig;
    use crate::model::{ReplicaSpec, VolumePhase};
    use crate::store::file::FileStore;

    const A: &str = "0a0a0a0a-0000-4000-8000-000000000001";
    const B: &str = "0b0b0b0b-0000-4000-8000-000000000002";

    async fn with_volume() -> (tempfile::TempDir, Control) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("s.redb")).unwrap();
        let c = Control::new(Arc::new(store), ControlConfig::default());
        let vol = VolumeSpec {
            id: "v1".into(),
            name: "v1".into(),
            size_bytes: 1 << 20,
            replicas_wanted: 2,
            thin: true,
            phase: VolumePhase::Ready,
            replicas: vec![
                ReplicaSpec::new(A.into(), "n1".into(), "p".into()),
                ReplicaSpec::new(B.into(), "n2".into(), "p".into()),
            ],
            target: None,
            topology: Default::default(),
            rebuild_nexus: None,
            nexus_instance: "i1".into(),
            phase_since: now_secs(),
            requisite: vec![],
            preferred: vec![],
        };
        c.save(&vol).await.unwrap();
        (dir, c)
    }

    fn report(children: &[String], generation: u64, instance: &str) -> HealthReport {
        HealthReport {
            volume_id: "v1".into(),
            healthy_children: children.to_vec(),
            clean_shutdown: false,
            generation,
            instance: instance.into(),
        }
    }

    #[tokio::test]
    async fn a_dropped_child_is_retired_and_stale_reports_are_ignored() {
        let (_d, c) = with_volume().await;
        let both = [
            format!("replica:///{A}"),
            format!("nvmf://127.0.0.2:8420/nqn.2024-01.dev.cairn:replica:{B}"),
        ];
        assert_eq!(
            c.record_nexus_health(&report(&both, 1, "i1"))
                .await
                .unwrap(),
            HealthOutcome::Recorded
        );
        let only_a = [format!("replica:///{A}")];
        assert_eq!(
            c.record_nexus_health(&report(&only_a, 2, "i1"))
                .await
                .unwrap(),
            HealthOutcome::Recorded
        );
        let h = c.nexus_health("v1").await.unwrap().unwrap();
        assert_eq!(h.healthy, vec![A.to_owned()]);
        assert_eq!(h.generation, 2);
        let vol = c.volume("v1").await.unwrap();
        assert!(vol.replicas[0].healthy);
        assert!(!vol.replicas[1].healthy);
        assert!(vol.replicas[1].unhealthy_since > 0);

        // An older report of the same instance arrives late: ignored.
        assert_eq!(
            c.record_nexus_health(&report(&both, 1, "i1"))
                .await
                .unwrap(),
            HealthOutcome::Stale
        );
        assert_eq!(
            c.nexus_health("v1").await.unwrap().unwrap().healthy,
            vec![A.to_owned()]
        );
        // A new instance starts its own sequence, once the volume names it.
        name_instance(&c, "i2").await;
        assert_eq!(
            c.record_nexus_health(&report(&both, 0, "i2"))
                .await
                .unwrap(),
            HealthOutcome::Recorded
        );
        assert_eq!(
            c.nexus_health("v1").await.unwrap().unwrap().healthy.len(),
            2
        );
        // Recording more children never marks a retired replica healthy:
        // only the reconciler does, after a rebuild.
        assert!(!c.volume("v1").await.unwrap().replicas[1].healthy);
    }

    /// Names `instance` as the volume's current nexus, as creating a
    /// nexus does.
    async fn name_instance(c: &Control, instance: &str) {
        let mut vol = c.volume("v1").await.unwrap();
        vol.nexus_instance = instance.into();
        c.save(&vol).await.unwrap();
    }

    /// The volume's nexus moved to a new node while the old one was cut
    /// off; the old nexus, still running, sees the remote replica go and
    /// reports a healthy set without it. Its reports are refused: the new
    /// nexus's replicas stay healthy and its record stands.
    #[tokio::test]
    async fn a_partitioned_old_nexus_is_fenced() {
        let (_d, c) = with_volume().await;
        let both = [
            format!("replica:///{A}"),
            format!("nvmf://127.0.0.2:8420/nqn.2024-01.dev.cairn:replica:{B}"),
        ];
        assert_eq!(
            c.record_nexus_health(&report(&both, 1, "i1"))
                .await
                .unwrap(),
            HealthOutcome::Recorded
        );
        // The new nexus is named, then records its set.
        name_instance(&c, "new").await;
        let on_b = [
            format!("nvmf://127.0.0.1:8420/nqn.2024-01.dev.cairn:replica:{A}"),
            format!("replica:///{B}"),
        ];
        assert_eq!(
            c.record_nexus_health(&report(&on_b, 1, "new"))
                .await
                .unwrap(),
            HealthOutcome::Recorded
        );
        // The old nexus loses B and reports, with a higher generation.
        let only_a = [format!("replica:///{A}")];
        let mut refused = 0;
        for g in 2..5 {
            let got = c
                .record_nexus_health(&report(&only_a, g, "i1"))
                .await
                .unwrap();
            if got == HealthOutcome::Fenced {
                refused += 1;
            }
        }
        let h = c.nexus_health("v1").await.unwrap().unwrap();
        let vol = c.volume("v1").await.unwrap();
        let retired = vol.replicas.iter().filter(|r| !r.healthy).count();
        eprintln!("old nexus: {refused} of 3 reports refused; replicas retired by it: {retired}");
        assert_eq!(refused, 3);
        assert_eq!(retired, 0, "the old nexus retired the new nexus's replicas");
        assert_eq!(h.instance, "new");
        assert_eq!(h.healthy, vec![A.to_owned(), B.to_owned()]);
    }

    /// The clean-shutdown flag is what decides whether a nexus built again
    /// may trust its children to agree.
    #[test]
    fn after_an_unclean_end_one_child_is_the_source_and_the_others_are_copied() {
        use crate::control::after_unclean_end;
        let remote = "nvmf://127.0.0.2:8420/nqn.2024-01.dev.cairn:replica:b".to_owned();
        let local = "replica:///a".to_owned();
        let two = vec![remote.clone(), local.clone()];
        let rec = |clean| NexusHealth {
            volume_id: "v1".into(),
            instance: "i1".into(),
            generation: 3,
            healthy: vec![A.into(), B.into()],
            clean_shutdown: clean,
            updated: 0,
        };
        // Clean, or no record yet: every child starts healthy.
        assert_eq!(after_unclean_end(two.clone(), None), (two.clone(), vec![]));
        assert_eq!(
            after_unclean_end(two.clone(), Some(&rec(true))),
            (two.clone(), vec![])
        );
        // Unclean: the local child is the source, the remote one is copied.
        assert_eq!(
            after_unclean_end(two, Some(&rec(false))),
            (vec![local.clone()], vec![remote])
        );
        // One child has nothing to agree with.
        assert_eq!(
            after_unclean_end(vec![local.clone()], Some(&rec(false))),
            (vec![local], vec![])
        );
    }

    #[tokio::test]
    async fn bad_reports_are_refused_and_unknown_volumes_ignored() {
        let (_d, c) = with_volume().await;
        let bad = report(&["file:///etc/passwd".into()], 1, "i1");
        assert!(matches!(
            c.record_nexus_health(&bad).await,
            Err(ControlError::InvalidArgument(_))
        ));
        let mut empty = report(&[], 1, "");
        assert!(c.record_nexus_health(&empty).await.is_err());
        empty.instance = "i".into();
        empty.volume_id = "nope".into();
        assert_eq!(
            c.record_nexus_health(&empty).await.unwrap(),
            HealthOutcome::UnknownVolume
        );
        assert_eq!(c.nexus_health("nope").await.unwrap(), None);
    }
}
