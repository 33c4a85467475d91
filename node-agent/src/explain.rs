//! `node-agent explain`: what this node's datapath would do with a new flow
//! and why, from the tables the kernel reads. The evaluation itself is
//! [`crate::datapath::lookup::evaluate`] (the kernel's lookup order); this
//! module resolves workload names through the synced state, names every
//! identity, rule and node, says what to change to allow a dropped flow,
//! and formats the answer. Pure over a [`Lookup`], so it is tested without
//! a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use keyway_common::{AuthKey, drop_reason, hook, identity};
use proto::keyway as pb;

use crate::datapath::DatapathError;
use crate::datapath::lookup::{Evaluation, IpSource, Lookup, evaluate, lookup_ip};
use crate::datapath::tables::rule_id;
use crate::state::NodeState;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "{0}: no such workload in this agent's synced state (give namespace/name as the control plane knows it, or an IPv4 address)"
    )]
    UnknownWorkload(String),
    #[error("{0}: the workload has no IPv4 address")]
    NoAddress(String),
    #[error("--proto {0}: not tcp, udp, sctp, icmp or an IP protocol number")]
    BadProtocol(String),
    #[error("reading the datapath's tables: {0}")]
    Datapath(#[from] DatapathError),
}

/// `tcp`, `udp`, `sctp`, `icmp` (ICMPv6 between IPv6 addresses),
/// `icmpv6` or a number (empty: tcp).
pub fn parse_protocol(s: &str) -> Result<u8, ExplainError> {
    match s.to_ascii_lowercase().as_str() {
        "" | "tcp" => Ok(6),
        "udp" => Ok(17),
        "sctp" => Ok(132),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        n => n.parse().map_err(|_| ExplainError::BadProtocol(s.to_string())),
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        1 => "ICMP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 132)
}

/// `namespace/name` through the node's workloads, then the ipcache (which
/// names the workloads of other nodes); or an IPv4 or IPv6 address as
/// given. A dual-stack workload's address of `family` (IPv6 when true), or
/// with none asked for its first.
pub fn resolve(state: &NodeState, workload: &str, family: Option<bool>) -> Result<IpAddr, ExplainError> {
    if let Ok(ip) = workload.parse::<IpAddr>() {
        return Ok(ip.to_canonical());
    }
    let Some((ns, name)) = workload.split_once('/') else {
        return Err(ExplainError::UnknownWorkload(workload.to_string()));
    };
    let wanted = |ip: &IpAddr| family.is_none_or(|v6| ip.is_ipv6() == v6);
    if let Some(w) = state.workloads.get(&(ns.to_string(), name.to_string())) {
        return w
            .ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .find(wanted)
            .ok_or_else(|| ExplainError::NoAddress(workload.to_string()));
    }
    let mut found: Vec<IpAddr> = state
        .ipcache
        .values()
        .filter(|e| e.namespace == ns && e.workload == name)
        .filter_map(|e| host_address(&e.cidr))
        .filter(wanted)
        .collect();
    // IPv4 first, as a pod's primary address usually is.
    found.sort_by_key(|ip| ip.is_ipv6());
    found
        .first()
        .copied()
        .ok_or_else(|| ExplainError::UnknownWorkload(workload.to_string()))
}

/// The address of a /32 or /128 ipcache CIDR.
fn host_address(cidr: &str) -> Option<IpAddr> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    (len == if ip.is_ipv4() { "32" } else { "128" }).then_some(ip)
}

/// The ipcache CIDR that names exactly `ip`.
pub(crate) fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn reserved_name(id: u32) -> &'static str {
    match id {
        identity::UNKNOWN => "unknown",
        identity::HOST => "host",
        identity::WORLD => "world",
        identity::REMOTE_NODE => "remote-node",
        identity::CONTROL_PLANE => "control-plane",
        _ => "reserved",
    }
}

fn node_name(state: &NodeState, id: u16) -> String {
    state
        .nodes
        .values()
        .find(|n| n.node_id == u32::from(id))
        .map(|n| n.name.clone())
        .unwrap_or_default()
}

