//! Whose sockets the socket hooks rewrite (issue #10): by default every process of the
//! served cgroup in every network namespace; with `--local-clients host-netns` only the
//! daemon's namespace, and a namespace on the same host that reaches the host's address
//! but has no route to the backends (a VPN or test namespace) is served by the packet
//! path, as a remote client is.
//!
//! The "remote-like" namespace is the topology's client namespace with its default route
//! removed (it reaches 198.18.0.1, not the containers), its client process put in the
//! daemon's cgroup.

use portfwd_tests::{
    require_root,
    topology::{backend, body, Topology, HOST_IP},
};

#[test]
fn host_netns_only_leaves_other_namespaces_to_the_packet_path() {
    let test = "host_netns_only_leaves_other_namespaces_to_the_packet_path";
    if !require_root(test) {
        return;
    }
    let mut topo = Topology::new("lsc");
    topo.client.ip("route del default");
    let published = format!("{HOST_IP}:9000");

    // Default: the client's connect in the cgroup is rewritten to a backend it has no
    // route to, and fails at once.
    topo.start_daemon("tc");
    topo.daemon().add("9000", &backend(0));
    let (ok, v) = topo.testcli(&topo.client, true, &["tcp", &published]);
    assert!(!ok, "rewritten to an unroutable backend: {v}");
    assert!(
        v.to_string().to_lowercase().contains("unreachable"),
        "ENETUNREACH expected: {v}"
    );
    // The rules outlive a daemon (pinned and saved): unpublish, so that the next daemon
    // starts from nothing and publishes the same rule under the other option.
    topo.daemon().del("9000");
    drop(topo.take_daemon());

    // --local-clients host-netns: the same client goes by packet and is served; the
    // host's own processes still are, at the socket.
    topo.start_daemon_with(&["--ingress", "tc", "--local-clients", "host-netns"]);
    topo.daemon().add("9000", &backend(0));
    let (ok, v) = topo.testcli(&topo.client, true, &["tcp", &published]);
    assert!(ok, "served by the packet path: {v}");
    assert_eq!(v["body"], body(0), "{v}");
    let rule = topo.daemon().rule(9000, "tcp");
    assert!(rule.packets > 0, "translated at ingress: {rule:?}");
    assert_eq!(rule.local, 0, "not at the socket: {rule:?}");
    topo.local_get(&topo.host, "127.0.0.1:9000", 0);
    topo.local_get(&topo.host, &published, 0);
    let rule = topo.daemon().rule(9000, "tcp");
    assert_eq!(rule.local, 2, "the host's two local GETs: {rule:?}");
}
