//! SPIFFE ID validation that names the rule it enforces.
//!
//! The `spiffe` crate parses IDs but lowercases upper-case trust domains
//! (conformance note ID-15); Keyway issues only canonical IDs, so it checks the
//! strict rules first and then builds the `spiffe` crate's types.

use spiffe::{SpiffeId, TrustDomain};

/// Longest SPIFFE ID Keyway will issue, in bytes (ID-13/ID-14).
pub const MAX_ID_BYTES: usize = 2048;
/// Longest trust domain name, in bytes (ID-14, the RFC 3986 host limit).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// Why a string is not a SPIFFE ID Keyway will accept. Each message names the
/// conformance rule (shared/design/spiffe-conformance.md) so an operator can look
/// it up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid SPIFFE ID {id:?}: the scheme must be \"spiffe://\" (rule ID-01)")]
    Scheme { id: String },
    #[error("invalid SPIFFE ID {id:?}: the trust domain is empty (rule ID-02)")]
    EmptyTrustDomain { id: String },
    #[error("invalid SPIFFE ID {id:?}: query and fragment components are not allowed (rule ID-03)")]
    QueryOrFragment { id: String },
    #[error("invalid SPIFFE ID {id:?}: user info and port are not allowed in the trust domain (rule ID-04)")]
    UserinfoOrPort { id: String },
    #[error("invalid SPIFFE ID {id:?}: the trust domain must be lower case (rule ID-05)")]
    UpperCaseTrustDomain { id: String },
    #[error("invalid SPIFFE ID {id:?}: the trust domain may only contain a-z 0-9 . _ - (rule ID-06)")]
    TrustDomainChar { id: String },
    #[error("invalid SPIFFE ID {id:?}: percent-encoded characters are not allowed (rules ID-07, ID-09)")]
    PercentEncoded { id: String },
    #[error("invalid SPIFFE ID {id:?}: the path has an empty segment (rule ID-10)")]
    EmptySegment { id: String },
    #[error("invalid SPIFFE ID {id:?}: the path has a '.' or '..' segment (rule ID-10)")]
    DotSegment { id: String },
    #[error("invalid SPIFFE ID {id:?}: the path ends with '/' (rule ID-11)")]
    TrailingSlash { id: String },
    #[error("invalid SPIFFE ID {id:?}: path segments may only contain a-z A-Z 0-9 . _ - (rule ID-12)")]
    PathChar { id: String },
    #[error("invalid SPIFFE ID: longer than {MAX_ID_BYTES} bytes (rule ID-14)")]
    TooLong,
    #[error("invalid trust domain {td:?}: longer than {MAX_TRUST_DOMAIN_BYTES} bytes (rule ID-14)")]
    TrustDomainTooLong { td: String },
    #[error(
        "invalid SPIFFE ID {id:?}: an SVID needs a path; the bare trust domain names the CA (rule X5-03)"
    )]
    NoPath { id: String },
    #[error("SPIFFE ID {id:?} is outside the trust domain {td:?} this control plane issues for")]
    OutsideTrustDomain { id: String, td: String },
    #[error("invalid {what} {value:?}: {reason}")]
    Component {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The longest piece of caller input an error message repeats back.
pub const ECHO_MAX_CHARS: usize = 64;

/// What an error may repeat of untrusted input: at most [`ECHO_MAX_CHARS`]
/// characters, then how long the rest was. Refusals are logged and returned
/// to the caller, so echoing a 64 KiB name whole would let every cheap bad
/// request cost the server its size several times over in memory and logs.
pub fn echo(input: &str) -> String {
    match input.char_indices().nth(ECHO_MAX_CHARS) {
        None => input.to_owned(),
        Some((cut, _)) => format!("{}...({} more bytes)", &input[..cut], input.len() - cut),
    }
}

/// Parses a trust domain name (`cluster.local`, not `spiffe://cluster.local`).
pub fn parse_trust_domain(name: &str) -> Result<TrustDomain, IdError> {
    let id = format!("spiffe://{name}");
    if name.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(IdError::TrustDomainTooLong { td: echo(name) });
    }
    check_trust_domain(&id, name)?;
    TrustDomain::new(name).map_err(|_| IdError::TrustDomainChar { id })
}

fn check_trust_domain(id: &str, td: &str) -> Result<(), IdError> {
    let owned = || echo(id);
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain { id: owned() });
    }
    if td.contains('@') || td.contains(':') {
        return Err(IdError::UserinfoOrPort { id: owned() });
    }
    if td.contains('%') {
        return Err(IdError::PercentEncoded { id: owned() });
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::UpperCaseTrustDomain { id: owned() });
    }
    // ID-08: one character rule for names and IP addresses alike.
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdError::TrustDomainChar { id: owned() });
    }
    Ok(())
}