fn endpoint(state: &NodeState, t: &dyn Lookup, ip: IpAddr) -> Result<pb::ExplainEndpoint, ExplainError> {
    let (v, source) = lookup_ip(t, ip)?;
    let ip_s = ip.to_string();
    let mut e = pb::ExplainEndpoint {
        ip: ip_s.clone(),
        identity: v.identity,
        node_id: u32::from(v.node_id),
        node: node_name(state, v.node_id),
        ipcache: match source {
            IpSource::Exact => "exact".into(),
            IpSource::Prefix(len) => format!("{}/{len}", crate::datapath::tables::masked(ip, len)),
            IpSource::World => "none".into(),
        },
        local: t.endpoint(ip)?.is_some(),
        ..Default::default()
    };
    if let Some(i) = state.identities.get(&v.identity) {
        e.spiffe_id = i.spiffe_id.clone();
        e.namespace = i.namespace.clone();
        e.service_account = i.service_account.clone();
    }
    if let Some(w) = state.workloads.values().find(|w| w.ips.contains(&ip_s)) {
        e.namespace = w.namespace.clone();
        e.workload = w.name.clone();
        e.service_account = w.service_account.clone();
    } else if let Some(c) = state.ipcache.get(&host_cidr(ip)) {
        if !c.namespace.is_empty() {
            e.namespace = c.namespace.clone();
        }
        e.workload = c.workload.clone();
    }
    Ok(e)
}

/// How an end reads in sentences: `default/api (identity 257)`.
fn label(e: &pb::ExplainEndpoint) -> String {
    let who = if !e.workload.is_empty() {
        format!("{}/{}", e.namespace, e.workload)
    } else {
        e.ip.clone()
    };
    if identity::is_reserved(e.identity) {
        format!("{who} (identity {})", reserved_name(e.identity))
    } else {
        format!("{who} (identity {})", e.identity)
    }
}

fn identity_label(state: &NodeState, id: u32) -> String {
    match state.identities.get(&id) {
        Some(i) => format!("{} ({id})", i.spiffe_id),
        None if identity::is_reserved(id) => format!("{} ({id})", reserved_name(id)),
        None => id.to_string(),
    }
}

/// The policies that select `subject` in `direction`, from the names of
/// the compiled rules (`<namespace>/<policy> <direction>[<i>]`).
fn selecting_policies(state: &NodeState, subject: u32, direction: u8) -> BTreeSet<String> {
    state
        .policy
        .iter()
        .filter(|(k, _)| k.0 == subject && k.4 == u32::from(direction))
        .filter(|(_, e)| !e.rule.starts_with("default-allow") && !e.rule.starts_with("keyway-exempt"))
        .filter_map(|(_, e)| e.rule.split_once(' ').map(|(p, _)| p.to_string()))
        .collect()
}

fn subject_has_policy(state: &NodeState, subject: u32, direction: u8) -> bool {
    state
        .policy
        .keys()
        .any(|k| k.0 == subject && k.4 == u32::from(direction))
}

/// Everything `explain` needs besides the tables.
#[derive(Debug)]
pub struct Context<'a> {
    pub state: &'a NodeState,
    /// How the agent got each auth entry (`dialled`, `local`, ...).
    pub via: &'a BTreeMap<AuthKey, &'static str>,
    /// Kernel monotonic time (`datapath::monotonic_ns`).
    pub now_ns: u64,
}

/// A pod interface a packet enters from (`explain --via`).
#[derive(Debug, Clone)]
pub struct Via {
    pub name: String,
    pub ifindex: u32,
}

/// The local workload behind the interface `ifindex`, and its addresses.
fn owner_of(
    state: &NodeState,
    t: &dyn Lookup,
    ifindex: u32,
) -> Result<Option<(String, Vec<String>)>, ExplainError> {
    for w in state.workloads.values() {
        for ip in w.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            if t.endpoint(ip)?.is_some_and(|ep| ep.ifindex == ifindex) {
                return Ok(Some((format!("{}/{}", w.namespace, w.name), w.ips.clone())));
            }
        }
    }
    Ok(None)
}

