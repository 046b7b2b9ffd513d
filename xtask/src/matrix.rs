//! The kernel matrix: which integration tests show each feature of the
//! table (a column), what a kernel offers (probed with `tproxy check`),
//! which tests a kernel runs, and the table the runs produce.
//!
//! What runs where is decided by what the kernel has, never by its name:
//! a column whose kernel needs are missing is not run there and says so,
//! test by test, with the reason `tproxy check` gives; a column whose code
//! path the kernel changes (TCX or netlink filters, the read hook) from
//! every kernel run before it in this run (the host first, which runs
//! everything) runs its core tests; the rest run a representative or two.
//! `--depth full` runs every applicable test.
use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// What a column needs from the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Need {
    /// Every need of acceleration too.
    Accel,
    /// Nothing: the test applies to every kernel.
    Nothing,
    /// TCX links (Linux 6.6): a test of what only TCX does.
    Tcx,
    /// A real machine: a test that bounds a latency, which a guest under
    /// software emulation cannot be held to (it runs on the host).
    RealTime,
    /// A machine the test owns: it changes a machine-wide setting, so it
    /// runs only in a guest, alone, after the rest (`runs_alone`).
    OwnMachine,
}

/// Why test `name` cannot run on a kernel with `caps`, by its own need
/// (`TEST_NEEDS`).
pub fn lacked_need<'a>(caps: &'a Caps, name: &str) -> Option<&'a str> {
    TEST_NEEDS
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, need)| caps.lacks(*need))
}

/// Whether test `name` runs alone in a guest (`Need::OwnMachine`): it is
/// `#[ignore]`d on the host and changes what every other test would see.
pub fn runs_alone(name: &str) -> bool {
    TEST_NEEDS
        .iter()
        .any(|(n, need)| *n == name && matches!(need, Need::OwnMachine))
}

/// Tests that need more than their column does.
const TEST_NEEDS: &[(&str, Need)] = &[
    (
        "sigkill_with_tcx_leaves_only_the_record_and_next_start_recovers",
        Need::Tcx,
    ),
    (
        "scrapes_answer_from_a_cached_snapshot_and_the_api_stays_responsive",
        Need::RealTime,
    ),
    (
        "a_machine_short_of_tcp_memory_sends_by_tcp",
        Need::OwnMachine,
    ),
];

/// A choice the kernel makes for tproxy (which code path runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Choice {
    Tc,
    ReadHook,
}

/// A column of the table. Every column but the refusal test needs
/// acceleration: the lab runs tproxy as users do, accelerated (the
/// default), so on a kernel with steering but no read hook its tests
/// would not start; each is then listed as not applicable with the
/// reason, rather than run with `--no-accel`.
pub struct Column {
    pub key: &'static str,
    pub title: &'static str,
    pub need: Need,
    /// The kernel choices its code paths follow.
    pub follows: &'static [Choice],
    /// (test binary, test name).
    pub tests: &'static [(&'static str, &'static str)],
    /// How many leading tests run where the column's path differs from the
    /// host's, and where it does not.
    pub core: usize,
    pub rep: usize,
}

