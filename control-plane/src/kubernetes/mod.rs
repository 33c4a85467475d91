//! Kubernetes mode (`control-plane serve --kubernetes`): the policy CRD, the
//! watchers that turn Pods, ServiceAccounts, Namespaces, Nodes and policies
//! into the same records standalone `apply` stores, service-account token
//! attestation, and leader election between replicas.

pub mod attest;
pub mod leader;
pub mod network_policy;
pub mod source;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::core::ControlPlane;

/// The ConfigMap agents bootstrap trust from (key `bundle.pem`), kept equal
/// to the current X.509 bundle by the leader.
pub const BUNDLE_CONFIG_MAP: &str = "keyway-bundle";

/// Kubernetes-mode settings from `serve`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the control plane's own objects live.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub holder_identity: String,
    /// NAMESPACE/NAME of the node agent's service account.
    pub agent_service_account: String,
    pub lease_name: String,
    /// Several replicas share a Kubernetes store: elect a leader. Otherwise
    /// this process always leads.
    pub replicas: bool,
}

/// Starts Kubernetes mode: token attestation, leader election (with
/// replicas), the watchers, following other replicas' writes, and the
/// bundle ConfigMap. The returned future ends after `shutdown`.
pub fn start(
    cp: ControlPlane,
    client: kube::Client,
    opts: Options,
    shutdown: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    cp.enable_attestor(std::sync::Arc::new(attest::TokenReviewer::new(
        client.clone(),
        &opts.agent_service_account,
    )?));
    cp.read_workloads_from_kubernetes();
    let mut tasks = Vec::new();
    let mut always_leader = None;
    let leader = if opts.replicas {
        let election = leader::LeaderElection::new(
            client.clone(),
            &opts.namespace,
            &opts.lease_name,
            &opts.holder_identity,
            leader::LeaderConfig::default(),
        );
        let rx = election.subscribe();
        cp.follow_leadership(rx.clone());
        tasks.push(tokio::spawn(election.run(shutdown.clone())));
        rx
    } else {
        // This process always leads; the sender lives as long as the tasks.
        let (tx, rx) = watch::channel(true);
        always_leader = Some(tx);
        rx
    };
    tasks.push(tokio::spawn(source::run(
        cp.clone(),
        client.clone(),
        leader.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn({
        let cp = cp.clone();
        let shutdown = shutdown.clone();
        async move { cp.follow_store(shutdown).await }
    }));
    tasks.push(tokio::spawn(publish_bundle(
        cp,
        client,
        opts.namespace.clone(),
        leader,
        shutdown,
    )));
    Ok(async move {
        let _always_leader = always_leader;
        for t in tasks {
            let _ = t.await;
        }
    })
}

/// Keeps ConfigMap `keyway-bundle` equal to the current X.509 bundle while
/// this replica leads, so agents (which mount it) can make their first
/// connection. Server-side apply makes repeated writes of the same bundle
/// no-ops.
async fn publish_bundle(
    cp: ControlPlane,
    client: kube::Client,
    namespace: String,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut bundle = cp.subscribe_bundle();
    let mut retry: Option<Duration> = None;
    loop {
        if *leader.borrow_and_update() {
            let current = bundle.borrow_and_update().clone();
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(BUNDLE_CONFIG_MAP.into()),
                    namespace: Some(namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "keyway".to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    ("bundle.pem".to_string(), current.to_pem()),
                    ("sequence".to_string(), current.sequence().to_string()),
                ])),
                ..Default::default()
            };
            match api
                .patch(
                    BUNDLE_CONFIG_MAP,
                    &PatchParams::apply("keyway-control-plane").force(),
                    &Patch::Apply(&cm),
                )
                .await
            {
                Ok(_) => {
                    if retry.is_some() {
                        info!("published the trust bundle ConfigMap");
                    }
                    retry = None;
                }
                Err(e) => {
                    let next = retry.map_or(Duration::from_millis(500), |d| {
                        (d * 2).min(Duration::from_secs(30))
                    });
                    if retry.is_none() {
                        warn!(namespace, error = %e, "cannot publish the trust bundle ConfigMap {BUNDLE_CONFIG_MAP}; retrying");
                    }
                    retry = Some(next);
                }
            }
        }
        let wait = async {
            match retry {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = bundle.changed() => if r.is_err() { return },
            _ = leader.changed() => {}
            _ = wait => {}
            _ = shutdown.changed() => return,
        }
    }
}