/// What the datapath of this node does with a new flow `from -> to`. With
/// `via`, the packet enters from that pod interface (whatever its source
/// says), as a forged one would.
#[allow(clippy::too_many_arguments, reason = "the flow's fields, one each")]
pub fn explain(
    cx: &Context<'_>,
    t: &dyn Lookup,
    from: &str,
    to: &str,
    port: u16,
    proto: u8,
    via: Option<&Via>,
) -> Result<pb::ExplainResponse, ExplainError> {
    let state = cx.state;
    // Both ends in one family: the one an address given names, else IPv4
    // where both have it.
    let given = |w: &str| w.parse::<IpAddr>().ok().map(|ip| ip.is_ipv6());
    let family = given(from).or(given(to));
    let src_ip = match family {
        Some(f) => resolve(state, from, Some(f))?,
        None => resolve(state, from, Some(false)).or_else(|_| resolve(state, from, None))?,
    };
    let dst_ip = resolve(state, to, Some(src_ip.is_ipv6()))?;
    // ICMP in IPv6 is ICMPv6.
    let proto = match proto {
        1 if src_ip.is_ipv6() => 58,
        p => p,
    };
    let src = endpoint(state, t, src_ip)?;
    let dst = endpoint(state, t, dst_ip)?;
    let cfg = t.config()?;
    let here = node_name(state, cfg.local_node_id);
    let rules: BTreeMap<u32, String> = state
        .policy
        .values()
        .map(|e| (rule_id(&e.rule), e.rule.clone()))
        .collect();
    let port = if has_ports(proto) { port } else { 0 };
    let service = if has_ports(proto) {
        format!("{} {port}", protocol_name(proto))
    } else {
        protocol_name(proto)
    };

    let mut hooks = Vec::new();
    for at in [hook::FROM_POD, hook::TO_POD] {
        let (end, dir_name) = if at == hook::FROM_POD {
            (&src, "egress")
        } else {
            (&dst, "ingress")
        };
        let mut h = pb::ExplainHook {
            hook: if at == hook::FROM_POD {
                "from-pod"
            } else {
                "to-pod"
            }
            .into(),
            direction: dir_name.into(),
            ..Default::default()
        };
        let entered_here = at == hook::FROM_POD && via.is_some();
        if !end.local && !entered_here {
            h.node = end.node.clone();
            let which = if at == hook::FROM_POD {
                "source"
            } else {
                "destination"
            };
            let hint = if identity::is_reserved(end.identity) {
                format!(
                    "the {which} {} is not a workload of the cluster: no Keyway datapath judges its {dir_name}",
                    label(end)
                )
            } else if end.node_id == 0 {
                format!(
                    "the {which} {} is placed on no node with an agent: no Keyway datapath judges its {dir_name}",
                    label(end)
                )
            } else if u16::try_from(end.node_id).ok() == Some(cfg.local_node_id) {
                format!(
                    "the {which} {} is placed on this node but the datapath guards no interface for it yet: \
                     its {dir_name} is not judged (check the agent's log for attach errors)",
                    label(end)
                )
            } else {
                let node = if end.node.is_empty() {
                    format!("node id {}", end.node_id)
                } else {
                    format!("node {}", end.node)
                };
                format!("the {which}'s {dir_name} is judged on {node}: run `node-agent explain` there")
            };
            h.to_allow.push(hint);
            hooks.push(h);
            continue;
        }
        h.node = here.clone();
        h.judged_here = true;
        let via_ifindex = if at == hook::FROM_POD {
            via.map(|v| v.ifindex)
        } else {
            None
        };
        let e = evaluate(t, src_ip, dst_ip, port, proto, at, via_ifindex, cx.now_ns)?;
        fill(cx, &rules, &e, &src, &dst, &service, &mut h);
        if e.reason == drop_reason::SOURCE_SPOOFED {
            let iface = via
                .map(|v| v.name.clone())
                .unwrap_or_else(|| "its interface".into());
            let sender = match via.map(|v| owner_of(state, t, v.ifindex)).transpose()?.flatten() {
                Some((w, ips)) => format!("{w} (addresses {})", ips.join(", ")),
                None => "no workload this agent guards".into(),
            };
            h.to_allow.push(format!(
                "the source {src_ip} is not an address of the pod behind {iface}, which is {sender}: a pod may \
                 only send from its own addresses, so this packet is a forged sender and is dropped whatever \
                 the policy says"
            ));
        }
        hooks.push(h);
    }

    let judged: Vec<&pb::ExplainHook> = hooks.iter().filter(|h| h.judged_here).collect();
    let (verdict, reason) = match judged.iter().find(|h| h.verdict == "DROPPED") {
        Some(h) => ("DROPPED".to_string(), h.drop_reason.clone()),
        None if judged.is_empty() => (String::new(), String::new()),
        None => ("FORWARDED".to_string(), String::new()),
    };
    Ok(pb::ExplainResponse {
        source: Some(src),
        destination: Some(dst),
        port: u32::from(port),
        protocol: protocol_name(proto),
        hooks,
        verdict,
        drop_reason: reason,
        node: here,
    })
}