pub const COLUMNS: &[Column] = &[
    Column {
        key: "refusal",
        title: "needs probed",
        need: Need::Nothing,
        follows: &[],
        tests: &[(
            "check",
            "the_kernels_needs_decide_between_a_run_and_a_one_line_refusal",
        )],
        core: 1,
        rep: 1,
    },
    Column {
        key: "rewrite",
        title: "rewrite back-end",
        need: Need::Accel,
        follows: &[Choice::Tc],
        tests: &[
            ("ingress", "rewrite_through_our_proxy"),
            ("ingress", "rewrite_through_haproxy"),
            ("ingress", "rewrite_sigterm_leaves_host_as_before"),
            (
                "ingress",
                "rewrite_proxy_down_is_refused_on_the_dialled_port",
            ),
            ("ingress", "rewrite_through_envoy"),
            ("ingress", "rewrite_drain_completes_large_transfer"),
        ],
        core: 3,
        rep: 1,
    },
    Column {
        key: "tproxy",
        title: "tproxy back-end",
        need: Need::Accel,
        follows: &[Choice::Tc],
        tests: &[
            ("ingress", "tproxy_through_our_proxy"),
            ("ingress", "tproxy_through_haproxy"),
            ("ingress", "tproxy_sigterm_leaves_host_as_before"),
            (
                "ingress",
                "tproxy_proxy_down_is_refused_on_the_dialled_port",
            ),
            ("ingress", "tproxy_through_envoy"),
            ("ingress", "tproxy_drain_completes_large_transfer"),
            ("ingress", "tproxy_on_a_gateway_with_a_remote_app"),
        ],
        core: 3,
        rep: 1,
    },
    Column {
        key: "tc",
        title: "tc attach (TCX or netlink)",
        need: Need::Accel,
        follows: &[Choice::Tc],
        tests: &[
            (
                "lifecycle",
                "attaches_everything_and_sigterm_removes_it_all",
            ),
            (
                "lifecycle",
                "sigkill_with_netlink_filters_next_start_removes_them",
            ),
            (
                "lifecycle",
                "netlink_mode_adds_and_removes_its_clsact_qdisc",
            ),
            (
                "lifecycle",
                "sigkill_with_tcx_leaves_only_the_record_and_next_start_recovers",
            ),
            ("lifecycle", "failure_late_in_attach_rolls_back_everything"),
            (
                "lifecycle",
                "sigint_works_too_and_no_accel_loads_no_socket_programs",
            ),
            ("lifecycle", "bad_input_gets_one_line_and_leaves_nothing"),
            (
                "lifecycle",
                "sigkill_in_tproxy_mode_next_start_removes_the_routing_it_left",
            ),
            (
                "lifecycle",
                "instances_in_two_namespaces_do_not_collide_and_one_per_interface",
            ),
        ],
        core: 9,
        rep: 2,
    },
    Column {
        key: "origdst",
        title: "original destination v4/v6",
        need: Need::Accel,
        follows: &[],
        tests: &[
            ("fail_closed", "only_the_proxy_learns_original_destinations"),
            ("ingress", "unrelated_sockets_keep_the_kernels_answer"),
        ],
        core: 2,
        rep: 2,
    },
    Column {
        key: "failclosed",
        title: "fail closed",
        need: Need::Accel,
        follows: &[],
        tests: &[
            (
                "fail_closed",
                "a_stranger_on_the_proxy_port_gets_no_steered_connection",
            ),
            ("fail_closed", "only_connections_the_proxy_makes_are_paired"),
            (
                "fail_closed",
                "the_tproxy_backend_gives_a_strangers_plain_listener_nothing",
            ),
        ],
        core: 3,
        rep: 1,
    },
    Column {
        key: "accel",
        title: "acceleration",
        need: Need::Accel,
        follows: &[Choice::ReadHook],
        tests: &[
            (
                "accel",
                "a_gibibyte_through_the_accelerated_proxy_is_byte_exact",
            ),
            (
                "accel",
                "a_sender_returns_to_the_fast_path_once_its_reader_caught_up",
            ),
            ("accel", "a_slow_reader_is_bounded"),
            (
                "accel",
                "a_reader_that_drained_its_redirected_bytes_sees_the_tcp_ones",
            ),
            ("accel", "a_request_that_fell_back_to_tcp_is_answered"),
            ("accel", "the_map_holds_exactly_the_live_pairs"),
            (
                "accel",
                "half_close_and_close_mid_stream_deliver_everything",
            ),
            (
                "accel",
                "transfers_through_accelerated_envoy_are_byte_exact",
            ),
            ("accel", "a_machine_short_of_tcp_memory_sends_by_tcp"),
            (
                "accel",
                "a_stream_its_reader_never_catches_up_with_leaves_the_sockhash",
            ),
            (
                "accel",
                "a_writer_refused_by_tcp_that_writes_more_is_counted_exactly",
            ),
            ("accel", "echo_pairs_that_retire_and_leave_stay_byte_exact"),
            ("accel", "many_switches_never_freeze_a_reader"),
            ("accel", "rounds_that_fall_back_mid_round_never_stall"),
            ("accel", "teardown_under_load_loses_nothing"),
            ("accel", "teardown_under_load_through_envoy_loses_nothing"),
            ("accel", "the_map_holds_exactly_envoys_live_pairs"),
            ("accel", "a_namespace_that_is_not_a_target_is_left_alone"),
            (
                "accel",
                "a_one_way_stream_of_small_writes_leaves_the_fast_path_by_itself",
            ),
            (
                "accel_memory",
                "a_slow_reader_costs_no_more_memory_than_without_acceleration_ours",
            ),
            (
                "accel_memory",
                "a_slow_reader_costs_no_more_memory_than_without_acceleration_haproxy",
            ),
            (
                "accel_memory",
                "a_slow_reader_costs_no_more_memory_than_without_acceleration_envoy",
            ),
        ],
        core: 9,
        rep: 2,
    },
    Column {
        key: "semantics",
        title: "acceleration invisible (semantics)",
        need: Need::Accel,
        follows: &[Choice::ReadHook],
        // Every kernel runs one: what tcp_bpf honours changes from release
        // to release (FIONREAD, splice, kTLS where the kernel has it).
        tests: &[
            (
                "semantics",
                "an_app_cannot_tell_acceleration_through_our_proxy",
            ),
            ("semantics", "an_app_cannot_tell_acceleration_through_envoy"),
            (
                "semantics",
                "an_app_cannot_tell_acceleration_through_haproxy",
            ),
        ],
        core: 1,
        rep: 1,
    },
    Column {
        key: "bothlegs",
        title: "both legs",
        need: Need::Accel,
        follows: &[Choice::ReadHook],
        tests: &[
            (
                "both_legs",
                "both_legs_of_a_same_node_request_go_socket_to_socket",
            ),
            (
                "both_legs",
                "a_forged_established_socket_cannot_take_another_connection",
            ),
            ("both_legs", "both_legs_through_envoy_go_socket_to_socket"),
        ],
        core: 2,
        rep: 1,
    },
    Column {
        key: "agent",
        title: "agent",
        need: Need::Accel,
        follows: &[Choice::Tc, Choice::ReadHook],
        tests: &[
            (
                "agent",
                "restart_keeps_an_established_accelerated_connection_byte_exact",
            ),
            (
                "agent",
                "an_agent_restart_opens_no_window_and_keeps_established_flows",
            ),
            ("agent", "replacing_a_targets_backend_opens_no_window"),
            ("agent", "a_removed_target_leaves_no_entry_in_any_map"),
            (
                "agent",
                "the_tproxy_backend_routes_inside_the_pod_and_leaves_with_it",
            ),
            (
                "agent",
                "changing_a_targets_ports_or_accel_updates_it_in_place_with_no_window",
            ),
            (
                "agent",
                "a_target_waits_for_its_cgroup_and_is_attached_once_it_appears",
            ),
            (
                "agent",
                "two_pods_with_identical_addresses_never_meet_and_removing_one_leaves_the_other_flowing",
            ),
            (
                "agent",
                "replacing_a_target_in_its_namespace_opens_no_window",
            ),
            (
                "agent",
                "a_pods_quota_of_accelerated_sockets_leaves_the_others_theirs",
            ),
            (
                "agent",
                "a_pods_quota_of_open_flows_leaves_the_others_theirs",
            ),
            (
                "agent",
                "a_removal_cut_short_by_a_restart_is_finished_by_the_next_agent",
            ),
            (
                "agent",
                "an_agent_makes_its_dir_on_a_bpffs_and_mounts_nothing",
            ),
            (
                "agent",
                "an_agent_mounts_a_bpffs_on_an_empty_dir_only_and_cleanup_unmounts_it",
            ),
            (
                "agent",
                "an_agent_refuses_a_bpffs_dir_that_is_not_empty_and_mounts_nothing",
            ),
            (
                "agent",
                "an_agent_refuses_the_pins_of_another_build_with_one_line",
            ),
            (
                "agent",
                "many_pods_on_one_agent_attach_fast_and_the_per_packet_cost_does_not_grow",
            ),
            (
                "agent",
                "pod_churn_and_a_flooded_pod_leave_the_others_flows_live_and_no_entries_behind",
            ),
            (
                "agent",
                "scrapes_answer_from_a_cached_snapshot_and_the_api_stays_responsive",
            ),
            ("agent", "sigkill_under_load_then_cleanup_leaves_nothing"),
            (
                "agent",
                "target_files_add_replace_and_remove_targets_and_a_broken_one_is_skipped",
            ),
            (
                "agent",
                "the_agent_refuses_the_cgroup_root_and_paths_outside_the_cgroup2_mount",
            ),
        ],
        core: 4,
        rep: 1,
    },
    Column {
        key: "cni",
        title: "CNI",
        need: Need::Accel,
        follows: &[],
        tests: &[
            ("sim_node", "one_agent_serves_the_pods_tproxy_cni_registers"),
            ("cni", "chained_after_bridge_like_a_runtime"),
            (
                "sim_node",
                "pods_on_the_simulated_node_reach_each_other_and_the_outside",
            ),
            (
                "sim_node",
                "deleting_a_pod_waits_for_a_same_node_flow_on_the_fast_path",
            ),
        ],
        core: 2,
        rep: 2,
    },
];