/// Parses a SPIFFE ID strictly (ID-01..ID-14). The bare trust domain
/// (`spiffe://td`) is accepted here; [`parse_svid_id`] refuses it.
pub fn parse_spiffe_id(id: &str) -> Result<SpiffeId, IdError> {
    let owned = || echo(id);
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong);
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdError::Scheme { id: owned() })?;
    if id.contains('?') || id.contains('#') {
        return Err(IdError::QueryOrFragment { id: owned() });
    }
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(IdError::TrustDomainTooLong { td: echo(td) });
    }
    check_trust_domain(id, td)?;
    if !path.is_empty() {
        if path.contains('%') {
            return Err(IdError::PercentEncoded { id: owned() });
        }
        if path.ends_with('/') {
            return Err(IdError::TrailingSlash { id: owned() });
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => return Err(IdError::EmptySegment { id: owned() }),
                "." | ".." => return Err(IdError::DotSegment { id: owned() }),
                s if !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
                {
                    return Err(IdError::PathChar { id: owned() });
                }
                _ => {}
            }
        }
    }
    // The strict checks above are a superset of the crate's; a failure here
    // would be a disagreement between the two, reported as the generic rule.
    SpiffeId::new(id).map_err(|_| IdError::PathChar { id: owned() })
}

/// Parses a SPIFFE ID that an X509- or JWT-SVID may carry: strict, with a path
/// (X5-03).
pub fn parse_svid_id(id: &str) -> Result<SpiffeId, IdError> {
    let parsed = parse_spiffe_id(id)?;
    if parsed.path().is_empty() {
        return Err(IdError::NoPath { id: echo(id) });
    }
    Ok(parsed)
}

/// Parses an SVID SPIFFE ID and requires it to belong to `td`.
pub fn parse_svid_id_in(id: &str, td: &TrustDomain) -> Result<SpiffeId, IdError> {
    let parsed = parse_svid_id(id)?;
    if !parsed.is_member_of(td) {
        return Err(IdError::OutsideTrustDomain {
            id: echo(id),
            td: td.to_string(),
        });
    }
    Ok(parsed)
}

