//! The tproxy back-end's policy routing leaves the namespace's own routing
//! alone: reserved tables, tables in use and marks in use are refused before
//! anything is installed, defaults never collide, and teardown (SIGTERM, or
//! the next start after SIGKILL) removes exactly the rules and routes tproxy
//! added. Root only; each test makes its own namespace and child cgroup.
mod common;

use std::{path::PathBuf, process::ExitStatus, time::Duration};

use common::BIN;
use tproxy_lab::{Cgroup, Logged, Netns, Tproxy, kernel};

/// ifindex of `eth0` in every sandbox, so the default mark is known:
/// 0x7400 + ifindex.
const ETH0_INDEX: u32 = 10;
const ETH0_MARK: u32 = 0x7400 + ETH0_INDEX;

/// A namespace with veth interfaces (by name and ifindex), addresses and
/// routes in the main table (so a wiped table shows), and a child cgroup.
struct Sandbox {
    cgroup: Cgroup,
    ns: Netns,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox::with_links(&[("eth0", ETH0_INDEX)])
    }

    fn with_links(links: &[(&str, u32)]) -> Sandbox {
        let common::sandbox::Sandbox { cgroup, ns } =
            common::sandbox::Sandbox::with("tpx-rs-", |ns| {
                for (i, (link, index)) in links.iter().enumerate() {
                    let index = index.to_string();
                    // veth, not dummy: this kernel has no dummy driver. The
                    // peer stays in the namespace.
                    let peer = format!("{link}p");
                    ns.ip(&[
                        "link", "add", link, "index", &index, "type", "veth", "peer", "name", &peer,
                    ])
                    .unwrap();
                    ns.ip(&["link", "set", link, "up"]).unwrap();
                    ns.ip(&["link", "set", &peer, "up"]).unwrap();
                    let v4 = format!("10.77.{i}.1/24");
                    let v6 = format!("fd77:{i}::1/64");
                    ns.ip(&["addr", "add", &v4, "dev", link]).unwrap();
                    ns.ip(&["-6", "addr", "add", &v6, "dev", link, "nodad"])
                        .unwrap();
                }
                let first = links[0].0;
                ns.ip(&["route", "add", "10.78.0.0/24", "via", "10.77.0.2"])
                    .unwrap();
                ns.ip(&["route", "add", "default", "dev", first]).unwrap();
                ns.ip(&["-6", "route", "add", "default", "dev", first])
                    .unwrap();
            });
        Sandbox { cgroup, ns }
    }

    /// Every rule, route (all tables, both families), nftables object and
    /// tc qdisc of the namespace.
    fn routing(&self) -> String {
        let ip = |args: &[&str]| self.ns.ip(args).unwrap();
        [
            ip(&["rule", "show"]),
            ip(&["-6", "rule", "show"]),
            ip(&["route", "show", "table", "all"]),
            ip(&["-6", "route", "show", "table", "all"]),
            self.ns.exec("nft", &["list", "ruleset"]).unwrap(),
            self.ns.exec("tc", &["qdisc", "show"]).unwrap(),
        ]
        .join("\n--\n")
    }

    fn args<'a>(&'a self, cg: &'a str, iface: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "-i", iface, "-ports", "8000", "--cgroup", cg, "--steer", "tproxy",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Starts tproxy --steer tproxy on `iface` and waits until it serves.
    fn start(&self, iface: &str, extra: &[&str]) -> Tproxy {
        let cg = self.cgroup.path().display().to_string();
        Tproxy::start(BIN, &self.ns, None, &self.args(&cg, iface, extra)).unwrap()
    }

    /// Runs tproxy --steer tproxy on eth0 with `extra`; it must exit 1 with
    /// exactly one line containing `needle` and leave the namespace as it
    /// was.
    fn refused(&self, extra: &[&str], needle: &str) {
        let before = self.routing();
        let lines = self.start_refused(extra, needle);
        assert_eq!(lines.len(), 1, "{extra:?}: expected one line: {lines:#?}");
        assert_eq!(self.routing(), before, "{extra:?} changed the routing");
        assert_eq!(kernel::cgroup_programs(self.cgroup.path()).unwrap(), vec![]);
        assert!(!record_path(&self.ns, "eth0").exists());
    }

    /// Runs tproxy --steer tproxy on eth0 with `extra`; it must exit 1 with
    /// one error line, its last, containing `needle` (before it, warnings
    /// may say what it cleaned up). Returns every line. If it starts
    /// instead, the namespace's routing and nftables (before, while it ran,
    /// after its SIGTERM teardown) are in the panic message.
    fn start_refused(&self, extra: &[&str], needle: &str) -> Vec<String> {
        let before = self.routing();
        let cg = self.cgroup.path().display().to_string();
        let mut cmd = self.ns.command(BIN);
        cmd.args(self.args(&cg, "eth0", extra));
        let mut t = Logged::spawn("tproxy", &mut cmd).unwrap();
        // (Refused at once; the rest of the time is for a busy machine.)
        let status: ExitStatus = match t.wait_timeout(Duration::from_secs(120)) {
            Ok(st) => st,
            Err(_) => {
                let during = self.routing();
                let (_, log) = t.terminate().unwrap();
                panic!(
                    "{extra:?} was not refused: tproxy started.\nbefore:\n{before}\nwhile it ran:\n{during}\nafter its SIGTERM teardown:\n{}\nlog:\n{log}",
                    self.routing()
                );
            }
        };
        let lines: Vec<String> = t
            .lines()
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(status.code(), Some(1), "{extra:?}: {lines:?}");
        let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("tproxy: ")).collect();
        assert_eq!(errors.len(), 1, "{extra:?}: expected one error: {lines:#?}");
        assert!(
            lines.last() == Some(errors[0]) && errors[0].contains(needle),
            "{extra:?}: {lines:#?} does not end with an error mentioning {needle:?}"
        );
        lines
    }
}