/// What a kernel offers tproxy, as `tproxy check` (its own probes) says.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Caps {
    /// `uname -r`.
    pub release: String,
    /// The first need of `--no-accel` the kernel lacks, as check words it.
    pub steering_missing: Option<String>,
    /// The first need of acceleration the kernel lacks.
    pub accel_missing: Option<String>,
    /// "TCX" or "netlink".
    pub tc: String,
    /// The read hook acceleration would use.
    pub read_hook: String,
    /// A guest under software emulation (its timings mean nothing).
    #[serde(default)]
    pub emulated: bool,
}

impl Caps {
    fn path(&self, p: Choice) -> &str {
        match p {
            Choice::Tc => &self.tc,
            Choice::ReadHook => &self.read_hook,
        }
    }

    /// Why a need is not met here, if it is not.
    pub fn lacks(&self, need: Need) -> Option<&str> {
        match need {
            Need::Nothing => None,
            Need::Accel => self
                .steering_missing
                .as_deref()
                .or(self.accel_missing.as_deref()),
            Need::RealTime => self.emulated.then_some(
                "a bound on latency: timings under software emulation mean nothing (the host runs it)",
            ),
            Need::OwnMachine => (!self.emulated).then_some(
                "changes the machine-wide tcp_mem: runs in the guests, whose machine the test owns",
            ),
            Need::Tcx => self
                .steering_missing
                .as_deref()
                .or((self.tc != "TCX").then_some(
                    "tc attach: the kernel has no TCX (Linux >= 6.6); netlink filters serve",
                )),
        }
    }
}

