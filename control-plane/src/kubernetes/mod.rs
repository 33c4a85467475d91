//! Kubernetes mode (`control-plane serve --kubernetes`): the policy CRD, the
//! watchers that turn Pods, ServiceAccounts, Namespaces, Nodes and policies
//! into the same records standalone `apply` stores, service-account token
//! attestation, and leader election between replicas.

pub mod crd;