fn record_path(ns: &Netns, iface: &str) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    PathBuf::from(format!("/run/tproxy/{ino}-{iface}.json"))
}

/// (mark, table) the instance on `iface` recorded.
fn mark_and_table(ns: &Netns, iface: &str) -> (u32, u32) {
    let s = std::fs::read_to_string(record_path(ns, iface)).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&s).unwrap();
    let spec = &rec["tproxy"];
    (
        spec["mark"].as_u64().unwrap() as u32,
        spec["table"].as_u64().unwrap() as u32,
    )
}

/// How many rules (both families) send `mark` to `table`, and how many
/// routes (both families) `table` holds.
fn rules_and_routes(ns: &Netns, mark: u32, table: u32) -> (usize, usize) {
    let rule = format!("fwmark {mark:#x} lookup {table}");
    let rules = [ns.ip(&["rule", "show"]), ns.ip(&["-6", "rule", "show"])]
        .into_iter()
        .map(|r| r.unwrap().matches(&rule).count())
        .sum();
    let t = table.to_string();
    let routes = [
        ns.ip(&["route", "show", "table", &t]),
        ns.ip(&["-6", "route", "show", "table", &t]),
    ]
    .into_iter()
    .map(|r| r.unwrap().lines().count())
    .sum();
    (rules, routes)
}

fn stop(t: Tproxy) {
    let (st, log) = t.terminate().unwrap();
    assert!(st.success(), "exit {st}; log:\n{log}");
}

#[test]
fn reserved_tables_are_refused_and_the_main_table_is_untouched() {
    for table in ["254", "255", "0"] {
        let sb = Sandbox::new();
        sb.refused(&["--route-table", table], "reserved");
    }
}

#[test]
fn a_table_holding_a_foreign_route_is_refused() {
    let sb = Sandbox::new();
    sb.ns
        .ip(&["route", "add", "10.5.0.0/24", "dev", "eth0", "table", "100"])
        .unwrap();
    sb.refused(&["--route-table", "100"], "table 100");
    // An IPv6 route alone makes a table used too.
    sb.ns
        .ip(&[
            "-6",
            "route",
            "add",
            "fd99::/64",
            "dev",
            "eth0",
            "table",
            "101",
        ])
        .unwrap();
    sb.refused(&["--route-table", "101"], "table 101");
}