/// Items of `tproxy check` that are about this machine's set-up, not the
/// kernel: the proxy is not started when the matrix probes.
const NOT_KERNEL: &[&str] = &["proxy listener", "fast path"];

/// The first failing kernel item, a probed one before the version line
/// (which only says what tproxy was tested on).
fn first_failing(items: &serde_json::Value) -> Option<String> {
    let failing: Vec<(&str, &str)> = items
        .as_array()?
        .iter()
        .filter(|i| i["ok"] == false)
        .filter_map(|i| Some((i["name"].as_str()?, i["detail"].as_str().unwrap_or(""))))
        .filter(|(n, _)| !NOT_KERNEL.contains(n))
        .collect();
    failing
        .iter()
        .find(|(n, _)| *n != "kernel")
        .or(failing.first())
        .map(|(n, d)| format!("{n}: {d}"))
}

fn item_detail(
    items: &serde_json::Value,
    pick: impl Fn(&str) -> bool,
) -> Option<&serde_json::Value> {
    items
        .as_array()?
        .iter()
        .find(|i| i["name"].as_str().is_some_and(&pick))
}

/// Probes this kernel with the built `tproxy check`.
pub fn probe(tproxy: &Path) -> Result<Caps> {
    let check = |accel: bool| -> Result<serde_json::Value> {
        let mut cmd = Command::new(tproxy);
        cmd.args(["check", "--json"]);
        if !accel {
            cmd.arg("--no-accel");
        }
        // check exits non-zero when something fails: the JSON is the answer.
        let out = cmd
            .output()
            .with_context(|| format!("running {}", tproxy.display()))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "tproxy check --json printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let (plain, accel) = (check(false)?, check(true)?);
    let tc = item_detail(&plain, |n| n == "tc attach")
        .and_then(|i| i["detail"].as_str())
        .map(|d| {
            if d.starts_with("TCX") {
                "TCX"
            } else {
                "netlink"
            }
        })
        .unwrap_or("unknown")
        .to_string();
    let read_hook = item_detail(&accel, |n| {
        n.starts_with("read hook") || n.ends_with("tracepoint")
    })
    .map(|i| {
        if i["ok"] == true {
            if i["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("read hook"))
            {
                i["detail"].as_str().unwrap_or("").to_string()
            } else {
                i["name"].as_str().unwrap_or("").to_string()
            }
        } else {
            "none".into()
        }
    })
    .unwrap_or_else(|| "unknown".into());
    let release = crate::output(Command::new("uname").arg("-r"))?
        .trim()
        .to_string();
    let steering_missing = first_failing(&plain);
    Ok(Caps {
        release,
        accel_missing: first_failing(&accel).filter(|_| steering_missing.is_none()),
        steering_missing,
        tc,
        read_hook,
        // The guest says so; `probe` cannot tell.
        emulated: false,
    })
}

/// How much of the suite a guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Depth {
    /// Core tests where the kernel changes a column's code path, one
    /// representative elsewhere (what CI runs).
    Focused,
    /// Every applicable test.
    Full,
}

/// One test's part in a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Plan {
    Run,
    /// Covered by the host's run, not repeated here (focused depth).
    Covered,
    /// The kernel lacks what it needs: why.
    NotApplicable(String),
}

