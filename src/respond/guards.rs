//! The guards an action on a pod passes, as one ordered chain:
//!
//! 1. the rails admit it: the namespace, an owner refusal remembered, the
//!    duplicate rule in this process ([`Rails::admit`]);
//! 2. the claim every replica shares (the duplicate rule across replicas
//!    and restarts; none for a dry run, which must not hold back a
//!    responder that acts);
//! 3. the pod read from the API (gone: nothing left to do);
//! 4. the rails permit it: its owner ([`Rails::permit`]);
//! 5. healthy replicas (`delete-pod`): the workload keeps enough, the
//!    deletion reserved;
//! 6. the kill switch, then 7. the cluster-wide budget (destructive
//!    actions: a paused responder uses none of it).
//!
//! Passing gives a [`Permit`]; a link that refuses gives the [`Verdict`].
//! The permit holds what was taken on the way (the claims, the
//! reservation) and gives it back when dropped, unless settled with a
//! verdict that keeps it (an action taken keeps its claim, a deletion made
//! keeps its reservation) or dropped while the API call is under way (it
//! may have reached the API server: what it holds lapses instead).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::cluster::Cluster;
use super::control::{Claim, ClaimResult, Control};
use super::outcome::{Applied, Skip, Verdict};
use super::policy::{ActionSpec, PolicyRule};
use super::rails::{DedupKey, Rails};
use super::workload::{self, MinHealthy, Reservation};
use crate::alert::PodRef;
use crate::telemetry::logging::chain;

/// The limits the guards apply (the rails' own settings are
/// [`super::rails::RailsConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Healthy replicas `delete-pod` leaves a workload at least, unless a
    /// policy rule says otherwise.
    pub min_healthy_replicas: MinHealthy,
    /// Destructive actions (delete, isolate) in any 60 s, at most, across
    /// every replica (counted in NATS: [`super::control`]).
    pub max_actions_per_minute: u32,
}

/// The chain's parts.
pub struct Chain<'a> {
    pub rails: &'a Rails,
    pub control: &'a Arc<Control>,
    pub cluster: &'a Cluster,
    pub limits: Limits,
}

/// One action asked of the chain.
pub struct Ask<'a> {
    /// The Falco rule that fired.
    pub falco_rule: &'a str,
    pub rule: &'a PolicyRule,
    pub action: &'a ActionSpec,
    pub dry_run: bool,
    /// The alert's last delivery: a claim left under way by another
    /// responder is taken over (it died mid-action, or is slow).
    pub last_delivery: bool,
}

/// Everything taken on the way through the chain, given back on drop.
pub struct Permit<'a> {
    rails: &'a Rails,
    control: &'a Arc<Control>,
    key: DedupKey,
    claim: Option<Claim>,
    reservation: Option<Reservation>,
    stage: Stage,
}

/// How far a permit got, which decides what a drop gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Through the guards, nothing done yet: a drop gives everything back.
    Open,
    /// The API call is under way: a drop keeps everything, and it lapses
    /// (the claim with its lease, the reservation after
    /// [`workload::RECENT`], the rails' claim with the dedup window).
    Acting,
    /// Settled: nothing is left to give back.
    Settled,
}