/// One judged hook: the policy entry, the auth check, the verdict, and what
/// to change.
fn fill(
    cx: &Context<'_>,
    rules: &BTreeMap<u32, String>,
    e: &Evaluation,
    src: &pb::ExplainEndpoint,
    dst: &pb::ExplainEndpoint,
    service: &str,
    h: &mut pb::ExplainHook,
) {
    let state = cx.state;
    let (subject, peer) = if e.hook == hook::FROM_POD {
        (src, dst)
    } else {
        (dst, src)
    };
    let flow = format!("{} -> {} on {service}", label(src), label(dst));
    h.verdict = if e.forwarded { "FORWARDED" } else { "DROPPED" }.into();
    h.drop_reason = if e.forwarded {
        String::new()
    } else {
        drop_reason::name(e.reason).into()
    };
    let rule = e
        .policy
        .and_then(|hit| rules.get(&hit.rule_id).cloned())
        .unwrap_or_default();
    if let Some(hit) = e.policy {
        h.policy = Some(pb::ExplainPolicy {
            matched: hit.probe.name().into(),
            subject: hit.key.subject,
            peer: hit.key.peer,
            port: if hit.key.port_block == 0 {
                0
            } else {
                u32::from(e.port)
            },
            protocol: u32::from(hit.key.proto),
            allow: true,
            auth_required: hit.auth_required,
            rule: rule.clone(),
            rule_id: hit.rule_id,
            port_block: u32::from(hit.key.port_block),
        });
        h.auth_required = hit.auth_required;
    }
    if let Some(a) = e.auth {
        let remaining_ms = a
            .expiry_ns
            .map(|x| (x as i128 - cx.now_ns as i128) / 1_000_000)
            .unwrap_or(0) as i64;
        h.auth = Some(pb::ExplainAuth {
            local_identity: a.key.local_id,
            remote_identity: a.key.remote_id,
            remote_node_id: u32::from(a.key.remote_node_id),
            remote_node: node_name(state, a.key.remote_node_id),
            state: match (a.expiry_ns, a.valid) {
                (_, true) => "valid",
                (Some(_), false) => "expired",
                (None, _) => "missing",
            }
            .into(),
            remaining_ms,
            via: cx.via.get(&a.key).map(|v| v.to_string()).unwrap_or_default(),
        });
    }
    if e.forwarded {
        return;
    }
    let dir_name = &h.direction;
    match (e.reason, e.policy) {
        (drop_reason::POLICY_DENIED, None) => {
            let policies = selecting_policies(state, e.subject, e.direction);
            if !policies.is_empty() {
                let names: Vec<String> = policies.into_iter().collect();
                let which = if names.len() == 1 {
                    format!("policy {}", names[0])
                } else {
                    format!("one of the policies {}", names.join(", "))
                };
                h.to_allow.push(format!(
                    "no rule allows {flow}: add an {dir_name} rule allowing {} to {which} (it selects {})",
                    label(peer),
                    label(subject)
                ));
            } else if subject_has_policy(state, e.subject, e.direction) {
                h.to_allow.push(format!(
                    "no rule allows {flow}: a policy selects {} for {dir_name} with no rule for this traffic \
                     (default-deny); add an {dir_name} rule allowing {} to it",
                    label(subject),
                    label(peer)
                ));
            } else {
                h.to_allow.push(format!(
                    "the datapath has no {dir_name} policy for {}: is its workload registered with the control \
                     plane and this agent synced?",
                    label(subject)
                ));
            }
            if e.peer == identity::WORLD {
                h.to_allow.push(format!(
                    "{} is not in the ipcache, so the datapath sees identity world: only an entity rule (world) \
                     can allow it",
                    peer.ip
                ));
            }
        }
        (drop_reason::POLICY_DENIED, Some(_)) => {
            h.to_allow
                .push(format!("the rule \"{rule}\" denies {flow}: change or remove it"));
        }
        (drop_reason::AUTH_REQUIRED, _) => {
            let a = e.auth.expect("auth-required carries the auth check");
            let pair = format!(
                "{} and {} (node {})",
                identity_label(state, a.key.local_id),
                identity_label(state, a.key.remote_id),
                match node_name(state, a.key.remote_node_id) {
                    n if n.is_empty() => a.key.remote_node_id.to_string(),
                    n => n,
                }
            );
            match a.expiry_ns {
                None => h.to_allow.push(format!(
                    "auth required but no entry: the agents have not authenticated {pair}; check `node-agent auth \
                     list` and the handshake logs of both agents"
                )),
                Some(x) => h.to_allow.push(format!(
                    "auth required but the entry expired {}s ago: the agents have not re-authenticated {pair}; \
                     check `node-agent auth list` and the handshake logs of both agents",
                    cx.now_ns.saturating_sub(x) / 1_000_000_000
                )),
            }
            if !rule.is_empty() {
                h.to_allow.push(format!(
                    "or, if the pair need not be authenticated, set `authentication: {{ mode: disabled }}` on \"{rule}\""
                ));
            }
        }
        _ => {}
    }
}

fn end_text(e: &pb::ExplainEndpoint) -> String {
    let mut s = format!("{:<15}", e.ip);
    if !e.workload.is_empty() {
        s.push_str(&format!(" {}/{}", e.namespace, e.workload));
    }
    if identity::is_reserved(e.identity) {
        s.push_str(&format!(
            " identity {} ({})",
            e.identity,
            reserved_name(e.identity)
        ));
    } else {
        s.push_str(&format!(" identity {}", e.identity));
    }
    if !e.spiffe_id.is_empty() {
        s.push_str(&format!(" {}", e.spiffe_id));
    }
    if e.node_id != 0 {
        let node = if e.node.is_empty() {
            e.node_id.to_string()
        } else {
            format!("{} ({})", e.node, e.node_id)
        };
        s.push_str(&format!(" node {node}"));
    }
    s.push_str(&format!(" ipcache {}", e.ipcache));
    if e.local {
        s.push_str(" local");
    }
    s
}

