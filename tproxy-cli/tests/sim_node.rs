//! A simulated node (lab/src/cni.rs): pods wired by the reference CNI
//! plugins with tproxy-cni chained after them, exactly as a runtime does,
//! served by one `tproxy agent`.
use std::path::Path;

use serde_json::json;
use tproxy_lab::cni::SimNode;

const CNI: &str = env!("CARGO_BIN_EXE_tproxy-cni");

/// The simulated node itself: pods get dual-stack addresses on the
/// bridge, reach each other and are reached from outside the node; DEL
/// takes their interfaces away. (tproxy-cni is told to leave these pods
/// alone: no agent needed.)
#[test]
fn pods_on_the_simulated_node_reach_each_other_and_the_outside() {
    let node = SimNode::new(
        Path::new(CNI),
        Path::new("/nonexistent/agent.sock"),
        json!({"ports": "8000", "enabled": false}),
    )
    .unwrap();
    let mut a = node.add_pod("a", json!({})).unwrap();
    let b = node.add_pod("b", json!({})).unwrap();
    assert_ne!(a.ip4, b.ip4);
    for ip in [b.ip4.to_string(), b.ip6.to_string()] {
        a.ns.exec("ping", &["-c1", "-W2", &ip]).unwrap();
        node.outside.exec("ping", &["-c1", "-W2", &ip]).unwrap();
    }
    node.del_pod(&mut a).unwrap();
    assert!(a.ns.ip(&["link", "show", "eth0"]).is_err(), "eth0 gone");
    assert!(
        node.outside
            .exec("ping", &["-c1", "-W1", &a.ip4.to_string()])
            .is_err()
    );
}
