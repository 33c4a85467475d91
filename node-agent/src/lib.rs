//! The Keyway node agent. This crate grows per DESIGN.md section 5: so far it
//! holds the control-plane client (`control_plane`); the Workload API, SVID
//! rotation, mutual authentication and the datapath loader come next.

pub mod control_plane;