fn millis(ms: i64) -> String {
    let abs = std::time::Duration::from_millis(ms.unsigned_abs());
    if abs.as_secs() == 0 {
        format!("{}ms", abs.as_millis())
    } else {
        keyway_identity::duration::format(std::time::Duration::from_secs(abs.as_secs()))
    }
}

/// The human answer.
pub fn format_text(r: &pb::ExplainResponse) -> String {
    let src = r.source.clone().unwrap_or_default();
    let dst = r.destination.clone().unwrap_or_default();
    let service = if r.port != 0 {
        format!("{} {}", r.protocol, r.port)
    } else {
        r.protocol.clone()
    };
    let mut out = String::new();
    let verdict = match (r.verdict.as_str(), r.drop_reason.as_str()) {
        ("", _) => "not judged on this node".to_string(),
        (v, "") => v.to_string(),
        (v, reason) => format!("{v} {reason}"),
    };
    out.push_str(&format!(
        "{} -> {} {service} on node {}: {verdict}\n",
        label(&src),
        label(&dst),
        if r.node.is_empty() { "?" } else { &r.node }
    ));
    out.push_str(&format!("  source       {}\n", end_text(&src)));
    out.push_str(&format!("  destination  {}\n", end_text(&dst)));
    for h in &r.hooks {
        let whose = if h.hook == "from-pod" { &src } else { &dst };
        out.push_str(&format!("{} ({} of {})", h.hook, h.direction, label(whose)));
        if !h.judged_here {
            if h.node.is_empty() {
                out.push_str(": not judged here\n");
            } else {
                out.push_str(&format!(": judged on node {}, not here\n", h.node));
            }
        } else {
            out.push('\n');
            match &h.policy {
                Some(p) => out.push_str(&format!(
                    "  policy   {} key {{subject {}, peer {}, port {}, proto {}, {}}}: {}{}{}\n",
                    p.matched,
                    p.subject,
                    p.peer,
                    p.port,
                    p.protocol,
                    h.direction,
                    if p.allow { "allow" } else { "deny" },
                    if p.auth_required { ", auth required" } else { "" },
                    if p.rule.is_empty() {
                        format!(" (rule id {})", p.rule_id)
                    } else {
                        format!(" rule=\"{}\"", p.rule)
                    }
                )),
                None => out.push_str(
                    "  policy   no entry (exact, any-port, any-peer, any-peer-and-port all miss)\n",
                ),
            }
            if let Some(a) = &h.auth {
                let node = if a.remote_node.is_empty() {
                    a.remote_node_id.to_string()
                } else {
                    format!("{} ({})", a.remote_node, a.remote_node_id)
                };
                let how = match a.state.as_str() {
                    "valid" => format!("valid for {}", millis(a.remaining_ms)),
                    "expired" => format!("expired {} ago", millis(a.remaining_ms)),
                    _ => "missing".to_string(),
                };
                let via = if a.via.is_empty() {
                    String::new()
                } else {
                    format!(" via {}", a.via)
                };
                out.push_str(&format!(
                    "  auth     key {{local {}, remote {}, node {node}}}: {how}{via}\n",
                    a.local_identity, a.remote_identity
                ));
            } else if h.policy.is_some() {
                out.push_str("  auth     not required\n");
            }
            out.push_str(&format!("  verdict  {}", h.verdict));
            if !h.drop_reason.is_empty() {
                out.push_str(&format!(" {}", h.drop_reason));
            }
            out.push('\n');
        }
        for t in &h.to_allow {
            let lead = if h.judged_here { "to allow it" } else { "note" };
            out.push_str(&format!("  {lead}: {t}\n"));
        }
    }
    out
}

fn endpoint_json(e: &pb::ExplainEndpoint) -> serde_json::Value {
    serde_json::json!({
        "ip": e.ip, "identity": e.identity, "spiffe_id": e.spiffe_id, "namespace": e.namespace,
        "workload": e.workload, "service_account": e.service_account, "node_id": e.node_id,
        "node": e.node, "ipcache": e.ipcache, "local": e.local,
    })
}