/// A test (binary, name) and what to do with it on a kernel.
pub type Planned = (&'static str, &'static str, Plan);

/// Every column's tests with what to do with each on a kernel, given the
/// kernels already run (`seen`, the host first); with `only` or `named`,
/// just those columns' tests and the tests named.
pub fn plan(
    caps: &Caps,
    seen: &[Caps],
    depth: Depth,
    only: &[String],
    named: &[String],
) -> Vec<(&'static Column, Vec<Planned>)> {
    let everything = only.is_empty() && named.is_empty();
    let is_named = |name: &str| named.iter().any(|t| t == name);
    COLUMNS
        .iter()
        .filter_map(|c| {
            let whole = everything || only.iter().any(|k| k == c.key);
            if !whole && !c.tests.iter().any(|(_, n)| is_named(n)) {
                return None;
            }
            let lacks = caps.lacks(c.need);
            let differs = c
                .follows
                .iter()
                .any(|p| seen.iter().all(|k| k.path(*p) != caps.path(*p)));
            let n = match depth {
                Depth::Full => c.tests.len(),
                Depth::Focused if differs => c.core,
                Depth::Focused => c.rep,
            };
            let tests = c
                .tests
                .iter()
                .enumerate()
                .filter(|(_, (_, name))| whole || is_named(name))
                .map(|(i, (bin, name))| {
                    let own = lacked_need(caps, name);
                    let p = match lacks.or(own) {
                        Some(why) => Plan::NotApplicable(why.to_string()),
                        // A test asked for by name runs whatever the depth.
                        None if i < n || is_named(name) => Plan::Run,
                        None => Plan::Covered,
                    };
                    (*bin, *name, p)
                })
                .collect();
            Some((c, tests))
        })
        .collect()
}

/// A kernel's row: what it offered and each test's outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    pub kernel: String,
    pub caps: Caps,
    pub depth: String,
    /// "bin::name" → "ok", "FAILED", "not run: …", "not applicable: …".
    pub tests: BTreeMap<String, String>,
    pub seconds: u64,
    pub date: String,
}

impl Row {
    /// The cell for a column.
    pub fn cell(&self, c: &Column) -> String {
        let outcomes: Vec<&String> = c
            .tests
            .iter()
            .filter_map(|(b, n)| self.tests.get(&format!("{b}::{n}")))
            .collect();
        let failed = outcomes.iter().filter(|o| o.as_str() == "FAILED").count();
        let passed = outcomes.iter().filter(|o| o.as_str() == "ok").count();
        let na = outcomes
            .iter()
            .find_map(|o| o.strip_prefix("not applicable: "));
        // The hook's name, without check's reasons for it.
        let hook = self.caps.read_hook.split(" (").next().unwrap_or_default();
        let detail = match c.key {
            "tc" => format!(" ({})", self.caps.tc),
            "accel" | "bothlegs" => format!(" ({hook})"),
            _ => String::new(),
        };
        if failed > 0 {
            format!("**FAILED** {failed} of {}", passed + failed)
        } else if passed > 0 {
            format!("passed {passed}/{}{detail}", c.tests.len())
        } else if na.is_some() {
            // Why: once per row, under the table.
            "refused".into()
        } else {
            "not run".into()
        }
    }
}

