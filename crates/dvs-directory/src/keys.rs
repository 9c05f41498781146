//! The names of the keys dvs keeps in the directory, in one place so that the node kernels
//! that write them and the CLI that reads them cannot drift apart.
//!
//! - `ep/{dc}/{ep}`: the id of the node that runs endpoint `{dc, ep}`.
//! - `launch/{dc}/{ep}`: the command line (JSON) the endpoint's program was launched with.
//! - `migr/{dc}/{ep}`: the record of the endpoint's latest migration decision.
//! - `nodes/{node}`: the membership of node `{node}`, attached to the node's lease, so that it
//!   is deleted when the node stops renewing the lease (or leaves and revokes it).

use dvs_wire::{DcId, Ep, NodeId};

/// Prefix of the endpoint registrations (`ep/{dc}/{ep}` → node id).
pub const ENDPOINT_PREFIX: &str = "ep/";
/// Prefix of the launch records (`launch/{dc}/{ep}` → JSON command line).
pub const LAUNCH_PREFIX: &str = "launch/";
/// Prefix of the migration records (`migr/{dc}/{ep}` → encoded record).
pub const MIGR_PREFIX: &str = "migr/";

/// Prefix of the node memberships (`nodes/{node}` → the node's entry, attached to its lease).
pub const NODE_PREFIX: &str = "nodes/";

/// The key naming the node that runs `{dc, ep}`.
pub fn endpoint_key(dc: DcId, ep: Ep) -> String {
    format!("{ENDPOINT_PREFIX}{dc}/{ep}")
}

/// The key of the command line `{dc, ep}` was launched with.
pub fn launch_key(dc: DcId, ep: Ep) -> String {
    format!("{LAUNCH_PREFIX}{dc}/{ep}")
}

/// The key of the migration record of `{dc, ep}`.
pub fn migr_key(dc: DcId, ep: Ep) -> String {
    format!("{MIGR_PREFIX}{dc}/{ep}")
}

/// The nodes a DC spans, when an operator changed them at runtime (`dcs/{dc}`: node ids
/// separated by commas); without it, the DC spans the nodes its config names.
pub const DC_PREFIX: &str = "dcs/";

/// The key of DC `dc`'s node set.
pub fn dc_key(dc: DcId) -> String {
    format!("{DC_PREFIX}{dc}")
}

/// The DC a [`dc_key`] names; `None` for any other key.
pub fn parse_dc_key(key: &str) -> Option<DcId> {
    let dc: DcId = key.strip_prefix(DC_PREFIX)?.parse().ok()?;
    (dc_key(dc) == key).then_some(dc)
}

/// A DC's node set as [`dc_key`] stores it; `None` if the value is not one.
pub fn parse_dc_nodes(value: &str) -> Option<std::collections::BTreeSet<NodeId>> {
    if value.trim().is_empty() {
        return Some(Default::default());
    }
    value.split(',').map(|n| n.trim().parse().ok()).collect()
}

/// The value [`dc_key`] stores for `nodes`.
pub fn dc_nodes_value(nodes: &std::collections::BTreeSet<NodeId>) -> String {
    nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The membership key of node `node`, which the node writes attached to its lease.
pub fn node_key(node: NodeId) -> String {
    format!("{NODE_PREFIX}{node}")
}

/// The node a [`node_key`] names; `None` for any other key.
pub fn parse_node_key(key: &str) -> Option<NodeId> {
    let node: NodeId = key.strip_prefix(NODE_PREFIX)?.parse().ok()?;
    // `parse` also takes `+1` or `01`: only the key `node_key` makes names a node.
    (node_key(node) == key).then_some(node)
}

/// The endpoint an [`endpoint_key`] names; `None` for any other key.
pub fn parse_endpoint_key(key: &str) -> Option<(DcId, Ep)> {
    parse_under(ENDPOINT_PREFIX, key)
}

/// The endpoint a [`migr_key`] names; `None` for any other key.
pub fn parse_migr_key(key: &str) -> Option<(DcId, Ep)> {
    parse_under(MIGR_PREFIX, key)
}

fn parse_under(prefix: &str, key: &str) -> Option<(DcId, Ep)> {
    let (dc, ep) = key.strip_prefix(prefix)?.split_once('/')?;
    Some((dc.parse().ok()?, ep.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_do_not_cross() {
        assert_eq!(endpoint_key(0, 7), "ep/0/7");
        assert_eq!(launch_key(1, -2), "launch/1/-2");
        assert_eq!(migr_key(3, 4), "migr/3/4");
        assert_eq!(parse_endpoint_key(&endpoint_key(2, -5)), Some((2, -5)));
        assert_eq!(parse_migr_key(&migr_key(9, 12)), Some((9, 12)));
        // A key of one kind is not read as another, nor is a malformed one.
        assert_eq!(parse_endpoint_key(&migr_key(1, 1)), None);
        assert_eq!(parse_migr_key(&endpoint_key(1, 1)), None);
        assert_eq!(parse_endpoint_key("ep/1"), None);
        assert_eq!(parse_endpoint_key("ep/x/1"), None);
        assert_eq!(parse_endpoint_key("ep/1/1/2"), None);
        assert_eq!(node_key(7), "nodes/7");
        assert_eq!(parse_node_key(&node_key(0)), Some(0));
        assert_eq!(parse_node_key(&node_key(NodeId::MAX)), Some(NodeId::MAX));
        assert_eq!(parse_node_key(&endpoint_key(1, 1)), None);
        assert_eq!(parse_endpoint_key(&node_key(1)), None);
        for bad in [
            "nodes/",
            "nodes/x",
            "nodes/-1",
            "nodes/+1",
            "nodes/01",
            "nodes/1/2",
            "nodes/65536",
        ] {
            assert_eq!(parse_node_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn dc_node_sets_round_trip() {
        assert_eq!(dc_key(3), "dcs/3");
        assert_eq!(parse_dc_key("dcs/3"), Some(3));
        assert_eq!(parse_dc_key("dcs/03"), None);
        assert_eq!(parse_dc_key(&node_key(3)), None);
        let nodes: std::collections::BTreeSet<NodeId> = [2, 0, 5].into();
        assert_eq!(dc_nodes_value(&nodes), "0,2,5");
        assert_eq!(parse_dc_nodes("0,2,5"), Some(nodes));
        assert_eq!(parse_dc_nodes(" 1 , 2"), Some([1, 2].into()));
        assert_eq!(parse_dc_nodes(""), Some(Default::default()));
        for bad in ["x", "1,,2", "1;2", "-1", "70000"] {
            assert_eq!(parse_dc_nodes(bad), None, "{bad}");
        }
    }
}
