//! Leader election between control-plane replicas on a coordination.k8s.io/v1
//! Lease, the way client-go's `leaderelection` does it, so that work only one
//! replica may do (CA rotation, the Kubernetes watchers' writes) has one owner.
//!
//! Every `retry_period` each replica reads the Lease and decides
//! ([`decide`], pure): create it when absent, renew it when it names this
//! replica, take it over when it names nobody (released) or its holder has
//! not renewed for `leaseDurationSeconds`, else wait. Writes are replaces
//! with the resourceVersion read, so of two replicas taking over at once the
//! API server lets exactly one through (the other gets 409 Conflict).
//!
//! Expiry is measured from when *this* process saw the Lease record last
//! change, on its own monotonic clock, never from the `renewTime` written by
//! another machine: clocks of different nodes may disagree, their rates do
//! not (much).
//!
//! Safety: a leader stops leading (publishes `false`) once `renew_deadline`
//! has passed since it *sent* its last successful renewal. Any other replica
//! observed that renewal no earlier than it was sent, and waits
//! `lease_duration` (> `renew_deadline`) from then, so the old leader has let
//! go before anyone else can take over. Consumers must stop leader-only work
//! as soon as the watch turns `false`.
//!
//! On shutdown a leader publishes `false` first, then releases the Lease
//! (no holder, `leaseDurationSeconds: 1`) so the next replica takes over on
//! its next attempt instead of waiting for expiry.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Timing of the election; the defaults are client-go's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderConfig {
    /// How long others wait after the last renewal they saw before taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Timings that would let two replicas lead at once, or never renew in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid leader election timing: {0}")]
pub struct InvalidLeaderConfig(String);

impl LeaderConfig {
    /// Checks the orderings the safety argument needs (module docs).
    pub fn validate(&self) -> Result<(), InvalidLeaderConfig> {
        let Self {
            lease_duration,
            renew_deadline,
            retry_period,
        } = *self;
        if retry_period.is_zero() {
            return Err(InvalidLeaderConfig("the retry period must be positive".into()));
        }
        if lease_duration <= renew_deadline {
            return Err(InvalidLeaderConfig(format!(
                "the lease duration ({lease_duration:?}) must be longer than the renew deadline \
                 ({renew_deadline:?}), or another replica may take over while this one still leads"
            )));
        }
        // client-go's rule: a renewal attempt, with jitter, fits in the deadline.
        if renew_deadline <= retry_period.mul_f64(JITTER + 1.0) {
            return Err(InvalidLeaderConfig(format!(
                "the renew deadline ({renew_deadline:?}) must be longer than 1.2 times the retry \
                 period ({retry_period:?}), or a leader cannot renew before its deadline"
            )));
        }
        if i32::try_from(lease_seconds(lease_duration)).is_err() {
            return Err(InvalidLeaderConfig(format!(
                "the lease duration ({lease_duration:?}) does not fit leaseDurationSeconds"
            )));
        }
        Ok(())
    }
}

/// Up to this fraction of the retry period is added at random to a standby
/// replica's wait, so replicas do not poll in lockstep.
const JITTER: f64 = 0.2;

/// `leaseDurationSeconds`: whole seconds, rounded up so others never wait less.
fn lease_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One replica's participation in the election for one Lease.
#[derive(Debug)]
pub struct LeaderElection {
    api: Api<Lease>,
    namespace: String,
    lease_name: String,
    identity: String,
    config: LeaderConfig,
    leading: watch::Sender<bool>,
}