fn results_dir() -> std::path::PathBuf {
    crate::target_dir().join("matrix")
}

pub fn save(row: &Row) -> Result<()> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{}.json", row.kernel)),
        serde_json::to_vec_pretty(row)?,
    )?;
    Ok(())
}

/// Merges a partial run (some columns or tests) into the kernel's saved
/// row: the outcomes it has replace the saved ones, the rest stay.
pub fn save_part(row: &Row, what: &str) -> Result<()> {
    let path = results_dir().join(format!("{}.json", row.kernel));
    let Some(mut prev) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Row>(&b).ok())
    else {
        return save(row);
    };
    for (k, v) in &row.tests {
        prev.tests.insert(k.clone(), v.clone());
    }
    prev.depth = format!("{}; {} for {what}", prev.depth, row.depth);
    prev.seconds += row.seconds;
    prev.caps = row.caps.clone();
    save(&prev)
}

fn load_all() -> Vec<Row> {
    let mut rows: Vec<Row> = std::fs::read_dir(results_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    // host first, then newest kernel first.
    let order = |k: &str| -> (u8, Vec<i64>) {
        if k == "host" {
            return (0, Vec::new());
        }
        (
            1,
            k.split('.')
                .map(|n| -n.parse::<i64>().unwrap_or(0))
                .collect(),
        )
    };
    rows.sort_by_key(|r| order(&r.kernel));
    rows
}

pub const BEGIN: &str = "<!-- kernel-matrix:begin (cargo xtask test writes this) -->";
pub const END: &str = "<!-- kernel-matrix:end -->";

/// The table of every saved row.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from("| kernel |");
    for c in COLUMNS {
        s += &format!(" {} |", c.title);
    }
    s += "\n|---|";
    s += &"---|".repeat(COLUMNS.len());
    s += "\n";
    for r in rows {
        let who = crate::kernels::by_name(&r.kernel).map_or("this machine", |k| k.who);
        s += &format!("| {} ({}; {}) |", r.caps.release, who, r.depth);
        for c in COLUMNS {
            s += &format!(" {} |", r.cell(c));
        }
        s += "\n";
    }
    s += "\n";
    for r in rows {
        s += &format!(
            "- {}: {} of the table's tests run in {} s on {} ({} depth{}).\n",
            r.caps.release,
            r.tests
                .values()
                .filter(|o| *o == "ok" || *o == "FAILED")
                .count(),
            r.seconds,
            r.date,
            r.depth,
            if r.kernel == "host" {
                "; the seconds are the whole host suite's, with the build"
            } else {
                ""
            }
        );
        let mut reasons: Vec<&str> = r
            .tests
            .values()
            .filter_map(|o| o.strip_prefix("not applicable: "))
            .collect();
        reasons.sort_unstable();
        reasons.dedup();
        for why in reasons {
            s += &format!("  Not applicable there: {why}.\n");
        }
    }
    s
}