impl Chain<'_> {
    /// Runs the chain for one action on `pod`, which is updated to what
    /// the API answered for it (its namespace, name and UID).
    pub async fn pass(&self, pod: &mut PodRef, ask: &Ask<'_>) -> Result<Permit<'_>, Verdict> {
        let mut permit = self.admit(pod, ask).await?;
        match self.check(&mut permit, pod, ask).await {
            Ok(()) => Ok(permit),
            Err(verdict) => {
                permit.settle(&verdict).await;
                Err(verdict)
            }
        }
    }

    /// Links 1 and 2: nothing is held when they refuse.
    async fn admit(&self, pod: &PodRef, ask: &Ask<'_>) -> Result<Permit<'_>, Verdict> {
        let key = self
            .rails
            .admit(pod, ask.falco_rule, ask.action.kind())
            .map_err(Verdict::from)?;
        let mut permit = Permit {
            rails: self.rails,
            control: self.control,
            key,
            claim: None,
            reservation: None,
            stage: Stage::Open,
        };
        if ask.dry_run {
            return Ok(permit);
        }
        let lease = self.cluster.timeout() * 3;
        let claimed = self
            .control
            .claim_action(
                &permit.key,
                self.rails.dedup_window(),
                lease,
                ask.last_delivery,
            )
            .await;
        match claimed {
            Ok(ClaimResult::Claimed(claim)) => {
                permit.claim = Some(claim);
                Ok(permit)
            }
            Ok(ClaimResult::Duplicate) => {
                // Done by a replica: the rails' claim is kept, so the next
                // duplicate is known here without asking.
                permit.stage = Stage::Settled;
                Err(Skip::Duplicate.into())
            }
            Ok(ClaimResult::InProgress) => Err(Verdict::failed(
                "another responder is taking this action on this pod now",
                true,
            )),
            Err(e) => Err(Verdict::failed(
                format!("cannot check for duplicates across replicas: {}", chain(&e)),
                true,
            )),
        }
    }

    /// Links 3 to 7.
    async fn check(
        &self,
        permit: &mut Permit<'_>,
        pod: &mut PodRef,
        ask: &Ask<'_>,
    ) -> Result<(), Verdict> {
        let found = match self.cluster.get_pod(pod).await {
            Ok(None) => return Err(Verdict::Applied(Applied::Gone)),
            Ok(Some(found)) => found,
            Err(e) => {
                let transient = e.is_transient();
                return Err(Verdict::failed(
                    format!("cannot read the pod: {}", chain(&e)),
                    transient,
                ));
            }
        };
        if let Some(namespace) = &found.metadata.namespace {
            pod.namespace.clone_from(namespace);
        }
        if let Some(name) = &found.metadata.name {
            pod.name.clone_from(name);
        }
        // Without a UID in the alert, the one just read still guards
        // against the pod being replaced before the action.
        if pod.uid.is_none() {
            pod.uid.clone_from(&found.metadata.uid);
        }
        self.rails.permit(&permit.key, &found)?;
        if let ActionSpec::DeletePod { .. } = ask.action {
            let min = ask
                .rule
                .min_healthy_replicas
                .unwrap_or(self.limits.min_healthy_replicas);
            permit.reservation = self.keep_healthy(&found, min).await?;
        }
        if ask.action.is_destructive() {
            self.control.check_pause()?;
            let limit = self.limits.max_actions_per_minute;
            self.control.take_slot(limit, !ask.dry_run).await?;
        }
        Ok(())
    }

    /// Link 5: the pod's workload keeps at least `min` healthy replicas
    /// once the pod is deleted; the deletion reserved. A workload that
    /// cannot be read is a skip (or, when the API failed for now, a
    /// transient failure), never a deletion.
    async fn keep_healthy(
        &self,
        found: &Pod,
        min: MinHealthy,
    ) -> Result<Option<Reservation>, Verdict> {
        if min.is_off() {
            return Ok(None);
        }
        let workload = match self.cluster.workload_of(found).await {
            Ok(Some(workload)) => workload,
            Ok(None) => return Ok(None),
            Err(e) if e.is_transient() => {
                return Err(Verdict::failed(
                    format!("cannot check min_healthy_replicas: {}", chain(&e)),
                    true,
                ))
            }
            Err(e) => {
                return Err(Skip::MinHealthyReplicas
                    .because(format!(
                        "cannot tell the workload's healthy replicas: {}",
                        chain(&e)
                    ))
                    .into())
            }
        };
        let healthy = workload::is_healthy(found);
        match self.control.reserve_replica(&workload, healthy, min).await {
            Ok(Ok(reservation)) => Ok(Some(reservation)),
            Ok(Err(why)) => Err(Skip::MinHealthyReplicas.because(why.to_string()).into()),
            // The shared record cannot be used: not now (fail closed,
            // tried again with JetStream).
            Err(e) => Err(Verdict::failed(
                format!("cannot check min_healthy_replicas: {}", chain(&e)),
                true,
            )),
        }
    }
}

impl Permit<'_> {
    /// The API call starts: from now on a drop gives nothing back.
    pub fn acting(&mut self) {
        self.stage = Stage::Acting;
    }

    /// Settles what the permit holds by what became of the action: an
    /// action taken (or a pod found gone) keeps its claims, a deletion
    /// made keeps its reservation; the rest is given back. Everything is
    /// decided before the first wait, so a settle cut short gives back
    /// nothing it should keep.
    pub async fn settle(mut self, verdict: &Verdict) {
        let taken = verdict.is_taken();
        let claim = self.claim.take();
        let reservation = self
            .reservation
            .take()
            .filter(|_| !matches!(verdict, Verdict::Applied(Applied::Done)));
        self.stage = Stage::Settled;
        if !taken {
            self.rails.release(&self.key);
        }
        if let Some(claim) = claim {
            if taken {
                self.control.complete_claim(&claim).await;
            } else {
                self.control.release_claim(&claim).await;
            }
        }
        if let Some(reservation) = reservation {
            self.control.release_replica(&reservation).await;
        }
    }
}