impl LeaderElection {
    /// An election for Lease `lease_name` in `namespace`, with this replica
    /// known as `holder_identity` (its pod name: unique among replicas).
    /// Nothing happens until [`LeaderElection::run`]. Timings that fail
    /// [`LeaderConfig::validate`] (check them where they are configured) are
    /// replaced by the defaults, with an error logged.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        lease_name: &str,
        holder_identity: &str,
        config: LeaderConfig,
    ) -> Self {
        let config = match config.validate() {
            Ok(()) => config,
            Err(e) => {
                error!(lease = lease_name, error = %e, "using the default leader election timing");
                LeaderConfig::default()
            }
        };
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            lease_name: lease_name.to_owned(),
            identity: holder_identity.to_owned(),
            config,
            leading: watch::channel(false).0,
        }
    }

    /// True while this replica leads. Turns false before the Lease can
    /// expire for others: stop leader-only work at once.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// Takes part in the election until `shutdown` turns true (or its sender
    /// is dropped), then releases the Lease if this replica holds it.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let LeaderConfig {
            renew_deadline,
            retry_period,
            ..
        } = self.config;
        let mut observed: Option<Observation> = None;
        // While leading: when the last successful renewal was sent.
        let mut renewed_at: Option<Instant> = None;
        let mut reported = Reported::default();
        if self.identity.is_empty() {
            // An empty holder reads as a released Lease: others would take it
            // over while this replica thinks it leads.
            error!(lease = %self.lease_name, "not joining leader election: the holder identity is empty");
            return;
        }
        info!(lease = %self.lease_name, namespace = %self.namespace, identity = %self.identity, "joining leader election");
        while !*shutdown.borrow_and_update() {
            if let Some(at) = renewed_at
                && Instant::now() >= at + renew_deadline
            {
                renewed_at = None;
                self.step_down("no renewal within the renew deadline");
            }
            let started = Instant::now();
            let budget = match renewed_at {
                Some(at) => (at + renew_deadline).saturating_duration_since(started),
                None => renew_deadline,
            };
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(budget, self.try_acquire_or_renew(&mut observed, started)) => attempt,
                _ = shutdown.changed() => break,
            };
            match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    reported.ok();
                    if renewed_at.is_none() {
                        self.leading.send_replace(true);
                        info!(lease = %self.lease_name, identity = %self.identity, "became leader");
                    }
                    renewed_at = Some(started);
                }
                Ok(Ok(Attempt::Held(holder))) => {
                    reported.ok();
                    if renewed_at.take().is_some() {
                        self.step_down("another replica holds the lease");
                    }
                    if reported.holder.as_deref() != Some(holder.as_str()) {
                        info!(lease = %self.lease_name, leader = %holder, "waiting for leadership");
                        reported.holder = Some(holder);
                    }
                }
                Ok(Ok(Attempt::Conflict)) => {
                    reported.ok();
                    debug!(lease = %self.lease_name, "lease changed while writing it; reading it again");
                }
                Ok(Err(e)) => reported.failure(&self.lease_name, &self.describe(&e)),
                Err(_) => reported.failure(&self.lease_name, "the API server did not answer in time"),
            }
            let mut next = started
                + if renewed_at.is_some() {
                    retry_period
                } else {
                    keyway_identity::jitter::between(retry_period, 1.0, 1.0 + JITTER)
                };
            if let Some(at) = renewed_at {
                next = next.min(at + renew_deadline);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.changed() => break,
            }
        }
        if renewed_at.is_some() {
            self.step_down("shutting down");
        }
        // Also when not (yet) reported as leader: a write that won just as
        // shutdown began may have made this replica the holder.
        match tokio::time::timeout(renew_deadline, self.release()).await {
            Ok(Ok(true)) => info!(lease = %self.lease_name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(
                lease = %self.lease_name,
                error = %self.describe(&e),
                "cannot release the lease; others take over when it expires"
            ),
            Err(_) => warn!(
                lease = %self.lease_name,
                "releasing the lease timed out; others take over when it expires"
            ),
        }
    }

    /// An API failure with what to do about it.
    fn describe(&self, e: &kube::Error) -> String {
        match e {
            kube::Error::Api(s) if s.is_forbidden() => format!(
                "the control plane's service account cannot use leases in namespace {}: check the \
                 chart's Role (leader election needs get, create and update on leases)",
                self.namespace
            ),
            e => e.to_string(),
        }
    }

    fn step_down(&self, why: &str) {
        self.leading.send_replace(false);
        info!(lease = %self.lease_name, identity = %self.identity, reason = why, "lost leadership");
    }

    /// Reads the Lease and acts on [`decide`]. `now` is when the attempt
    /// started (before the read), which keeps the leader's deadline
    /// conservative.
    async fn try_acquire_or_renew(
        &self,
        observed: &mut Option<Observation>,
        now: Instant,
    ) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(&self.lease_name).await?;
        *observed = current
            .as_ref()
            .map(|lease| observe(observed.take(), LeaseRecord::of(lease), now));
        let decision = decide(&self.identity, observed.as_ref(), now);
        let wall = Timestamp::now();
        let result = match (&decision, current) {
            (Decision::Wait { holder, .. }, _) => return Ok(Attempt::Held(holder.clone())),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.lease_name.clone()),
                        labels: Some(
                            [("app.kubernetes.io/managed-by".to_owned(), "keyway".to_owned())].into(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(self.spec(&decision, None, wall)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let record = observed.as_ref().map(|o| &o.record);
                lease.spec = Some(self.spec(decision, record, wall));
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(written) => {
                *observed = Some(Observation {
                    record: LeaseRecord::of(&written),
                    at: now,
                });
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// The spec this replica writes when it renews or takes over.
    fn spec(&self, decision: &Decision, current: Option<&LeaseRecord>, now: Timestamp) -> LeaseSpec {
        let transitions = current.map_or(0, |c| c.transitions);
        let (acquire_time, transitions) = match (decision, current) {
            (Decision::Renew, Some(c)) => (c.acquire_time.clone().unwrap_or(MicroTime(now)), transitions),
            (_, Some(_)) => (MicroTime(now), transitions.saturating_add(1)),
            (_, None) => (MicroTime(now), 0),
        };
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(lease_seconds(self.config.lease_duration)).ok(),
            acquire_time: Some(acquire_time),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Hands the Lease back: no holder, and a one-second duration for
    /// readers that only look at the times. False when it is not ours.
    async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.lease_name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// How one attempt went.
#[derive(Debug)]
enum Attempt {
    /// This replica holds the Lease (created, renewed or taken over).
    Leading,
    /// Another replica holds it and has renewed recently.
    Held(String),
    /// Someone else wrote the Lease between our read and our write.
    Conflict,
}

/// What was last logged, so transitions and failures are logged once.
#[derive(Debug, Default)]
struct Reported {
    holder: Option<String>,
    failure: Option<String>,
}

impl Reported {
    fn ok(&mut self) {
        if self.failure.take().is_some() {
            info!("the leader election lease is reachable again");
        }
    }

    fn failure(&mut self, lease: &str, error: &str) {
        if self.failure.as_deref() == Some(error) {
            debug!(lease, error, "leader election attempt failed again");
        } else {
            warn!(lease, error, "leader election attempt failed; retrying");
            self.failure = Some(error.to_owned());
        }
    }
}

// ---- the decision, without I/O -----------------------------------------------

/// The fields of a Lease the election reads. Two records are the same
/// observation only if all of them match (client-go compares the record).
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseRecord {
    /// `None` when nobody holds it (never held, or released).
    holder: Option<String>,
    lease_duration: Duration,
    acquire_time: Option<MicroTime>,
    renew_time: Option<MicroTime>,
    transitions: i32,
}

impl LeaseRecord {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration: Duration::from_secs(
                spec.lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0),
            ),
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// A Lease record and when this process first saw it in this form.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    record: LeaseRecord,
    at: Instant,
}

/// Updates what this process knows: the observation time restarts only
/// when the record changed.
fn observe(previous: Option<Observation>, record: LeaseRecord, now: Instant) -> Observation {
    match previous {
        Some(p) if p.record == record => p,
        _ => Observation { record, at: now },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// No Lease yet.
    Create,
    /// It is ours: renew it.
    Renew,
    /// Released, or its holder stopped renewing: take it.
    TakeOver,
    /// Someone else holds it, valid until `until` unless renewed.
    Wait { holder: String, until: Instant },
}

fn decide(me: &str, lease: Option<&Observation>, now: Instant) -> Decision {
    let Some(observed) = lease else {
        return Decision::Create;
    };
    match observed.record.holder.as_deref() {
        None => Decision::TakeOver,
        Some(holder) if holder == me => Decision::Renew,
        Some(holder) => {
            let until = observed.at + observed.record.lease_duration;
            if now < until {
                Decision::Wait {
                    holder: holder.to_owned(),
                    until,
                }
            } else {
                Decision::TakeOver
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, renewed: i64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_owned),
            lease_duration: Duration::from_secs(15),
            acquire_time: None,
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            transitions: 0,
        }
    }

    #[test]
    fn absent_released_and_own_leases_are_taken() {
        let now = Instant::now();
        assert_eq!(decide("a", None, now), Decision::Create);
        let released = observe(None, record(None, 0), now);
        assert_eq!(decide("a", Some(&released), now), Decision::TakeOver);
        let ours = observe(None, record(Some("a"), 0), now);
        assert_eq!(decide("a", Some(&ours), now), Decision::Renew);
    }

    #[test]
    fn another_holder_is_waited_for_from_when_we_saw_it_renew() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // The renewTime is far in the past by our clock: it does not matter.
        let seen = observe(None, record(Some("b"), 1), t0);
        let wait = |at| decide("a", Some(&seen), at);
        assert_eq!(
            wait(t0 + s(14)),
            Decision::Wait {
                holder: "b".into(),
                until: t0 + s(15)
            }
        );
        assert_eq!(wait(t0 + s(15)), Decision::TakeOver);

        // The same record seen again keeps its observation time...
        let again = observe(Some(seen.clone()), record(Some("b"), 1), t0 + s(10));
        assert_eq!(again.at, t0);
        // ...a renewal restarts it.
        let renewed = observe(Some(seen), record(Some("b"), 2), t0 + s(10));
        assert_eq!(renewed.at, t0 + s(10));
        assert!(matches!(
            decide("a", Some(&renewed), t0 + s(20)),
            Decision::Wait { .. }
        ));
        assert_eq!(decide("a", Some(&renewed), t0 + s(25)), Decision::TakeOver);
    }

    #[test]
    fn an_empty_holder_is_a_released_lease() {
        let lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rec = LeaseRecord::of(&lease);
        assert_eq!(rec.holder, None);
        let now = Instant::now();
        assert_eq!(
            decide("a", Some(&observe(None, rec, now)), now),
            Decision::TakeOver
        );
    }

    #[test]
    fn timings_that_could_overlap_leaders_are_refused() {
        assert_eq!(LeaderConfig::default().validate(), Ok(()));
        let ms = Duration::from_millis;
        let ok = LeaderConfig {
            lease_duration: ms(3000),
            renew_deadline: ms(2000),
            retry_period: ms(500),
        };
        assert_eq!(ok.validate(), Ok(()));
        let e = LeaderConfig {
            renew_deadline: ms(3000),
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("longer than the renew deadline"), "{e}");
        assert!(
            LeaderConfig {
                retry_period: ms(1800),
                ..ok
            }
            .validate()
            .is_err()
        );
        assert!(
            LeaderConfig {
                retry_period: ms(0),
                ..ok
            }
            .validate()
            .is_err()
        );
        // Fractions of a second round up: others never wait less than configured.
        assert_eq!(lease_seconds(ms(2500)), 3);
        assert_eq!(lease_seconds(ms(3000)), 3);
    }
}
