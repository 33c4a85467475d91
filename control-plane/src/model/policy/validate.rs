//! From the raw shape ([`crate::crd`]) to the validated spec: `TryFrom`,
//! with errors that name the field (`spec.ingress[0].toPorts[0].ports[0].port`).
//! Every way a policy reaches the control plane (a standalone document, a
//! KeywayNetworkPolicy object, a translated NetworkPolicy) goes through here.

use std::collections::BTreeMap;

use crate::crd;

use super::{
    AuthMode, CILIUM_LABELS_PREFIX, Direction, Entity, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator,
    PolicySpec, PortProtocol, Protocol, Requirement, Rule, SERVICE_ACCOUNT_LABEL, Selector,
};

/// Why a policy spec was refused. The message starts with the field's path
/// from `spec`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl TryFrom<&crd::KeywayNetworkPolicySpec> for PolicySpec {
    type Error = InvalidSpec;

    fn try_from(raw: &crd::KeywayNetworkPolicySpec) -> Result<Self, InvalidSpec> {
        Ok(PolicySpec {
            endpoint_selector: selector("spec.endpointSelector", &raw.endpoint_selector)?,
            ingress: rules("spec.ingress", raw.ingress.as_deref(), RuleParts::ingress)?,
            egress: rules("spec.egress", raw.egress.as_deref(), RuleParts::egress)?,
        })
    }
}

fn invalid(message: String) -> InvalidSpec {
    InvalidSpec(message)
}

/// An ingress or egress rule, its peers named for its direction.
struct RuleParts<'a> {
    direction: Direction,
    authentication: Option<&'a crd::Authentication>,
    endpoints: Option<&'a [crd::LabelSelector]>,
    entities: Option<&'a [String]>,
    to_ports: Option<&'a [crd::PortRule]>,
}

/// A direction's rules, each read as its [`RuleParts`]; `None` stays `None`
/// (no rules is not the same as an empty list).
fn rules<'a, R>(
    path: &str,
    list: Option<&'a [R]>,
    parts: impl Fn(&'a R) -> RuleParts<'a>,
) -> Result<Option<Vec<Rule>>, InvalidSpec> {
    list.map(|list| {
        list.iter()
            .enumerate()
            .map(|(i, r)| parts(r).validate(&format!("{path}[{i}]")))
            .collect()
    })
    .transpose()
}

impl<'a> RuleParts<'a> {
    fn ingress(r: &'a crd::IngressRule) -> Self {
        RuleParts {
            direction: Direction::Ingress,
            authentication: r.authentication.as_ref(),
            endpoints: r.from_endpoints.as_deref(),
            entities: r.from_entities.as_deref(),
            to_ports: r.to_ports.as_deref(),
        }
    }

    fn egress(r: &'a crd::EgressRule) -> Self {
        RuleParts {
            direction: Direction::Egress,
            authentication: r.authentication.as_ref(),
            endpoints: r.to_endpoints.as_deref(),
            entities: r.to_entities.as_deref(),
            to_ports: r.to_ports.as_deref(),
        }
    }