impl Drop for Permit<'_> {
    /// Gives back what an open permit held: dropped before its API call
    /// (the alert's handling cancelled at the drain deadline), the action
    /// was not taken.
    fn drop(&mut self) {
        if self.stage != Stage::Open {
            return;
        }
        self.rails.release(&self.key);
        let claim = self.claim.take();
        let reservation = self.reservation.take();
        if claim.is_none() && reservation.is_none() {
            return;
        }
        let control = Arc::clone(self.control);
        let give_back = async move {
            if let Some(claim) = claim {
                control.release_claim(&claim).await;
            }
            if let Some(reservation) = reservation {
                control.release_replica(&reservation).await;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(give_back);
            }
            Err(_) => {
                tracing::warn!("a claim dropped outside the runtime lapses with its lease instead")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Action;
    use crate::respond::rails::RailsConfig;
    use crate::respond::workload::Workload;
    use std::time::Duration;

    fn key() -> DedupKey {
        DedupKey {
            namespace: "shop".into(),
            pod: "web".into(),
            uid: Some("u1".into()),
            rule: "Terminal shell in container".into(),
            action: Action::DeletePod,
        }
    }

    /// Two healthy replicas of which one must stay: one deletion at a time.
    fn web() -> Workload {
        Workload {
            kind: "Deployment",
            namespace: "shop".into(),
            name: "web".into(),
            desired: 2,
            available: 2,
        }
    }

    async fn reserve(control: &Control) -> Option<Reservation> {
        control
            .reserve_replica(&web(), true, MinHealthy::Count(1))
            .await
            .expect("local records never fail")
            .ok()
    }

    async fn shared_claim(control: &Control) -> ClaimResult {
        control
            .claim_action(
                &key(),
                Duration::from_secs(60),
                Duration::from_secs(30),
                false,
            )
            .await
            .expect("local records never fail")
    }

    /// The rails, the shared records, and a permit as the whole chain
    /// leaves it: both claims and a reservation taken.
    struct Scene {
        rails: Rails,
        control: Arc<Control>,
    }

    impl Scene {
        fn new() -> Self {
            Scene {
                rails: Rails::new(RailsConfig::default()),
                control: Arc::new(Control::local()),
            }
        }

        async fn permit(&self) -> Permit<'_> {
            assert!(self.rails.claim(key()), "the rails' claim is free");
            let claimed = shared_claim(&self.control).await;
            let ClaimResult::Claimed(claim) = claimed else {
                panic!("the shared claim is free, found {claimed:?}")
            };
            let reservation = reserve(&self.control).await;
            assert!(reservation.is_some(), "one deletion is allowed");
            Permit {
                rails: &self.rails,
                control: &self.control,
                key: key(),
                claim: Some(claim),
                reservation,
                stage: Stage::Open,
            }
        }

        /// What is held now: the rails' claim, the shared claim, the
        /// reservation. Each look takes what it finds free.
        async fn held(&self) -> (bool, bool, bool) {
            tokio::task::yield_now().await;
            let rails = !self.rails.claim(key());
            let shared = !matches!(shared_claim(&self.control).await, ClaimResult::Claimed(_));
            let reserved = reserve(&self.control).await.is_none();
            (rails, shared, reserved)
        }
    }

    #[tokio::test]
    async fn a_permit_dropped_before_its_call_or_settled_untaken_gives_everything_back() {
        let scene = Scene::new();
        drop(scene.permit().await);
        assert_eq!(scene.held().await, (false, false, false), "dropped open");
        for verdict in [
            Skip::Paused.into(),
            Verdict::failed("503", true),
            Verdict::Applied(Applied::Replaced),
        ] {
            let scene = Scene::new();
            scene.permit().await.settle(&verdict).await;
            assert_eq!(scene.held().await, (false, false, false), "{verdict:?}");
        }
    }

    #[tokio::test]
    async fn a_permit_settled_as_taken_keeps_its_claims_and_a_deletion_its_reservation() {
        for (verdict, reserved) in [
            (Verdict::Applied(Applied::Done), true),
            (Verdict::Applied(Applied::Gone), false),
        ] {
            let scene = Scene::new();
            scene.permit().await.settle(&verdict).await;
            assert_eq!(scene.held().await, (true, true, reserved), "{verdict:?}");
        }
        // A dry run holds no shared claim and no reservation; its rails'
        // claim is kept.
        let scene = Scene::new();
        assert!(scene.rails.claim(key()));
        let dry = Permit {
            rails: &scene.rails,
            control: &scene.control,
            key: key(),
            claim: None,
            reservation: None,
            stage: Stage::Open,
        };
        dry.settle(&Verdict::DryRun).await;
        assert_eq!(scene.held().await, (true, false, false));
    }

    /// Dropped while its API call is under way (the drain deadline), a
    /// permit gives nothing back: the call may have reached the API server.
    #[tokio::test]
    async fn a_permit_dropped_while_acting_keeps_everything() {
        let scene = Scene::new();
        let mut permit = scene.permit().await;
        permit.acting();
        drop(permit);
        assert_eq!(scene.held().await, (true, true, true));
    }
}