#[test]
fn a_table_referenced_by_a_foreign_rule_is_refused() {
    let sb = Sandbox::new();
    sb.ns
        .ip(&["rule", "add", "from", "10.9.0.0/16", "lookup", "200"])
        .unwrap();
    sb.refused(&["--route-table", "200"], "table 200");
    sb.ns
        .ip(&["-6", "rule", "add", "to", "fd00::/8", "lookup", "201"])
        .unwrap();
    sb.refused(&["--route-table", "201"], "table 201");
}

#[test]
fn an_explicit_steer_mark_used_by_a_foreign_rule_is_refused() {
    let sb = Sandbox::new();
    sb.ns
        .ip(&["rule", "add", "fwmark", "0x99", "lookup", "300"])
        .unwrap();
    sb.refused(&["--steer-mark", "0x99"], "0x99");
    // A masked rule that matches the mark takes it as well.
    sb.ns
        .ip(&[
            "-6",
            "rule",
            "add",
            "fwmark",
            "0x1000/0xf000",
            "lookup",
            "301",
        ])
        .unwrap();
    sb.refused(&["--steer-mark", "0x1234"], "0x1234");
}

/// Defaults that are taken move on to free ones instead of sharing: the
/// default mark (matched by a foreign rule) and the default table (holding
/// a foreign route).
#[test]
fn taken_defaults_move_to_free_ones() {
    let sb = Sandbox::new();
    let m = format!("{ETH0_MARK:#x}");
    let next = (ETH0_MARK + 1).to_string();
    sb.ns
        .ip(&["rule", "add", "fwmark", &m, "lookup", "400"])
        .unwrap();
    // The mark moves to ETH0_MARK + 1, whose table holds a foreign route.
    sb.ns
        .ip(&["route", "add", "10.6.0.0/24", "dev", "eth0", "table", &next])
        .unwrap();
    let before = sb.routing();
    let t = sb.start("eth0", &[]);
    let (mark, table) = mark_and_table(&sb.ns, "eth0");
    assert_eq!(mark, ETH0_MARK + 1);
    assert_eq!(table, ETH0_MARK + 2);
    assert_eq!(rules_and_routes(&sb.ns, mark, table), (2, 2));
    stop(t);
    assert_eq!(sb.routing(), before);
}

/// A route and rules someone adds to tproxy's table while it runs are not
/// tproxy's: its SIGTERM teardown leaves them.
#[test]
fn foreign_routes_and_rules_in_tproxys_table_survive_its_teardown() {
    let sb = Sandbox::new();
    let before = sb.routing();
    let t = sb.start("eth0", &[]);
    let (mark, table) = mark_and_table(&sb.ns, "eth0");
    assert_eq!((mark, table), (ETH0_MARK, ETH0_MARK));
    let (m, tb) = (format!("{mark:#x}"), table.to_string());
    // Each as close to one of tproxy's own as possible.
    let foreign: [&[&str]; 6] = [
        &["route", "add", "10.66.0.0/24", "dev", "eth0", "table", &tb],
        &[
            "route",
            "add",
            "local",
            "10.67.0.0/24",
            "dev",
            "lo",
            "table",
            &tb,
        ],
        &[
            "-6", "route", "add", "local", "default", "dev", "lo", "table", &tb, "metric", "7",
        ],
        &[
            "rule",
            "add",
            "from",
            "10.66.0.0/24",
            "lookup",
            &tb,
            "priority",
            "9000",
        ],
        &[
            "rule", "add", "fwmark", &m, "lookup", &tb, "priority", "9001",
        ],
        &[
            "-6", "rule", "add", "fwmark", &m, "iif", "eth0", "lookup", &tb, "priority", "9000",
        ],
    ];
    for f in foreign {
        sb.ns.ip(f).unwrap();
    }
    stop(t);
    let after = sb.routing();
    assert!(!after.contains("tproxy_eth0"), "{after}");
    // Each foreign object is still there (deleting it succeeds) and then
    // the namespace is as it was: tproxy's own objects went, nothing else.
    for f in foreign {
        let del: Vec<&str> = f
            .iter()
            .map(|&a| if a == "add" { "del" } else { a })
            .collect();
        sb.ns
            .ip(&del)
            .unwrap_or_else(|e| panic!("{f:?} did not survive: {e}\n{after}"));
    }
    assert_eq!(sb.routing(), before);
}