/// The answer as one JSON object (`-o json`).
pub fn to_json(r: &pb::ExplainResponse) -> serde_json::Value {
    let hooks: Vec<serde_json::Value> = r
        .hooks
        .iter()
        .map(|h| {
            serde_json::json!({
                "hook": h.hook,
                "direction": h.direction,
                "node": h.node,
                "judged_here": h.judged_here,
                "policy": h.policy.as_ref().map(|p| serde_json::json!({
                    "matched": p.matched, "subject": p.subject, "peer": p.peer, "port": p.port,
                    "protocol": p.protocol, "allow": p.allow, "auth_required": p.auth_required,
                    "rule": p.rule, "rule_id": p.rule_id,
                })),
                "auth_required": h.auth_required,
                "auth": h.auth.as_ref().map(|a| serde_json::json!({
                    "local_identity": a.local_identity, "remote_identity": a.remote_identity,
                    "remote_node_id": a.remote_node_id, "remote_node": a.remote_node,
                    "state": a.state, "remaining_ms": a.remaining_ms, "via": a.via,
                })),
                "verdict": h.verdict,
                "drop_reason": h.drop_reason,
                "to_allow": h.to_allow,
            })
        })
        .collect();
    serde_json::json!({
        "source": r.source.as_ref().map(endpoint_json),
        "destination": r.destination.as_ref().map(endpoint_json),
        "port": r.port,
        "protocol": r.protocol,
        "node": r.node,
        "verdict": r.verdict,
        "drop_reason": r.drop_reason,
        "hooks": hooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::lookup::MemoryLookup;
    use crate::datapath::tables::Tables;
    use keyway_common::{EndpointInfo, auth_type, direction};
    use std::net::Ipv4Addr;

    const TD: &str = "spiffe://example.org";
    const FRONTEND: u32 = 300;
    const API: u32 = 301;
    const OTHER: u32 = 302;
    const IP_FE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const IP_API: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
    const IP_OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
    const NOW: u64 = 1_000 * 1_000_000_000;

    /// frontend and other on node-a (id 1, this node), api on node-b (id 2).
    fn state() -> NodeState {
        let mut s = NodeState {
            synced: true,
            ..Default::default()
        };
        for (name, id) in [("node-a", 1), ("node-b", 2)] {
            s.nodes.insert(
                name.into(),
                pb::Node {
                    name: name.into(),
                    node_id: id,
                    addresses: vec![],
                },
            );
        }
        for (name, id, ip, node, node_id) in [
            ("frontend", FRONTEND, IP_FE, "node-a", 1),
            ("api", API, IP_API, "node-b", 2),
            ("other", OTHER, IP_OTHER, "node-a", 1),
        ] {
            s.identities.insert(
                id,
                pb::Identity {
                    id,
                    spiffe_id: format!("{TD}/ns/default/sa/{name}"),
                    namespace: "default".into(),
                    service_account: name.into(),
                    ..Default::default()
                },
            );
            s.ipcache.insert(
                format!("{ip}/32"),
                pb::IpcacheEntry {
                    cidr: format!("{ip}/32"),
                    identity: id,
                    node_id,
                    namespace: "default".into(),
                    workload: name.into(),
                },
            );
            if node == "node-a" {
                s.workloads.insert(
                    ("default".into(), name.into()),
                    pb::Workload {
                        namespace: "default".into(),
                        name: name.into(),
                        service_account: name.into(),
                        node: node.into(),
                        ips: vec![ip.to_string()],
                        identity: id,
                        spiffe_id: format!("{TD}/ns/default/sa/{name}"),
                        ..Default::default()
                    },
                );
            }
        }
        s
    }

    fn rule(s: &mut NodeState, key: (u32, u32, u32, u32, u32), auth: bool, rule: &str) {
        {
            let (k, e) = crate::state::port_entry(key, auth, rule);
            s.policy.insert(k, e);
        }
    }

    const IN: u32 = direction::INGRESS as u32;
    const EG: u32 = direction::EGRESS as u32;

    /// The kernel's view on `local_ips`' node: tables from the state, the
    /// given auth entries.
    fn lookup(
        s: &NodeState,
        node_id: u16,
        local_ips: &[Ipv4Addr],
        auth: &[(u32, u32, u16, u64)],
    ) -> MemoryLookup {
        let mut m = MemoryLookup {
            tables: Tables::from_state(s),
            ..Default::default()
        };
        m.config.local_node_id = node_id;
        for ip in local_ips {
            m.endpoints.insert(IpAddr::V4(*ip), EndpointInfo::default());
        }
        for &(local, remote, node, expiry) in auth {
            m.auth.insert(
                AuthKey {
                    local_id: local,
                    remote_id: remote,
                    remote_node_id: node,
                    auth_type: auth_type::MTLS_SPIFFE,
                    _pad: 0,
                },
                expiry,
            );
        }
        m
    }

    fn run(s: &NodeState, t: &MemoryLookup, from: &str, to: &str, port: u16) -> pb::ExplainResponse {
        let via = BTreeMap::new();
        let cx = Context {
            state: s,
            via: &via,
            now_ns: NOW,
        };
        explain(&cx, t, from, to, port, 6, None).unwrap()
    }

    fn hook<'a>(r: &'a pb::ExplainResponse, name: &str) -> &'a pb::ExplainHook {
        r.hooks.iter().find(|h| h.hook == name).unwrap()
    }

    /// api selected for ingress: frontend may reach 8080, nobody else.
    fn api_policy(auth: bool) -> NodeState {
        let mut s = state();
        rule(
            &mut s,
            (API, FRONTEND, 8080, 6, IN),
            auth,
            "default/api-in ingress[0]",
        );
        for id in [FRONTEND, OTHER] {
            for dir in [IN, EG] {
                rule(
                    &mut s,
                    (id, 0, 0, 0, dir),
                    false,
                    "default-allow: no policy selects this endpoint",
                );
            }
        }
        rule(
            &mut s,
            (API, 0, 0, 0, EG),
            false,
            "default-allow: no policy selects this endpoint",
        );
        rule(&mut s, (API, 4, 0, 0, IN), false, "keyway-exempt: control plane");
        s
    }

    #[test]
    fn an_allowed_flow_names_the_exact_entry_and_forwards() {
        let s = api_policy(false);
        let t = lookup(&s, 2, &[IP_API], &[]);
        let r = run(&s, &t, "default/frontend", "default/api", 8080);
        assert_eq!((r.verdict.as_str(), r.node.as_str()), ("FORWARDED", "node-b"));
        let src = r.source.as_ref().unwrap();
        assert_eq!(
            (src.identity, src.workload.as_str(), src.node.as_str()),
            (FRONTEND, "frontend", "node-a")
        );
        assert_eq!(src.spiffe_id, format!("{TD}/ns/default/sa/frontend"));
        let from = hook(&r, "from-pod");
        assert!(!from.judged_here);
        assert!(from.to_allow[0].contains("node node-a"), "{:?}", from.to_allow);
        let to = hook(&r, "to-pod");
        let p = to.policy.as_ref().unwrap();
        assert_eq!(
            (p.matched.as_str(), p.subject, p.peer, p.port, p.protocol),
            ("exact", API, FRONTEND, 8080, 6)
        );
        assert_eq!(p.rule, "default/api-in ingress[0]");
        assert!(p.allow && !to.auth_required && to.auth.is_none());
        assert_eq!(to.verdict, "FORWARDED");
        assert!(to.to_allow.is_empty());
        assert!(format_text(&r).contains("FORWARDED"));
    }

    #[test]
    fn default_deny_names_the_policy_to_change() {
        let s = api_policy(false);
        let t = lookup(&s, 2, &[IP_API], &[]);
        let r = run(&s, &t, "default/other", "default/api", 8080);
        assert_eq!(
            (r.verdict.as_str(), r.drop_reason.as_str()),
            ("DROPPED", "policy-denied")
        );
        let to = hook(&r, "to-pod");
        assert!(to.policy.is_none());
        assert!(
            to.to_allow[0].starts_with(
                "no rule allows default/other (identity 302) -> default/api (identity 301) on TCP 8080"
            ) && to.to_allow[0].contains(
                "add an ingress rule allowing default/other (identity 302) to policy default/api-in"
            ),
            "{:?}",
            to.to_allow
        );
        // Another port of an allowed peer: denied too.
        let r = run(&s, &t, "default/frontend", "10.0.2.10", 9090);
        assert_eq!(r.drop_reason, "policy-denied");
    }

    #[test]
    fn no_policy_means_the_default_allow_wildcard() {
        let s = api_policy(false);
        // On node-a: other -> frontend, both local; nothing selects either.
        let t = lookup(&s, 1, &[IP_FE, IP_OTHER], &[]);
        let r = run(&s, &t, "default/other", "default/frontend", 5432);
        assert_eq!(r.verdict, "FORWARDED");
        for h in &r.hooks {
            assert!(h.judged_here);
            let p = h.policy.as_ref().unwrap();
            assert_eq!((p.matched.as_str(), p.peer, p.port), ("any-peer-and-port", 0, 0));
            assert!(p.rule.starts_with("default-allow"));
        }
        assert_eq!(hook(&r, "from-pod").policy.as_ref().unwrap().subject, OTHER);
        assert_eq!(hook(&r, "to-pod").policy.as_ref().unwrap().subject, FRONTEND);
    }

    #[test]
    fn auth_required_with_a_valid_entry_forwards_and_says_how_long() {
        let s = api_policy(true);
        let t = lookup(&s, 2, &[IP_API], &[(API, FRONTEND, 1, NOW + 90_000_000_000)]);
        let r = run(&s, &t, "default/frontend", "default/api", 8080);
        assert_eq!(r.verdict, "FORWARDED");
        let to = hook(&r, "to-pod");
        assert!(to.auth_required);
        let a = to.auth.as_ref().unwrap();
        assert_eq!(
            (a.local_identity, a.remote_identity, a.remote_node_id),
            (API, FRONTEND, 1)
        );
        assert_eq!(
            (a.state.as_str(), a.remaining_ms, a.remote_node.as_str()),
            ("valid", 90_000, "node-a")
        );
        assert!(format_text(&r).contains("valid for 1m30s"), "{}", format_text(&r));
    }

    #[test]
    fn auth_required_with_an_expired_or_missing_entry_drops_auth_required() {
        let s = api_policy(true);
        let expired = lookup(&s, 2, &[IP_API], &[(API, FRONTEND, 1, NOW - 5_000_000_000)]);
        let r = run(&s, &expired, "default/frontend", "default/api", 8080);
        assert_eq!(
            (r.verdict.as_str(), r.drop_reason.as_str()),
            ("DROPPED", "auth-required")
        );
        let to = hook(&r, "to-pod");
        assert_eq!(to.auth.as_ref().unwrap().state, "expired");
        assert_eq!(to.auth.as_ref().unwrap().remaining_ms, -5_000);
        assert!(to.to_allow[0].contains("expired 5s ago"), "{:?}", to.to_allow);

        // An entry for another node of the peer is not this pair's entry.
        let missing = lookup(&s, 2, &[IP_API], &[(API, FRONTEND, 3, NOW + 1_000_000_000)]);
        let r = run(&s, &missing, "default/frontend", "default/api", 8080);
        assert_eq!(r.drop_reason, "auth-required");
        let to = hook(&r, "to-pod");
        assert_eq!(to.auth.as_ref().unwrap().state, "missing");
        assert!(
            to.to_allow[0].starts_with("auth required but no entry"),
            "{:?}",
            to.to_allow
        );
        assert!(to.to_allow[1].contains("mode: disabled"));
    }

    #[test]
    fn wildcard_port_and_peer_entries_match_in_the_kernels_order() {
        let mut s = state();
        // api: any port from frontend (with auth), port 53/UDP from anyone.
        rule(
            &mut s,
            (API, FRONTEND, 0, 0, IN),
            true,
            "default/api-in ingress[0]",
        );
        rule(&mut s, (API, 0, 8443, 6, IN), false, "default/api-in ingress[1]");
        let t = lookup(&s, 2, &[IP_API], &[(API, FRONTEND, 1, NOW + 1_000_000_000)]);
        let r = run(&s, &t, "default/frontend", "default/api", 8443);
        // The peer-specific any-port entry comes before the any-peer one.
        let p = hook(&r, "to-pod").policy.clone().unwrap();
        assert_eq!((p.matched.as_str(), p.peer, p.port), ("any-port", FRONTEND, 0));
        assert_eq!(r.verdict, "FORWARDED");
        let r = run(&s, &t, "default/other", "default/api", 8443);
        let p = hook(&r, "to-pod").policy.clone().unwrap();
        assert_eq!(
            (p.matched.as_str(), p.peer, p.port, p.rule.as_str()),
            ("any-peer", 0, 8443, "default/api-in ingress[1]")
        );
        assert_eq!(r.verdict, "FORWARDED");
        let r = run(&s, &t, "default/other", "default/api", 8080);
        assert_eq!(r.drop_reason, "policy-denied");
    }

    #[test]
    fn unknown_addresses_are_world_and_names_must_exist() {
        let s = api_policy(false);
        let t = lookup(&s, 2, &[IP_API], &[]);
        let r = run(&s, &t, "192.0.2.1", "default/api", 8080);
        let src = r.source.unwrap();
        assert_eq!((src.identity, src.ipcache.as_str()), (identity::WORLD, "none"));
        assert_eq!(r.drop_reason, "policy-denied");
        let via = BTreeMap::new();
        let cx = Context {
            state: &s,
            via: &via,
            now_ns: NOW,
        };
        assert!(matches!(
            explain(&cx, &t, "default/nope", "default/api", 80, 6, None),
            Err(ExplainError::UnknownWorkload(_))
        ));
        assert!(matches!(parse_protocol("gre"), Err(ExplainError::BadProtocol(_))));
        assert_eq!(parse_protocol("UDP").unwrap(), 17);
    }

    #[test]
    fn json_carries_every_hook() {
        let s = api_policy(false);
        let t = lookup(&s, 2, &[IP_API], &[]);
        let j = to_json(&run(&s, &t, "default/other", "default/api", 8080));
        assert_eq!(j["verdict"], "DROPPED");
        assert_eq!(j["drop_reason"], "policy-denied");
        assert_eq!(j["hooks"][1]["hook"], "to-pod");
        assert!(j["hooks"][1]["policy"].is_null());
        assert_eq!(j["destination"]["workload"], "api");
    }
}