/// Checks a name that becomes a path segment (namespace, service account, node).
/// Kubernetes names are DNS labels or subdomains, a subset of ID-12.
pub fn check_name(what: &'static str, value: &str) -> Result<(), IdError> {
    let err = |reason| IdError::Component {
        what,
        value: echo(value),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > 253 {
        return Err(err("must be at most 253 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    {
        return Err(err(
            "must consist of lower-case letters, digits, '-' and '.' (a Kubernetes name)",
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !value.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(err("must start and end with a letter or digit"));
    }
    if value.split('.').any(|s| s.is_empty()) {
        return Err(err("must not contain empty '.'-separated parts"));
    }
    Ok(())
}

/// `spiffe://TD/ns/NAMESPACE/sa/SERVICEACCOUNT`, the workload identity.
pub fn workload_id(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<SpiffeId, IdError> {
    check_name("namespace", namespace)?;
    check_name("service account", service_account)?;
    parse_svid_id(&format!("spiffe://{td}/ns/{namespace}/sa/{service_account}"))
}

/// `spiffe://TD/keyway/node/NAME`, a node agent's identity.
pub fn node_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, IdError> {
    check_name("node name", node)?;
    parse_svid_id(&format!("spiffe://{td}/keyway/node/{node}"))
}

/// `spiffe://TD/keyway/control-plane`, the control plane's serving identity.
pub fn control_plane_id(td: &TrustDomain) -> SpiffeId {
    // A fixed, valid path under an already valid trust domain cannot fail.
    SpiffeId::new(format!("spiffe://{td}/keyway/control-plane"))
        .unwrap_or_else(|_| unreachable!("control-plane id is always valid"))
}

/// If `id` names a node agent of `td`, the node's name.
pub fn node_name_of<'a>(id: &'a SpiffeId, td: &TrustDomain) -> Option<&'a str> {
    if !id.is_member_of(td) {
        return None;
    }
    id.path()
        .strip_prefix("/keyway/node/")
        .filter(|n| !n.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_echo_a_bounded_prefix_of_the_input() {
        let long = "x".repeat(60_000);
        let e = check_name("node name", &long).unwrap_err().to_string();
        assert!(e.len() < 200, "{} bytes", e.len());
        assert!(e.contains("(59936 more bytes)"), "{e}");
        let id = format!("spiffe://td/{}", "%".repeat(1000));
        assert!(parse_spiffe_id(&id).unwrap_err().to_string().len() < 200);
        assert_eq!(echo("short"), "short");
        // Cut on a character boundary.
        assert!(echo(&"é".repeat(100)).starts_with(&"é".repeat(64)));
    }

    fn rule(id: &str) -> String {
        parse_svid_id(id).expect_err(id).to_string()
    }

    #[test]
    fn id01_scheme_must_be_spiffe() {
        assert!(rule("http://td/a").contains("ID-01"));
        assert!(rule("Spiffe://td/a").contains("ID-01"));
    }

    #[test]
    fn id02_trust_domain_not_empty() {
        assert!(rule("spiffe:///a").contains("ID-02"));
    }

    #[test]
    fn id03_no_query_or_fragment() {
        assert!(rule("spiffe://td/a?x=1").contains("ID-03"));
        assert!(rule("spiffe://td/a#f").contains("ID-03"));
    }

    #[test]
    fn id04_no_userinfo_or_port() {
        assert!(rule("spiffe://u@td/a").contains("ID-04"));
        assert!(rule("spiffe://td:8080/a").contains("ID-04"));
    }

    #[test]
    fn id05_id06_trust_domain_lower_case_and_charset() {
        assert!(rule("spiffe://Example.org/a").contains("ID-05"));
        assert!(rule("spiffe://exa$mple/a").contains("ID-06"));
        assert!(rule("spiffe://[fe80]/a").contains("ID-06"));
        assert!(
            rule("spiffe://[::1]/a").contains("ID-04"),
            "IPv6 literals are excluded"
        );
        // ID-08: an IPv4 literal is just another name.
        assert!(parse_svid_id("spiffe://10.0.0.1/a").is_ok());
    }

    #[test]
    fn id07_id09_no_percent_encoding() {
        assert!(rule("spiffe://t%64/a").contains("ID-07"));
        assert!(rule("spiffe://td/a%20b").contains("ID-09"));
    }

    #[test]
    fn id10_id11_id12_path_rules() {
        assert!(rule("spiffe://td/a//b").contains("ID-10"));
        assert!(rule("spiffe://td/a/./b").contains("ID-10"));
        assert!(rule("spiffe://td/a/../b").contains("ID-10"));
        assert!(rule("spiffe://td/a/").contains("ID-11"));
        assert!(rule("spiffe://td/").contains("ID-11"));
        assert!(rule("spiffe://td/a b").contains("ID-12"));
        assert!(rule("spiffe://td/ä").contains("ID-12"));
        assert!(parse_svid_id("spiffe://td/Mixed.Case_ok-1").is_ok());
    }

    #[test]
    fn id13_id14_length_limits() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_BYTES));
        assert!(rule(&long).contains("ID-14"));
        let exact = format!("spiffe://td/{}", "a".repeat(MAX_ID_BYTES - "spiffe://td/".len()));
        assert!(
            parse_svid_id(&exact).is_ok(),
            "2048 bytes must be accepted (ID-13)"
        );
        let td = "a".repeat(256);
        assert!(rule(&format!("spiffe://{td}/x")).contains("ID-14"));
    }

    #[test]
    fn x5_03_leaf_needs_a_path() {
        assert!(rule("spiffe://td").contains("X5-03"));
        assert!(parse_spiffe_id("spiffe://td").is_ok());
    }

    #[test]
    fn outside_trust_domain_is_named() {
        let td = parse_trust_domain("cluster.local").unwrap();
        let err = parse_svid_id_in("spiffe://other.org/ns/a/sa/b", &td).unwrap_err();
        assert!(err.to_string().contains("outside the trust domain"), "{err}");
    }

    #[test]
    fn builders_make_canonical_ids() {
        let td = parse_trust_domain("cluster.local").unwrap();
        assert_eq!(
            workload_id(&td, "default", "api").unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/api"
        );
        let node = node_id(&td, "node-a").unwrap();
        assert_eq!(node.to_string(), "spiffe://cluster.local/keyway/node/node-a");
        assert_eq!(node_name_of(&node, &td), Some("node-a"));
        assert!(workload_id(&td, "Default", "api").is_err());
        assert!(workload_id(&td, "default", "").is_err());
        assert!(node_id(&td, "node_a").is_err());
    }
}
