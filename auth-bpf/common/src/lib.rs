//! Types the kernel programs and user space both see. `no_std` so the eBPF
//! programs can use them; every map key and value here is `#[repr(C)]` with
//! explicit padding so the kernel and user space agree on every byte.
#![no_std]

/// Numeric security identities as the datapath sees them (DESIGN.md section 2).
///
/// The control plane allocates user identities from [`identity::FIRST_USER`];
/// the reserved ones below it never map to a workload.
pub mod identity {
    /// No identity known for the address.
    pub const UNKNOWN: u32 = 0;
    /// The node itself (host network namespace).
    pub const HOST: u32 = 1;
    /// Anything outside the cluster.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = 3;
    /// The Keyway control plane.
    pub const CONTROL_PLANE: u32 = 4;
    /// The first identity the control plane hands to workloads.
    pub const FIRST_USER: u32 = 256;

    /// True for identities that name a class of peer, not a workload.
    pub const fn is_reserved(id: u32) -> bool {
        id < FIRST_USER
    }
}

#[cfg(test)]
mod tests {
    use super::identity;

    #[test]
    fn reserved_identities_are_below_user_range() {
        for id in [
            identity::UNKNOWN,
            identity::HOST,
            identity::WORLD,
            identity::REMOTE_NODE,
            identity::CONTROL_PLANE,
        ] {
            assert!(identity::is_reserved(id));
        }
        assert!(!identity::is_reserved(identity::FIRST_USER));
    }
}
