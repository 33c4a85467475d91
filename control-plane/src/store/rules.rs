//! The store's rules, written once: pure functions over the records a change
//! touches. Each backend reads those records in its own atomic unit (a sled
//! transaction, a conditional write of `keyway-state`), applies the rule, and
//! writes what the rule returns, so the two stores cannot drift apart. The
//! contract test suite (`tests/support/store_contract.rs`) runs against both.

use super::{StoreError, StoreResult, TokenProblem};
use crate::model::{JoinTokenRecord, NodeRecord};

/// How long a join token is remembered after it expired. A token forgotten
/// after that reads "unknown token" when presented: still refused.
pub const TOKEN_RETENTION_SECS: i64 = 7 * 86400;

/// The first node id handed out.
pub const FIRST_NODE_ID: u64 = 1;

/// The first numeric identity handed out (below it: reserved identities).
pub fn first_identity() -> u64 {
    u64::from(keyway_common::identity::FIRST_USER)
}

/// Why `token` cannot attest `node` at `now`, if it cannot: the one rule
/// every store and the control plane's early check apply.
pub fn token_problem(token: Option<&JoinTokenRecord>, node: &str, now: i64) -> Option<TokenProblem> {
    let Some(token) = token else {
        return Some(TokenProblem::Unknown);
    };
    if token.consumed_at.is_some() {
        Some(TokenProblem::Consumed)
    } else if token.expires_at <= now {
        Some(TokenProblem::Expired)
    } else if token.node != node {
        Some(TokenProblem::WrongNode)
    } else {
        None
    }
}

/// The token as it is stored once `node` used it at `now`, or why it cannot
/// be used. A token is consumed once, ever.
pub fn consume_token(token: Option<JoinTokenRecord>, node: &str, now: i64) -> StoreResult<JoinTokenRecord> {
    if let Some(problem) = token_problem(token.as_ref(), node, now) {
        return Err(StoreError::TokenRefused(problem));
    }
    let mut token = token.ok_or(StoreError::TokenRefused(TokenProblem::Unknown))?;
    token.consumed_at = Some(now);
    Ok(token)
}

/// Whether a stored token is dropped at `now` (expired more than
/// [`TOKEN_RETENTION_SECS`] ago). Stores drop such tokens whenever they
/// write a token, so they do not accumulate.
pub fn token_forgotten(token: &JoinTokenRecord, now: i64) -> bool {
    token.expires_at.saturating_add(TOKEN_RETENTION_SECS) <= now
}

/// A node registration: a known node keeps its id and registration and gets
/// a new attestation time; a new one gets the next node id and
/// `registration`. Returns the record and the node-id counter after it.
pub fn register_node(
    existing: Option<NodeRecord>,
    next_node_id: u64,
    node: &str,
    now: i64,
    registration: u32,
) -> StoreResult<(NodeRecord, u64)> {
    if let Some(mut rec) = existing {
        rec.attested_at = now;
        return Ok((rec, next_node_id));
    }
    let next = next_node_id.max(FIRST_NODE_ID);
    let node_id =
        u16::try_from(next).map_err(|_| StoreError::Exhausted("all 65535 node ids are in use".into()))?;
    Ok((
        NodeRecord {
            name: node.to_owned(),
            node_id,
            attested_at: now,
            registration,
            addresses: Vec::new(),
        },
        next + 1,
    ))
}

/// Sets a node's mutual-auth addresses; whether they changed.
pub fn set_node_addresses(rec: &mut NodeRecord, addresses: &[String]) -> bool {
    if rec.addresses == addresses {
        return false;
    }
    rec.addresses = addresses.to_vec();
    true
}

/// A block of `n` numbers from the identity counter: the range and the
/// counter after it.
pub fn reserve_identities(next_identity: u64, n: u64) -> StoreResult<(std::ops::Range<u64>, u64)> {
    let start = next_identity.max(first_identity());
    let end = start
        .checked_add(n)
        .filter(|end| *end <= u64::from(u32::MAX) + 1)
        .ok_or_else(|| StoreError::Exhausted("numeric identities exhausted".into()))?;
    Ok((start..end, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(node: &str, expires_at: i64) -> JoinTokenRecord {
        JoinTokenRecord {
            node: node.into(),
            created_at: 0,
            expires_at,
            consumed_at: None,
        }
    }

    #[test]
    fn tokens_are_checked_in_order_and_consumed_once() {
        assert_eq!(token_problem(None, "a", 0), Some(TokenProblem::Unknown));
        let t = token("a", 100);
        assert_eq!(token_problem(Some(&t), "b", 10), Some(TokenProblem::WrongNode));
        assert_eq!(token_problem(Some(&t), "a", 100), Some(TokenProblem::Expired));
        let used = consume_token(Some(t), "a", 10).unwrap();
        assert_eq!(used.consumed_at, Some(10));
        // Consumed beats every other problem: a spent token says so.
        assert!(matches!(
            consume_token(Some(used), "b", 1000),
            Err(StoreError::TokenRefused(TokenProblem::Consumed))
        ));
        assert!(!token_forgotten(&token("a", 100), 100 + TOKEN_RETENTION_SECS - 1));
        assert!(token_forgotten(&token("a", 100), 100 + TOKEN_RETENTION_SECS));
    }

    #[test]
    fn nodes_keep_their_id_and_new_ones_take_the_next() {
        let (a, next) = register_node(None, 0, "a", 5, 7).unwrap();
        assert_eq!((a.node_id, a.registration, next), (1, 7, 2));
        let (again, next) = register_node(Some(a.clone()), next, "a", 9, 8).unwrap();
        assert_eq!(
            (again.node_id, again.registration, again.attested_at, next),
            (1, 7, 9, 2)
        );
        let (b, next) = register_node(None, next, "b", 9, 1).unwrap();
        assert_eq!((b.node_id, next), (2, 3));
        assert!(matches!(
            register_node(None, 65536, "c", 0, 0),
            Err(StoreError::Exhausted(_))
        ));
        let mut b = b;
        assert!(set_node_addresses(&mut b, &["10.0.0.1:4250".into()]));
        assert!(!set_node_addresses(&mut b, &["10.0.0.1:4250".into()]));
    }

    #[test]
    fn identity_blocks_start_at_256_and_stop_at_the_top() {
        let (r, next) = reserve_identities(0, 64).unwrap();
        assert_eq!((r.start, r.end, next), (256, 320, 320));
        let (r, _) = reserve_identities(next, 1).unwrap();
        assert_eq!(r.start, 320);
        assert!(reserve_identities(u64::from(u32::MAX), 2).is_err());
    }
}