/// Writes the table of every saved row into docs/kernel-notes.md between its
/// markers.
pub fn write_table() -> Result<std::path::PathBuf> {
    let doc = crate::repo_root().join("docs/kernel-notes.md");
    let text =
        std::fs::read_to_string(&doc).with_context(|| format!("reading {}", doc.display()))?;
    let (head, rest) = text
        .split_once(BEGIN)
        .with_context(|| format!("{} has no {BEGIN}", doc.display()))?;
    let (_, tail) = rest
        .split_once(END)
        .with_context(|| format!("{} has no {END}", doc.display()))?;
    let new = format!("{head}{BEGIN}\n{}{END}{tail}", table(&load_all()));
    std::fs::write(&doc, new)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(tc: &str, hook: &str) -> Caps {
        Caps {
            release: "x".into(),
            tc: tc.into(),
            read_hook: hook.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_test_that_changes_the_machine_runs_alone_and_only_in_guests() {
        let name = "a_machine_short_of_tcp_memory_sends_by_tcp";
        assert!(runs_alone(name));
        assert!(!runs_alone("a_slow_reader_is_bounded"));
        let host = caps("TCX", "sock_recv_length tracepoint");
        assert!(lacked_need(&host, name).is_some());
        let guest = Caps {
            emulated: true,
            ..caps("netlink", "fexit on tcp_bpf_recvmsg")
        };
        assert_eq!(lacked_need(&guest, name), None);
        let p = plan(&guest, &[host], Depth::Focused, &[], &[]);
        let accel = p.iter().find(|(c, _)| c.key == "accel").unwrap();
        assert!(accel.1.iter().any(|t| t.1 == name && t.2 == Plan::Run));
    }

    #[test]
    fn every_test_is_in_one_column_once() {
        let mut seen = std::collections::HashSet::new();
        for c in COLUMNS {
            assert!(c.core <= c.tests.len() && c.rep <= c.core, "{}", c.key);
            for t in c.tests {
                assert!(seen.insert(t), "{t:?} twice");
            }
        }
    }

    #[test]
    fn a_kernel_that_changes_a_path_runs_the_core_and_one_that_lacks_a_need_says_why() {
        let host = caps("TCX", "sock_recv_length tracepoint");
        let old = Caps {
            tc: "netlink".into(),
            ..host.clone()
        };
        let p = plan(&old, std::slice::from_ref(&host), Depth::Focused, &[], &[]);
        let tc = p.iter().find(|(c, _)| c.key == "tc").unwrap();
        let col = COLUMNS.iter().find(|c| c.key == "tc").unwrap();
        for (i, t) in tc.1.iter().enumerate() {
            match (i < col.core, t.1.contains("tcx")) {
                (_, true) => assert!(matches!(t.2, Plan::NotApplicable(_)), "{t:?}"),
                (true, false) => assert_eq!(t.2, Plan::Run, "{t:?}"),
                (false, false) => assert_eq!(t.2, Plan::Covered, "{t:?}"),
            }
        }
        let accel = p.iter().find(|(c, _)| c.key == "accel").unwrap();
        assert_eq!(accel.1.iter().filter(|t| t.2 == Plan::Run).count(), 2);
        let none = Caps {
            steering_missing: Some("kernel: too old".into()),
            ..host.clone()
        };
        // Once a kernel with netlink filters ran, the next runs the reps.
        let p2 = plan(&old, &[host.clone(), old.clone()], Depth::Focused, &[], &[]);
        let tc = p2.iter().find(|(c, _)| c.key == "tc").unwrap();
        assert_eq!(tc.1.iter().filter(|t| t.2 == Plan::Run).count(), 2);
        // A test named runs at any depth, and nothing else does.
        let name = COLUMNS.iter().find(|c| c.key == "accel").unwrap().tests[15].1;
        let p3 = plan(
            &old,
            &[host.clone(), old.clone()],
            Depth::Focused,
            &[],
            &[name.into()],
        );
        let planned: Vec<_> = p3.iter().flat_map(|(_, t)| t).collect();
        assert_eq!(planned.len(), 1, "{planned:?}");
        assert_eq!((planned[0].1, &planned[0].2), (name, &Plan::Run));
        let p4 = plan(
            &old,
            &[host.clone(), old.clone()],
            Depth::Full,
            &["agent".into()],
            &[name.into()],
        );
        let keys: Vec<_> = p4.iter().map(|(c, t)| (c.key, t.len())).collect();
        let agent = COLUMNS
            .iter()
            .find(|c| c.key == "agent")
            .unwrap()
            .tests
            .len();
        assert_eq!(keys, [("accel", 1), ("agent", agent)]);
        let p = plan(&none, &[host], Depth::Full, &[], &[]);
        for (c, tests) in &p {
            for t in tests {
                match c.need {
                    Need::Nothing => assert_eq!(t.2, Plan::Run),
                    _ => assert_eq!(t.2, Plan::NotApplicable("kernel: too old".into())),
                }
            }
        }
    }
}
