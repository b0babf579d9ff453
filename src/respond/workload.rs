//! Healthy replicas: before `delete-pod`, the pod's workload (its
//! ReplicaSet's Deployment, or its StatefulSet) must keep at least
//! `min_healthy_replicas` available replicas once the pod is gone.
//!
//! The workload's status lags behind deletions, so the deletions every
//! responder replica made in the last [`RECENT`] are subtracted as well
//! (counting one twice errs on the side of deleting less), and a check and
//! its reservation are one step, so alerts handled at once about replicas of
//! one workload cannot all pass on the same status, in one replica or in
//! several: the record lives in the shared bucket ([`super::control`]),
//! under [`reservation_key`], updated with compare-and-set.
//!
//! Pods without a replicated controller (standalone pods, Jobs, DaemonSets)
//! have no replicas to keep: the guard does not apply to them (the rails'
//! `--skip-standalone-pods` and the DaemonSet rule do).

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

/// How long a deletion is assumed not yet reflected in the workload's status.
pub const RECENT: Duration = Duration::from_secs(30);

/// `min_healthy_replicas`: a number, or a percentage of the desired replicas
/// (rounded up, like a PodDisruptionBudget's `minAvailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinHealthy {
    #[default]
    Off,
    Count(u32),
    Percent(u32),
}

impl MinHealthy {
    /// Replicas that must stay healthy out of `desired`.
    pub fn required(self, desired: u32) -> u32 {
        match self {
            MinHealthy::Off => 0,
            MinHealthy::Count(n) => n,
            MinHealthy::Percent(p) => (u64::from(desired) * u64::from(p)).div_ceil(100) as u32,
        }
    }

    pub fn is_off(self) -> bool {
        matches!(
            self,
            MinHealthy::Off | MinHealthy::Count(0) | MinHealthy::Percent(0)
        )
    }
}

impl fmt::Display for MinHealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinHealthy::Off => f.write_str("0"),
            MinHealthy::Count(n) => write!(f, "{n}"),
            MinHealthy::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for MinHealthy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || format!("{s:?} is not a number of replicas or a percentage (2, 50%)");
        match s.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return Err(format!("{s:?}: a percentage is at most 100%"));
                }
                Ok(if p == 0 {
                    MinHealthy::Off
                } else {
                    MinHealthy::Percent(p)
                })
            }
            None => {
                let n: u32 = s.parse().map_err(|_| bad())?;
                Ok(if n == 0 {
                    MinHealthy::Off
                } else {
                    MinHealthy::Count(n)
                })
            }
        }
    }
}

impl<'de> Deserialize<'de> for MinHealthy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => u32::try_from(n)
                .map(|n| n.to_string().parse().expect("a u32 parses"))
                .map_err(|_| serde::de::Error::custom(format!("{n} is not a number of replicas"))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A replicated workload, as its status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `Deployment` or `StatefulSet` (or `ReplicaSet` without a Deployment).
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub desired: u32,
    pub available: u32,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The replicated controller a pod names: (kind, name), when it is a
/// ReplicaSet or a StatefulSet.
pub fn replicated_owner(pod: &Pod) -> Option<(&'static str, &str)> {
    let owners = pod.metadata.owner_references.as_deref()?;
    let owner = owners.iter().find(|o| o.controller == Some(true))?;
    match owner.kind.as_str() {
        "ReplicaSet" => Some(("ReplicaSet", owner.name.as_str())),
        "StatefulSet" => Some(("StatefulSet", owner.name.as_str())),
        _ => None,
    }
}

/// Whether the pod counts among its workload's healthy replicas: Ready and
/// not already terminating.
pub fn is_healthy(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The shared record of a workload's recent deletions: a key of the
/// bucket. Kinds are words and namespaces DNS labels (no dots), so the
/// name, a DNS subdomain, may have dots without two workloads sharing a key.
pub fn reservation_key(workload: &Workload) -> String {
    format!(
        "replicas.{}.{}.{}",
        workload.kind, workload.namespace, workload.name
    )
}

/// A deletion reserved against a workload, given back when it is not made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reservation {
    pub key: String,
    /// When it was reserved (ms since the epoch); `None` for a pod that
    /// was not healthy: its deletion costs nothing.
    pub at: Option<u64>,
}

/// A deletion refused: it would leave the workload too few healthy replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooFewHealthy {
    pub workload: Workload,
    /// Its pods deleted in the last [`RECENT`], by any replica.
    pub deleted_recently: usize,
    /// Healthy replicas the deletion would leave.
    pub left: u32,
    pub required: u32,
    pub min: MinHealthy,
}