    fn validate(&self, path: &str) -> Result<Rule, InvalidSpec> {
        let (peers, entities) = match self.direction {
            Direction::Ingress => ("fromEndpoints", "fromEntities"),
            Direction::Egress => ("toEndpoints", "toEntities"),
        };
        let authentication = match self.authentication.map(|a| a.mode.as_str()) {
            None | Some("disabled") => AuthMode::Disabled,
            Some("required") => AuthMode::Required,
            Some(other) => {
                return Err(invalid(format!(
                    "{path}.authentication.mode: {other:?} is not a mode; use required or disabled"
                )));
            }
        };
        let endpoints = self
            .endpoints
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, s)| selector(&format!("{path}.{peers}[{i}]"), s))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let entities = self
            .entities
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, e)| {
                        Entity::parse(e).ok_or_else(|| {
                            invalid(format!(
                                "{path}.{entities}[{i}]: {e:?} is not a supported entity; use one of {}",
                                Entity::NAMES
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let ports = self
            .to_ports
            .map(|list| ports(&format!("{path}.toPorts"), list))
            .transpose()?;
        Ok(Rule {
            authentication,
            endpoints,
            entities,
            ports,
        })
    }
}

fn ports(path: &str, list: &[crd::PortRule]) -> Result<Vec<PortProtocol>, InvalidSpec> {
    if list.is_empty() {
        return Err(invalid(format!(
            "{path} is empty; list ports, or leave toPorts out to allow every port and protocol"
        )));
    }
    let mut out = Vec::new();
    for (i, rule) in list.iter().enumerate() {
        let path = format!("{path}[{i}]");
        if rule.ports.is_empty() {
            return Err(invalid(format!(
                "{path}.ports is missing or empty; list at least one port"
            )));
        }
        for (j, raw) in rule.ports.iter().enumerate() {
            let path = format!("{path}.ports[{j}]");
            // `{}` would be every port of every protocol: say so instead.
            if raw.port.is_none() && raw.protocol.is_none() {
                return Err(invalid(format!(
                    "{path}: names neither a port nor a protocol; leave toPorts out to allow every port and protocol"
                )));
            }
            let protocol = match raw.protocol.as_deref() {
                None => Protocol::Any,
                Some(p) => Protocol::parse(p).ok_or_else(|| {
                    invalid(format!(
                        "{path}.protocol: {p:?} is not a supported protocol; use {}",
                        Protocol::NAMES
                    ))
                })?,
            };
            // As in Cilium: a port left out, or "0", is every port.
            let port = raw
                .port
                .as_ref()
                .map(|p| port_number(&format!("{path}.port"), p))
                .transpose()?
                .unwrap_or(0);
            if protocol == Protocol::Icmp && port != 0 {
                return Err(invalid(format!("{path}.port: ICMP has no ports; leave port out")));
            }
            let end_port = raw
                .end_port
                .as_ref()
                .map(|p| port_number(&format!("{path}.endPort"), p))
                .transpose()?;
            if let Some(end) = end_port {
                if port == 0 || protocol == Protocol::Icmp {
                    return Err(invalid(format!(
                        "{path}.endPort: a range needs a start port (port) and a protocol with ports"
                    )));
                }
                if end < port {
                    return Err(invalid(format!("{path}.endPort: {end} is below port {port}")));
                }
            }
            out.push(PortProtocol {
                port,
                end_port,
                protocol,
            });
        }
    }
    Ok(out)
}

fn port_number(path: &str, value: &crd::PortValue) -> Result<u16, InvalidSpec> {
    let (parsed, shown) = match value {
        crd::PortValue::Text(s) => (s.parse::<u16>().ok(), format!("{s:?}")),
        crd::PortValue::Number(n) => (u16::try_from(*n).ok(), n.to_string()),
    };
    parsed.ok_or_else(|| {
        invalid(format!(
            "{path}: {shown} is not a port number (0-65535, 0 meaning every port; named ports are not supported)"
        ))
    })
}

/// A label selector key in its stored form: `k8s:` (or `any:`) dropped.
fn selector_key(path: &str, key: &str) -> Result<String, InvalidSpec> {
    let plain = key
        .strip_prefix("k8s:")
        .or_else(|| key.strip_prefix("any:"))
        .unwrap_or(key);
    if plain.starts_with("reserved:") || key.starts_with("reserved:") {
        return Err(invalid(format!(
            "{path}: {key:?}: reserved identities are selected with fromEntities/toEntities ({})",
            Entity::NAMES
        )));
    }
    if plain.starts_with(CILIUM_LABELS_PREFIX) {
        return Err(invalid(format!(
            "{path}: {key:?} is Cilium's spelling, which no Keyway identity carries; use \
             k8s:{SERVICE_ACCOUNT_LABEL} for the service account and k8s:{NAMESPACE_LABELS_PREFIX}<key> for \
             namespace labels"
        )));
    }
    if plain.is_empty() || plain.contains(':') || plain.len() > 317 {
        return Err(invalid(format!(
            "{path}: {key:?} is not a label key (use KEY, k8s:KEY, k8s:{NAMESPACE_LABEL} or k8s:{SERVICE_ACCOUNT_LABEL})"
        )));
    }
    Ok(plain.to_owned())
}

fn selector(path: &str, raw: &crd::LabelSelector) -> Result<Selector, InvalidSpec> {
    let mut match_labels = BTreeMap::new();
    for (k, v) in raw.match_labels.iter().flatten() {
        let key = selector_key(&format!("{path}.matchLabels"), k)?;
        if let Some(previous) = match_labels.insert(key.clone(), v.clone())
            && previous != *v
        {
            return Err(invalid(format!(
                "{path}.matchLabels: {key:?} is given twice with different values"
            )));
        }
    }
    let mut match_expressions = Vec::new();
    for (i, raw) in raw.match_expressions.iter().flatten().enumerate() {
        let path = format!("{path}.matchExpressions[{i}]");
        let key = selector_key(&format!("{path}.key"), &raw.key)?;
        let operator = match raw.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(invalid(format!(
                    "{path}.operator: {other:?} is not an operator; use In, NotIn, Exists or DoesNotExist"
                )));
            }
        };
        let mut values = raw.values.clone().unwrap_or_default();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(invalid(format!(
                    "{path}.values: {} needs at least one value",
                    raw.operator
                )));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(invalid(format!(
                    "{path}.values: {} takes no values",
                    raw.operator
                )));
            }
            _ => {}
        }
        values.sort();
        values.dedup();
        match_expressions.push(Requirement {
            key,
            operator,
            values,
        });
    }
    Ok(Selector {
        match_labels,
        match_expressions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KeywayNetworkPolicy as the API server sends it (JSON, `port` a
    /// string) validates to what the same standalone document gives.
    #[test]
    fn an_object_from_the_api_server_validates_like_the_same_document() {
        let object: crd::KeywayNetworkPolicySpec = serde_json::from_value(serde_json::json!({
            "endpointSelector": { "matchLabels": { "app": "api" } },
            "ingress": [{
                "authentication": { "mode": "required" },
                "fromEndpoints": [{ "matchLabels": { "k8s:app": "frontend" } }],
                "toPorts": [{ "ports": [{ "port": "8080", "protocol": "TCP" }] }],
            }],
        }))
        .unwrap();
        let from_object = PolicySpec::try_from(&object).unwrap();
        let document = crate::documents::policy_spec(
            serde_yaml::from_str(
                r#"
endpointSelector: { matchLabels: { app: api } }
ingress:
  - authentication: { mode: required }
    fromEndpoints: [{ matchLabels: { "k8s:app": frontend } }]
    toPorts: [{ ports: [{ port: 8080, protocol: TCP }] }]
"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(from_object, document);
        assert_eq!(from_object.ingress.as_ref().map(Vec::len), Some(1));
        assert!(
            from_object.egress.is_none(),
            "an absent egress list must stay absent"
        );
        // An object's refusal names the field the same way.
        let mut bad = object;
        bad.ingress.as_mut().unwrap()[0].to_ports.as_mut().unwrap()[0].ports[0].port =
            Some(crd::PortValue::Text("http".into()));
        assert_eq!(
            PolicySpec::try_from(&bad).unwrap_err().to_string(),
            "spec.ingress[0].toPorts[0].ports[0].port: \"http\" is not a port number (0-65535, 0 meaning every \
             port; named ports are not supported)"
        );
    }
}