/// The old default, 0x7400 | (ifindex & 0xff), gave these two one mark
/// and one table.
#[test]
fn interfaces_whose_ifindexes_differ_by_256_get_their_own_mark_and_table() {
    let sb = Sandbox::with_links(&[("eth0", 5), ("eth1", 261)]);
    let before = sb.routing();
    let t0 = sb.start("eth0", &[]);
    let t1 = sb.start("eth1", &[]);
    let (m0, tb0) = mark_and_table(&sb.ns, "eth0");
    let (m1, tb1) = mark_and_table(&sb.ns, "eth1");
    assert_eq!((m0, tb0), (0x7405, 0x7405));
    assert_eq!((m1, tb1), (0x7505, 0x7505));
    // Both sets at once: one rule per family, a local default per family.
    assert_eq!(rules_and_routes(&sb.ns, m0, tb0), (2, 2));
    assert_eq!(rules_and_routes(&sb.ns, m1, tb1), (2, 2));
    let nft = sb.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(
        nft.contains("tproxy_eth0") && nft.contains("tproxy_eth1"),
        "{nft}"
    );

    stop(t0);
    assert_eq!(rules_and_routes(&sb.ns, m0, tb0), (0, 0));
    assert_eq!(rules_and_routes(&sb.ns, m1, tb1), (2, 2));
    let nft = sb.ns.exec("nft", &["list", "tables"]).unwrap();
    assert!(
        !nft.contains("tproxy_eth0") && nft.contains("tproxy_eth1"),
        "{nft}"
    );
    stop(t1);
    assert_eq!(sb.routing(), before);
}

/// After SIGKILL the next start removes exactly what the killed instance
/// installed: a route and a rule added to its table after the kill stay
/// (and, its table being used now, the new instance takes the next one).
#[test]
fn the_start_after_sigkill_removes_only_what_the_killed_instance_installed() {
    let sb = Sandbox::new();
    let before = sb.routing();
    let t = sb.start("eth0", &[]);
    let (mark, table) = mark_and_table(&sb.ns, "eth0");
    t.kill9().unwrap();
    assert_eq!(rules_and_routes(&sb.ns, mark, table), (2, 2));
    let tb = table.to_string();
    let foreign: [&[&str]; 2] = [
        &["route", "add", "10.66.0.0/24", "dev", "eth0", "table", &tb],
        &["-6", "rule", "add", "from", "fd66::/64", "lookup", &tb],
    ];
    for f in foreign {
        sb.ns.ip(f).unwrap();
    }

    let t = sb.start("eth0", &[]);
    assert!(
        t.log().contains("removed 5 routing object(s)"),
        "{}",
        t.log()
    );
    assert_eq!(rules_and_routes(&sb.ns, mark, table), (0, 1));
    let (mark2, table2) = mark_and_table(&sb.ns, "eth0");
    assert_eq!((mark2, table2), (mark, table + 1));
    assert_eq!(rules_and_routes(&sb.ns, mark2, table2), (2, 2));
    stop(t);
    for f in foreign {
        let del: Vec<&str> = f
            .iter()
            .map(|&a| if a == "add" { "del" } else { a })
            .collect();
        sb.ns.ip(&del).unwrap();
    }
    assert_eq!(sb.routing(), before);
}

