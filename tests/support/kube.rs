//! The real kube-apiserver (with etcd, on 127.0.0.1) that the `kubernetes`
//! test tier runs against. `make kubernetes` builds it once (cached), starts
//! it with `scripts/kube-apiserver.sh start DIR`, and points the tests at it
//! with `KEYWAY_KUBE_ENV=DIR/env`. Without that variable these tests fail:
//! the tier must never pass by skipping.
//!
//! Every test works in namespaces it creates with unique names, so tests can
//! share one server. The 1.20 server runs no controller-manager: namespaces
//! never finish terminating and pods with a nodeName need a grace period of
//! 0 to go away; the helpers here do that.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodIP, PodSpec, PodStatus, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::discovery::{self, Scope};

#[derive(Debug)]
pub struct Cluster {
    /// The variables `scripts/kube-apiserver.sh start` wrote.
    pub env: BTreeMap<String, String>,
    pub server: String,
    pub ca_file: PathBuf,
    pub kubeconfig: PathBuf,
    admin_token: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static SEQ: AtomicU32 = AtomicU32::new(0);

/// The apiserver of this test run. Panics, with what to do, when there is none.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let path = std::env::var("KEYWAY_KUBE_ENV").unwrap_or_else(|_| {
            panic!(
                "KEYWAY_KUBE_ENV is not set: the kubernetes tier needs a real kube-apiserver. \
                 Run `make kubernetes`, or `scripts/kube-apiserver.sh start DIR` and set KEYWAY_KUBE_ENV=DIR/env"
            )
        });
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("KEYWAY_KUBE_ENV={path}: cannot read: {e}"));
        let env: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{path} has no {k}; restart the apiserver with scripts/kube-apiserver.sh start"))
        };
        let token_file = get("KEYWAY_APISERVER_TOKEN_FILE");
        let admin_token = std::fs::read_to_string(&token_file)
            .unwrap_or_else(|e| panic!("{token_file}: {e}"))
            .trim()
            .to_string();
        Cluster {
            server: get("KEYWAY_APISERVER"),
            ca_file: get("KEYWAY_APISERVER_CA").into(),
            kubeconfig: get("KUBECONFIG").into(),
            admin_token,
            env,
        }
    })
}

/// A name no other test in this run uses: `prefix-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl Cluster {
    /// A kubeconfig file for a client that authenticates with `token`
    /// (what the real binaries get through KUBECONFIG).
    pub fn kubeconfig_for_token(&self, token: &str, dir: &std::path::Path) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: c\n  context:\n    cluster: local\n    user: u\n\
             current-context: c\n",
            self.server,
            self.ca_file.display(),
            token
        );
        std::fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    /// A client authenticating with a bearer token.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut kc = Kubeconfig::read_from(&self.kubeconfig).expect("read the apiserver's kubeconfig");
        for user in &mut kc.auth_infos {
            user.auth_info = Some(AuthInfo {
                token: Some(token.to_string().into()),
                ..Default::default()
            });
        }
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("client config");
        kube::Client::try_from(cfg).expect("client")
    }

    /// A cluster-admin client.
    pub async fn admin(&self) -> kube::Client {
        self.client_with_token(&self.admin_token.clone()).await
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(self.admin().await);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([("keyway.dev/test".into(), "true".into())])),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        name
    }

    pub async fn service_account(&self, ns: &str, name: &str) -> ServiceAccount {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin().await, ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &sa)
            .await
            .expect("create service account")
    }

    /// A token for service account `ns/sa` (TokenRequest), optionally bound to a pod.
    pub async fn sa_token(
        &self,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        bound_pod: Option<(&str, &str)>,
    ) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin().await, ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|s| s.to_string()).collect(),
                expiration_seconds: Some(3600),
                bound_object_ref: bound_pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..Default::default()
        };
        let resp: TokenRequest = api
            .create_subresource("token", sa, &PostParams::default(), &req)
            .await
            .expect("TokenRequest");
        resp.status.expect("token status").token
    }
}

/// A pod as the tests create it: scheduled to `node`, never run (there is no kubelet).
#[derive(Debug, Clone)]
pub struct PodSpecOpts<'a> {
    pub name: &'a str,
    pub service_account: &'a str,
    pub node: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// Set as status.podIPs (the status subresource), as a kubelet would.
    pub ip: Option<&'a str>,
}

/// Creates the pod (and its IP in status when given); returns it as stored.
pub async fn create_pod(client: &kube::Client, ns: &str, opts: PodSpecOpts<'_>) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(opts.name.into()),
            labels: Some(
                opts.labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(opts.service_account.into()),
            node_name: Some(opts.node.into()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = api
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    if let Some(ip) = opts.ip {
        let status = serde_json::json!({
            "status": PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }
        });
        return api
            .patch_status(opts.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("set pod IP");
    }
    created
}

/// Deletes a pod at once (grace period 0: no kubelet will confirm it).
pub async fn delete_pod(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete pod {ns}/{name}: {e}"),
    }
}

/// Creates a Node object (no kubelet behind it): pods bound to a node only
/// get identities while the Node exists.
pub async fn create_node(client: &kube::Client, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = k8s_openapi::api::core::v1::Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("keyway.dev/test".into(), "true".into())])),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &node)
        .await
        .expect("create node");
}

/// Applies a YAML manifest of one namespaced object with server-side apply.
pub async fn apply_yaml<K>(client: &kube::Client, ns: &str, yaml: &str) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    let obj: K = serde_yaml::from_str(yaml).expect("test manifest parses");
    let name = obj.meta().name.clone().expect("manifest has a name");
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply("keyway-tests").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"))
}

/// Applies one object of any kind (server-side apply, field manager
/// `manager`), optionally as a dry run; returns it as the apiserver did.
pub async fn apply_object(
    client: &kube::Client,
    obj: &serde_json::Value,
    namespace: &str,
    dry_run: bool,
    manager: &str,
) -> serde_json::Value {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the apiserver does not serve {api_version} {kind}: {e}"));
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => {
            assert!(
                obj["metadata"].get("namespace").is_none(),
                "{kind} {name} is cluster-scoped but names a namespace"
            );
            Api::all_with(client.clone(), &resource)
        }
        Scope::Namespaced => {
            assert_eq!(
                obj["metadata"]["namespace"].as_str(),
                Some(namespace),
                "{kind} {name} must name the release namespace"
            );
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
    };
    let mut params = PatchParams::apply(manager).force();
    if dry_run {
        params = params.dry_run();
    }
    let returned = api
        .patch(name, &params, &Patch::Apply(obj))
        .await
        .unwrap_or_else(|e| panic!("the apiserver refused {kind} {name}: {e}\n{obj:#}"));
    serde_json::to_value(&returned).expect("object JSON")
}

/// The KeywayNetworkPolicy CRD the control plane watches, as the chart
/// installs it (server-side apply: idempotent); returns once the apiserver
/// serves it. A control plane started without it never completes its view.
pub async fn install_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::ListParams;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = control_plane::crd::KeywayNetworkPolicy::crd();
    crds.patch(
        crd.metadata.name.as_deref().expect("name"),
        &PatchParams::apply("keyway-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("install the KeywayNetworkPolicy CRD");
    let policies: Api<control_plane::crd::KeywayNetworkPolicy> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Polled: the apiserver says nothing when it starts serving a new type.
    while policies.list(&ListParams::default().limit(1)).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the KeywayNetworkPolicy CRD is not served after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