impl fmt::Display for TooFewHealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        write!(
            f,
            "{w} has {} of {} replicas available",
            w.available, w.desired
        )?;
        if self.deleted_recently > 0 {
            write!(
                f,
                " and {} deleted in the last {}s",
                self.deleted_recently,
                RECENT.as_secs()
            )?;
        }
        write!(
            f,
            "; deleting this pod would leave {}, fewer than {} (min_healthy_replicas {})",
            self.left, self.required, self.min
        )
    }
}

/// The guard's decision on one record of a workload's recent deletions
/// (their times, ms since the epoch): drops those older than [`RECENT`],
/// and takes one at `now` unless the deletion would leave fewer than `min`
/// healthy replicas.
pub fn reserve_in(
    recent: &mut Vec<u64>,
    workload: &Workload,
    min: MinHealthy,
    now: u64,
) -> Result<(), TooFewHealthy> {
    let window = RECENT.as_millis() as u64;
    recent.retain(|&t| t + window > now && t <= now + window);
    let required = min.required(workload.desired);
    let left = workload
        .available
        .saturating_sub(1)
        .saturating_sub(recent.len() as u32);
    if left < required {
        return Err(TooFewHealthy {
            workload: workload.clone(),
            deleted_recently: recent.len(),
            left,
            required,
            min,
        });
    }
    recent.push(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_round_up() {
        assert_eq!("2".parse::<MinHealthy>(), Ok(MinHealthy::Count(2)));
        assert_eq!("50%".parse::<MinHealthy>(), Ok(MinHealthy::Percent(50)));
        assert_eq!("0".parse::<MinHealthy>(), Ok(MinHealthy::Off));
        assert!("101%".parse::<MinHealthy>().is_err());
        assert!("-1".parse::<MinHealthy>().is_err());
        assert!("two".parse::<MinHealthy>().is_err());
        assert_eq!(MinHealthy::Percent(50).required(3), 2, "rounded up");
        assert_eq!(MinHealthy::Percent(100).required(u32::MAX), u32::MAX);
        assert_eq!(MinHealthy::Count(2).required(10), 2);
        let yaml: Vec<MinHealthy> = serde_norway::from_str("[1, '34%', \"0\"]").unwrap();
        assert_eq!(
            yaml,
            [
                MinHealthy::Count(1),
                MinHealthy::Percent(34),
                MinHealthy::Off
            ]
        );
        assert!(serde_norway::from_str::<MinHealthy>("-3").is_err());
    }

    #[test]
    fn reservations_count_what_the_status_does_not_show_yet() {
        let web = Workload {
            kind: "Deployment",
            namespace: "shop".into(),
            name: "web".into(),
            desired: 3,
            available: 3,
        };
        assert_eq!(reservation_key(&web), "replicas.Deployment.shop.web");
        let mut recent = Vec::new();
        reserve_in(&mut recent, &web, MinHealthy::Count(1), 1_000).unwrap();
        reserve_in(&mut recent, &web, MinHealthy::Count(1), 1_001).unwrap();
        let why = reserve_in(&mut recent, &web, MinHealthy::Count(1), 1_002)
            .unwrap_err()
            .to_string();
        assert!(
            why.starts_with("Deployment shop/web has 3 of 3 replicas available and 2 deleted in the last 30s; deleting this pod would leave 0, fewer than 1"),
            "{why}"
        );
        assert_eq!(recent, [1_000, 1_001], "a refusal takes nothing");
        // 30 s on, the status is trusted again.
        reserve_in(&mut recent, &web, MinHealthy::Count(1), 31_000).unwrap();
        assert_eq!(recent, [1_001, 31_000]);
        // A time far ahead (a clock gone wrong) does not hold it forever.
        let mut future = vec![u64::MAX / 2, u64::MAX / 2];
        reserve_in(&mut future, &web, MinHealthy::Count(1), 1_000).unwrap();
    }
}