/// The operator's own nftables table of the name tproxy uses on eth0, with
/// a chain and a rule of theirs.
fn add_operator_table(ns: &Netns) {
    ns.exec(
        "nft",
        &["add table inet tproxy_eth0; \
           add chain inet tproxy_eth0 input { type filter hook input priority 0; policy accept; }; \
           add rule inet tproxy_eth0 input tcp dport 2222 counter accept comment \"the operator's\""],
    )
    .unwrap();
}

/// The operator's table as nft lists it; panics if it is gone.
fn operator_table(ns: &Netns) -> String {
    let t = ns
        .exec("nft", &["list", "table", "inet", "tproxy_eth0"])
        .unwrap_or_else(|e| panic!("the operator's table is gone: {e}"));
    assert!(
        t.contains("chain input") && t.contains("tcp dport 2222") && !t.contains("prerouting"),
        "{t}"
    );
    t
}

/// An nftables table of the name tproxy would create that the operator
/// made (with a chain and a rule) is refused with one line before
/// anything is installed: tproxy neither adds to it nor, at teardown,
/// deletes it.
#[test]
fn an_operators_nft_table_of_tproxys_name_is_refused_and_left_alone() {
    let sb = Sandbox::new();
    add_operator_table(&sb.ns);
    let theirs = operator_table(&sb.ns);
    sb.refused(&[], "nftables table inet tproxy_eth0 already exists");
    assert_eq!(operator_table(&sb.ns), theirs);
}

/// Kills tproxy on eth0 and puts the operator's table in place of its
/// own (as if they had deleted tproxy's and made one of that name).
/// Returns the killed instance's (mark, table).
fn killed_then_table_replaced(sb: &Sandbox) -> (u32, u32) {
    let t = sb.start("eth0", &[]);
    let mt = mark_and_table(&sb.ns, "eth0");
    t.kill9().unwrap();
    assert_eq!(rules_and_routes(&sb.ns, mt.0, mt.1), (2, 2));
    sb.ns
        .exec("nft", &["delete", "table", "inet", "tproxy_eth0"])
        .unwrap();
    add_operator_table(&sb.ns);
    mt
}

/// `tproxy cleanup` after a SIGKILL removes the dead instance's rules,
/// routes and record, and leaves a table of its name that it did not
/// create.
#[test]
fn cleanup_leaves_an_nft_table_tproxy_did_not_create() {
    let sb = Sandbox::new();
    let before = sb.routing();
    let (mark, table) = killed_then_table_replaced(&sb);
    let theirs = operator_table(&sb.ns);
    let out = sb
        .ns
        .command(BIN)
        .args(["cleanup", "-i", "eth0"])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(operator_table(&sb.ns), theirs, "{said}");
    assert!(!said.contains("removed the nftables table"), "{said}");
    assert_eq!(rules_and_routes(&sb.ns, mark, table), (0, 0), "{said}");
    assert!(!record_path(&sb.ns, "eth0").exists(), "{said}");
    sb.ns
        .exec("nft", &["delete", "table", "inet", "tproxy_eth0"])
        .unwrap();
    assert_eq!(sb.routing(), before);
}

/// The start after a SIGKILL removes what the dead instance left but not
/// a table of its name that it did not create; that table then stops the
/// start with one line.
#[test]
fn the_start_after_sigkill_leaves_an_nft_table_tproxy_did_not_create() {
    let sb = Sandbox::new();
    let before = sb.routing();
    let (mark, table) = killed_then_table_replaced(&sb);
    let theirs = operator_table(&sb.ns);
    let lines = sb.start_refused(&[], "nftables table inet tproxy_eth0 already exists");
    assert!(
        lines[0].contains("left the nftables table inet tproxy_eth0: tproxy did not create it"),
        "{lines:#?}"
    );
    assert_eq!(operator_table(&sb.ns), theirs);
    assert_eq!(rules_and_routes(&sb.ns, mark, table), (0, 0));
    assert!(!record_path(&sb.ns, "eth0").exists());
    sb.ns
        .exec("nft", &["delete", "table", "inet", "tproxy_eth0"])
        .unwrap();
    assert_eq!(sb.routing(), before);
}
