//! The `tproxy` steering back-end's kernel state outside eBPF: a fwmark
//! rule and a `local` default route in a table of its own (rtnetlink), and
//! an nftables table whose `tproxy` rule hands marked flows to the proxy's
//! transparent listener. `TproxyRouting` owns all of it; Drop removes it.
//! Nothing else in the host's rules or tables is touched: the mark and
//! table are checked unused before anything is installed ([`plan`]), and
//! removal deletes only rules and routes identical to the ones it added.
//! The nftables table is created exclusively (`create table`: a table of
//! that name already there fails the whole batch) and removed only while
//! its rules carry the marker of the spec that created it.
use std::{borrow::Cow, collections::BTreeMap, fmt::Write as _};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression},
    helper,
    schema::{Chain, NfCmd, NfListObject, Rule, Table},
    stmt::{Accept, Match, Operator, Reject, RejectType, Statement, TProxy},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use tracing::{debug, warn};

use crate::{
    config::{
        self,
        options::{Options, RESERVED_TABLES, check_table_not_reserved, default_steer_mark},
    },
    sys::{
        Error, Result,
        error::{self, NftError},
        removal::{Removal, RemovedKind},
        tc::with_rtnetlink,
    },
};

/// Priority of the fwmark rule: ahead of `main` (32766), after `local` (0).
pub const RULE_PRIORITY: u32 = 9000;
const LOOPBACK_IFINDEX: u32 = 1;
/// The metric the kernel gives an IPv6 route added without one; set
/// explicitly so removal can match it (IPv4 routes get none).
const IPV6_ROUTE_METRIC: u32 = 1024;
/// How far past a taken default mark or table the search for a free one goes.
pub(crate) const SEARCH: u32 = 4096;

/// What the back-end installs, by value, so a later run can remove what a
/// killed one left (the runtime record stores it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TproxySpec {
    pub nft_table: String,
    pub mark: u32,
    pub table: u32,
    pub proxy_port: u16,
    /// A token of this install alone, in the comment of every rule of its
    /// nftables table (`tproxy <owner>: …`): removal deletes the table only
    /// while it carries it, so a table of the same name that someone else
    /// made (after deleting ours, or while a kill left the record behind)
    /// is never taken for ours. Rule comments rather than a table comment:
    /// nft's JSON input (which the nftables crate writes) drops table
    /// comments before nftables 1.1. Empty in records of older versions.
    #[serde(default)]
    pub owner: String,
}

impl TproxySpec {
    pub fn new(iface: &str, mark: u32, table: u32, proxy_port: u16) -> Self {
        TproxySpec {
            nft_table: format!("tproxy_{iface}"),
            mark,
            table,
            proxy_port,
            owner: new_owner(),
        }
    }

    /// The prefix of the comments of the rules this spec installs.
    fn marker(&self) -> String {
        format!("tproxy {}:", self.owner)
    }
}

/// 64 random bits in hex; pid and time if the kernel has none to give.
fn new_owner() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        return b.iter().map(|x| format!("{x:02x}")).collect();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{nanos:x}", std::process::id())
}

/// Marks and tables the namespace's rules and routes already use, each with
/// its first user (for the error message).
#[derive(Clone, Debug, Default)]
pub struct InUse {
    /// fwmark rules: (mark, mask, rule).
    marks: Vec<(u32, u32, String)>,
    tables: BTreeMap<u32, String>,
}

impl InUse {
    pub fn add_mark(&mut self, mark: u32, mask: u32, user: impl Into<String>) {
        self.marks.push((mark, mask, user.into()));
    }

    pub fn add_table(&mut self, table: u32, user: impl Into<String>) {
        self.tables.entry(table).or_insert_with(|| user.into());
    }

    /// A rule that packets carrying `mark` would match (the kernel's test:
    /// `(mark ^ rule.mark) & rule.mask == 0`).
    pub fn mark_user(&self, mark: u32) -> Option<&str> {
        self.marks
            .iter()
            .find(|(m, mask, _)| (mark ^ m) & mask == 0)
            .map(|(_, _, u)| u.as_str())
    }

    pub fn table_user(&self, table: u32) -> Option<&str> {
        self.tables.get(&table).map(String::as_str)
    }
}

/// Picks the steer mark and routing table: explicit ones must be free (and
/// the table not reserved); defaults start at `0x7400 + ifindex` (distinct
/// for every interface) and move on to the next free value if taken.
pub fn pick(
    steer_mark: Option<u32>,
    route_table: Option<u32>,
    ifindex: u32,
    proxy_mark: u32,
    in_use: &InUse,
) -> Result<(u32, u32)> {
    let mark = match steer_mark {
        Some(m) if m == proxy_mark => {
            return Err(config::Error::MarksCollide {
                mark: m,
                via: config::Via::FlagsOrFile,
            }
            .into());
        }
        Some(m) => match in_use.mark_user(m) {
            Some(user) => {
                return Err(Error::MarkInUse {
                    mark: m,
                    user: user.into(),
                });
            }
            None => m,
        },
        None => {
            let start = default_steer_mark(ifindex);
            first_free(start, |m| {
                m != 0 && m != proxy_mark && in_use.mark_user(m).is_none()
            })
            .ok_or(Error::NoFreeRouting {
                what: "steer mark",
                from: start,
                searched: SEARCH,
            })?
        }
    };
    let table = match route_table {
        Some(t) => {
            check_table_not_reserved(t)?;
            if let Some(user) = in_use.table_user(t) {
                return Err(Error::TableInUse {
                    table: t,
                    user: user.into(),
                });
            }
            t
        }
        // The table follows the mark, so both usually read the same.
        None => first_free(mark, |t| {
            !RESERVED_TABLES.contains(&t) && in_use.table_user(t).is_none()
        })
        .ok_or(Error::NoFreeRouting {
            what: "routing table",
            from: mark,
            searched: SEARCH,
        })?,
    };
    Ok((mark, table))
}

fn first_free(start: u32, free: impl Fn(u32) -> bool) -> Option<u32> {
    (0..SEARCH)
        .map(|i| start.wrapping_add(i))
        .find(|&v| free(v))
}

fn family_name(f: AddressFamily) -> &'static str {
    match f {
        AddressFamily::Inet => "IPv4",
        AddressFamily::Inet6 => "IPv6",
        _ => "other-family",
    }
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn describe_rule(r: &RuleMessage) -> String {
    let prio = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    format!(
        "the {} rule at priority {prio}",
        family_name(r.header.family)
    )
}

fn describe_route(r: &RouteMessage) -> String {
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(a.to_string()),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(a.to_string()),
        _ => None,
    });
    let mut s = format!("the {} route ", family_name(r.header.address_family));
    match dst {
        Some(d) => {
            let _ = write!(s, "{d}/{}", r.header.destination_prefix_length);
        }
        None => s.push_str("default"),
    }
    let _ = write!(s, " in table {}", route_table(r));
    s
}

/// Everything the namespace's IPv4 and IPv6 rules and routes use.
async fn in_use(handle: &rtnetlink::Handle) -> std::result::Result<InUse, rtnetlink::Error> {
    let mut used = InUse::default();
    for family in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle.rule().get(family).execute().try_collect().await?;
        for r in &rules {
            let mut mark = None;
            let mut mask = u32::MAX; // the kernel's default with a mark
            for a in &r.attributes {
                match a {
                    RuleAttribute::FwMark(m) => mark = Some(*m),
                    RuleAttribute::FwMask(m) => mask = *m,
                    _ => {}
                }
            }
            if let Some(m) = mark.filter(|_| mask != 0) {
                used.add_mark(m, mask, describe_rule(r));
            }
            if r.header.action == RuleAction::ToTable {
                used.add_table(rule_table(r), describe_rule(r));
            }
        }
    }
    for route in dump_routes(handle).await? {
        used.add_table(route_table(&route), describe_route(&route));
    }
    Ok(used)
}

/// Every IPv4 and IPv6 route in every table (dumps are not filtered by
/// table without strict checking: filter here).
async fn dump_routes(
    handle: &rtnetlink::Handle,
) -> std::result::Result<Vec<RouteMessage>, rtnetlink::Error> {
    let mut out: Vec<RouteMessage> = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    out.extend(v6);
    Ok(out)
}

fn list_in_use() -> Result<InUse> {
    with_rtnetlink(async |h| in_use(&h).await)
        .map_err(|e| Error::io("listing the ip rules and routes in use", e))
}

/// The tproxy back-end's spec for `opts` on `ifindex`: mark and table picked
/// or checked against this namespace's rules and routes. Installs nothing.
pub fn plan(opts: &Options, ifindex: u32) -> Result<TproxySpec> {
    let (mark, table) = pick(
        opts.steer_mark,
        opts.route_table,
        ifindex,
        opts.proxy_mark,
        &list_in_use()?,
    )?;
    Ok(TproxySpec::new(&opts.iface, mark, table, opts.proxy_port))
}

/// Checks again, under a lock, that what `spec` uses is still free, and
/// keeps the lock for the install: two instances starting at once in one
/// namespace do not both take a value.
fn recheck_locked(spec: &TproxySpec) -> Result<std::fs::File> {
    let dir = crate::sys::run_dir::run_dir();
    let lock = std::fs::File::open(&dir)
        .map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
    // SAFETY: flock on a valid fd; blocks only while another start installs.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(format!("locking {}", dir.display()), e));
    }
    pick(Some(spec.mark), Some(spec.table), 0, 0, &list_in_use()?)?;
    Ok(lock)
}

/// Owner of the rule, the routes and the nftables table.
pub struct TproxyRouting {
    spec: TproxySpec,
}

fn meta_match<'a>(key: MetaKey, right: Expression<'a>) -> Statement<'a> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key })),
        right,
        op: Operator::EQ,
    })
}

fn nft_table(spec: &TproxySpec) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Owned(spec.nft_table.clone()),
        handle: None,
    })
}

/// Where `nft` is on PATH: the nftables crate runs it by that name.
pub fn nft_on_path() -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nft"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Checks, before anything is installed, that `nft` runs and that the
/// kernel takes the table `spec` would add (its `tproxy` rule needs
/// nft_tproxy): `nft --check` has the kernel validate the batch and then
/// discards it. Returns where `nft` is. (Whether the table's name is free
/// is [`check_nft_table_free`]'s question.)
pub fn check_nft(spec: &TproxySpec) -> Result<std::path::PathBuf> {
    use std::io::Write as _;
    let nft = nft_on_path().ok_or(Error::NoNft)?;
    let payload = serde_json::to_string(&nft_batch(spec, false).to_nftables()).expect("serializes");
    // Run here rather than through the nftables crate, which lets nft's
    // error go to our stderr: it belongs in the one-line error.
    let run = || -> std::io::Result<std::process::Output> {
        let mut child = std::process::Command::new(&nft)
            .args(["-c", "-j", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(payload.as_bytes())?;
        child.wait_with_output()
    };
    let out = run().map_err(|e| Error::io(format!("running {}", nft.display()), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(Error::NftTproxyUnsupported(why.trim().to_string()));
    }
    Ok(nft)
}

/// Refuses, before anything is installed, a table of the name `spec`
/// would create that is already there: it is not ours (a stale record of
/// ours was cleaned up before this), and adding to it would mix our rules
/// into someone's table, whose teardown would then take theirs too.
pub fn check_nft_table_free(spec: &TproxySpec) -> Result<()> {
    // Without nft the one line to print is that one.
    nft_on_path().ok_or(Error::NoNft)?;
    match find_nft_table(spec)? {
        None => Ok(()),
        Some(_) => Err(Error::NftTableExists(spec.nft_table.clone())),
    }
}

fn install_nft(spec: &TproxySpec) -> Result<()> {
    // `create`: the batch fails as a whole if the table appeared since
    // `check_nft_table_free` looked.
    helper::apply_ruleset(&nft_batch(spec, true).to_nftables()).map_err(|e| {
        match NftError(Box::new(e)) {
            e if e.is_exists() => Error::NftTableExists(spec.nft_table.clone()),
            e => Error::Nft {
                what: "adding the tproxy table".into(),
                source: e,
            },
        }
    })
}

/// The table, chain and rules of the back-end, as one batch. `create`:
/// the table must not exist yet (`nft --check` passes false, as it only
/// asks whether the kernel takes the rules).
fn nft_batch(spec: &TproxySpec, create: bool) -> Batch<'static> {
    let table: Cow<'static, str> = Cow::Owned(spec.nft_table.clone());
    let mut batch = Batch::new();
    if create {
        batch.add_cmd(NfCmd::Create(nft_table(spec)));
    } else {
        batch.add(nft_table(spec));
    }
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: table.clone(),
        name: "prerouting".into(),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(-150), // mangle
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }));
    let marked = || meta_match(MetaKey::Mark, Expression::Number(spec.mark));
    let tcp = || meta_match(MetaKey::L4proto, Expression::String("tcp".into()));
    let marker = spec.marker();
    let rule = |expr: Vec<Statement<'static>>, what: &str| {
        NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: table.clone(),
            chain: "prerouting".into(),
            expr: Cow::Owned(expr),
            comment: Some(format!("{marker} {what}").into()),
            ..Default::default()
        })
    };
    for (nfproto, family) in [("ipv4", "ip"), ("ipv6", "ip6")] {
        batch.add(rule(
            vec![
                marked(),
                meta_match(MetaKey::Nfproto, Expression::String(nfproto.into())),
                tcp(),
                Statement::TProxy(TProxy {
                    family: Some(family.into()),
                    port: spec.proxy_port,
                    addr: None,
                }),
                Statement::Accept(Some(Accept {})),
            ],
            "steered flows to the proxy's transparent listener",
        ));
    }
    // No transparent socket (proxy down): refuse on the port the client
    // dialled instead of letting the flow reach the app behind the proxy.
    batch.add(rule(
        vec![
            marked(),
            tcp(),
            Statement::Reject(Some(Reject {
                _type: Some(RejectType::TCPReset),
                expr: None,
            })),
        ],
        "proxy not listening",
    ));
    batch
}

/// The table of `spec`'s name in this namespace, as `nft -j list table`
/// shows it; `None` if there is none.
fn find_nft_table(spec: &TproxySpec) -> Result<Option<serde_json::Value>> {
    let args = ["list", "table", "inet", spec.nft_table.as_str()];
    match helper::get_current_ruleset_raw(helper::DEFAULT_NFT, &args) {
        Ok(out) => serde_json::from_str(&out)
            .map(Some)
            .map_err(|e| Error::Nft {
                what: format!("reading the nftables table inet {}", spec.nft_table),
                source: NftError(Box::new(helper::NftablesError::NftInvalidJson(e))),
            }),
        Err(e) => match NftError(Box::new(e)) {
            e if e.is_missing() => Ok(None),
            e => Err(Error::Nft {
                what: format!("listing the nftables table inet {}", spec.nft_table),
                source: e,
            }),
        },
    }
}

/// The handle of the table in `listing` (an `nft -j list table` output),
/// if one of its rules carries `marker`: the table `spec` created.
fn marked_table_handle(listing: &serde_json::Value, marker: &str) -> Option<u64> {
    let objects = listing.get("nftables")?.as_array()?;
    let marked = objects.iter().any(|o| {
        o.pointer("/rule/comment")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|c| c.starts_with(marker))
    });
    let handle = objects
        .iter()
        .find_map(|o| o.pointer("/table/handle")?.as_u64());
    handle.filter(|_| marked)
}

/// Removes `spec`'s table if it is the one `spec` created (its rules carry
/// the marker); one of another maker is left with a warning. Deleted by
/// handle, which the kernel never reuses in a namespace: if the table was
/// replaced since the listing, nothing is deleted. Ok(true): removed.
fn remove_nft(spec: &TproxySpec) -> Result<bool> {
    let Some(listing) = find_nft_table(spec)? else {
        return Ok(false);
    };
    if spec.owner.is_empty() {
        return Err(Error::NftTableUnmarked(spec.nft_table.clone()));
    }
    let Some(handle) = marked_table_handle(&listing, &spec.marker()) else {
        warn!(
            "left the nftables table inet {}: tproxy did not create it (none of its rules carries this instance's marker {:?})",
            spec.nft_table,
            spec.marker()
        );
        return Ok(false);
    };
    let payload = serde_json::json!({
        "nftables": [{"delete": {"table": {"family": "inet", "handle": handle}}}]
    })
    .to_string();
    match helper::apply_ruleset_raw(&payload, helper::DEFAULT_NFT, helper::DEFAULT_ARGS) {
        Ok(_) => Ok(true),
        Err(e) => match NftError(Box::new(e)) {
            e if e.is_missing() => Ok(false),
            e => Err(Error::Nft {
                what: "removing the tproxy table".into(),
                source: e,
            }),
        },
    }
}

/// One of the rules `install_routes` adds: the fwmark rule, nothing more
/// (a rule someone added with our mark and table but another priority or
/// selector is not ours).
fn is_our_rule(r: &RuleMessage, spec: &TproxySpec) -> bool {
    let h = &r.header;
    let plain = h.src_len == 0
        && h.dst_len == 0
        && h.tos == 0
        && h.action == RuleAction::ToTable
        && !h.flags.contains(RuleFlags::Invert);
    let mut mark = None;
    let attrs_ours = r.attributes.iter().all(|a| match a {
        RuleAttribute::FwMark(m) => {
            mark = Some(*m);
            true
        }
        RuleAttribute::FwMask(m) => *m == u32::MAX,
        RuleAttribute::Table(t) => *t == spec.table,
        RuleAttribute::Priority(p) => *p == RULE_PRIORITY,
        RuleAttribute::Protocol(_) => true,
        // The kernel reports these unset as all ones.
        RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v) => *v == u32::MAX,
        _ => false,
    });
    let prio = r
        .attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PRIORITY));
    plain && attrs_ours && prio && mark == Some(spec.mark) && rule_table(r) == spec.table
}

/// One of the routes `install_routes` adds: `local default dev lo proto
/// static` in our table, with the metric it was given.
fn is_our_route(r: &RouteMessage, spec: &TproxySpec) -> bool {
    let h = &r.header;
    let want_metric = match h.address_family {
        AddressFamily::Inet => 0,
        AddressFamily::Inet6 => IPV6_ROUTE_METRIC,
        _ => return false,
    };
    let mut oif = None;
    let mut metric = 0;
    let mut extra = false;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Gateway(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Source(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::Encap(_)
            | RouteAttribute::NhId(_) => extra = true,
            _ => {}
        }
    }
    h.destination_prefix_length == 0
        && h.source_prefix_length == 0
        && h.tos == 0
        && h.kind == RouteType::Local
        && h.protocol == RouteProtocol::Static
        && route_table(r) == spec.table
        && oif == Some(LOOPBACK_IFINDEX)
        && metric == want_metric
        && !extra
}

/// `local default dev lo table T`, for one family.
fn local_default_route(table: u32, v6: bool) -> RouteMessage {
    use rtnetlink::RouteMessageBuilder;
    let mut msg = if v6 {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .priority(IPV6_ROUTE_METRIC)
            .build()
    } else {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
            .build()
    };
    msg.header.kind = RouteType::Local;
    msg.header.scope = RouteScope::Host;
    msg.header.protocol = RouteProtocol::Static;
    msg.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
    msg.attributes.push(RouteAttribute::Table(table));
    if table <= 255 {
        msg.header.table = table as u8;
    }
    msg
}

/// Adds the routes and rules, each exclusively (an identical one already
/// there is an error, never taken over). On failure removes what it added
/// (by identity: under the install lock nothing identical is anyone else's).
async fn install_routes(
    handle: rtnetlink::Handle,
    spec: TproxySpec,
) -> std::result::Result<(), rtnetlink::Error> {
    let result = add_routes(&handle, &spec).await;
    if result.is_err() {
        let _ = remove_routes(handle, spec).await;
    }
    result
}

async fn add_routes(
    handle: &rtnetlink::Handle,
    spec: &TproxySpec,
) -> std::result::Result<(), rtnetlink::Error> {
    for v6 in [false, true] {
        handle
            .route()
            .add(local_default_route(spec.table, v6))
            .execute()
            .await?;
        let rule = handle
            .rule()
            .add()
            .fw_mark(spec.mark)
            .table_id(spec.table)
            .priority(RULE_PRIORITY)
            .action(RuleAction::ToTable);
        if v6 {
            rule.v6().execute().await?;
        } else {
            rule.v4().execute().await?;
        }
    }
    Ok(())
}

/// Removes our rules and routes: those identical to what `install_routes`
/// adds for `spec`, nothing else in the table. Returns what it removed.
async fn remove_routes(
    handle: rtnetlink::Handle,
    spec: TproxySpec,
) -> std::result::Result<Vec<String>, rtnetlink::Error> {
    let mut removed = Vec::new();
    for family in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle.rule().get(family).execute().try_collect().await?;
        for r in rules.into_iter().filter(|r| is_our_rule(r, &spec)) {
            let what = format!(
                "the {} rule fwmark {:#x} lookup {} (priority {RULE_PRIORITY})",
                family_name(r.header.family),
                spec.mark,
                spec.table
            );
            handle.rule().del(r).execute().await?;
            removed.push(what);
        }
    }
    for r in dump_routes(&handle).await? {
        if is_our_route(&r, &spec) {
            let what = format!(
                "the {} route local default dev lo in table {}",
                family_name(r.header.address_family),
                spec.table
            );
            handle.route().del(r).execute().await?;
            removed.push(what);
        }
    }
    Ok(removed)
}

impl TproxyRouting {
    /// Installs rule, routes and nftables table; on any failure removes what
    /// it had added before returning the error.
    pub fn install(spec: TproxySpec) -> Result<TproxyRouting> {
        let _lock = recheck_locked(&spec)?;
        let s = spec.clone();
        with_rtnetlink(async move |h| install_routes(h, s).await).map_err(|e| {
            Error::io(
                format!(
                    "adding the fwmark rule and local route (table {:#x}, mark {:#x})",
                    spec.table, spec.mark
                ),
                e,
            )
        })?;
        // From here Drop removes the routes if the nftables table fails.
        let owner = TproxyRouting { spec: spec.clone() };
        install_nft(&spec)?;
        debug!(?spec, "tproxy routing installed");
        Ok(owner)
    }

    pub fn spec(&self) -> &TproxySpec {
        &self.spec
    }

    /// Removes whatever of `spec` exists in this namespace (also after a
    /// killed instance); says what it removed and what it could not.
    pub fn remove(spec: &TproxySpec) -> Removal {
        let mut out = Removal::default();
        match remove_nft(spec) {
            Ok(true) => out.push(
                RemovedKind::Routing,
                format!("the nftables table inet {}", spec.nft_table),
            ),
            Ok(false) => {}
            Err(e) => out.failed.push(error::Chain(&e).to_string()),
        }
        let s = spec.clone();
        match with_rtnetlink(async move |h| remove_routes(h, s).await) {
            Ok(k) => {
                for what in k {
                    out.push(RemovedKind::Routing, what);
                }
            }
            Err(e) => out.failed.push(format!(
                "removing the fwmark rules and routes of table {}: {}",
                spec.table,
                error::Chain(&e)
            )),
        }
        out
    }
}

impl Drop for TproxyRouting {
    fn drop(&mut self) {
        let r = TproxyRouting::remove(&self.spec);
        for e in &r.failed {
            warn!("{e}");
        }
        let what: Vec<String> = r.removed.iter().map(ToString::to_string).collect();
        debug!("removed tproxy routing: {}", what.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: u32 = 0x539;

    fn used() -> InUse {
        let mut u = InUse::default();
        // The host's own rules and a foreign route, as a namespace has them.
        u.add_table(255, "the IPv4 rule at priority 0");
        u.add_table(254, "the IPv4 rule at priority 32766");
        u.add_table(100, "the IPv4 route 10.5.0.0/24 in table 100");
        u.add_mark(0x99, u32::MAX, "the IPv4 rule at priority 1");
        u.add_mark(0x1000, 0xf000, "the IPv6 rule at priority 2");
        u
    }

    #[test]
    fn defaults_are_distinct_for_ifindexes_256_apart() {
        let u = InUse::default();
        let a = pick(None, None, 5, PROXY, &u).unwrap();
        let b = pick(None, None, 261, PROXY, &u).unwrap();
        assert_eq!(a, (0x7405, 0x7405));
        assert_eq!(b, (0x7505, 0x7505));
        // Injective over every ifindex the kernel hands out.
        assert_ne!(default_steer_mark(1), default_steer_mark(1 + 0x1_0000));
        assert_ne!(default_steer_mark(i32::MAX as u32), 0);
    }

    #[test]
    fn reserved_tables_are_refused() {
        for t in RESERVED_TABLES {
            assert!(matches!(
                check_table_not_reserved(t),
                Err(crate::config::Error::ReservedTable { table: x, .. }) if x == t
            ));
            assert!(matches!(
                pick(None, Some(t), 3, PROXY, &InUse::default()),
                Err(Error::Config(crate::config::Error::ReservedTable { .. }))
            ));
        }
        assert!(check_table_not_reserved(100).is_ok());
        assert!(check_table_not_reserved(252).is_ok());
    }

    #[test]
    fn explicit_values_in_use_are_refused_naming_the_user() {
        let u = used();
        let e = pick(None, Some(100), 3, PROXY, &u).unwrap_err();
        assert!(matches!(e, Error::TableInUse { table: 100, .. }), "{e}");
        assert!(e.to_string().contains("10.5.0.0/24"), "{e}");
        let e = pick(Some(0x99), None, 3, PROXY, &u).unwrap_err();
        assert!(matches!(e, Error::MarkInUse { mark: 0x99, .. }), "{e}");
        // Masked rule: 0x1234 & 0xf000 == 0x1000.
        let e = pick(Some(0x1234), None, 3, PROXY, &u).unwrap_err();
        assert!(matches!(e, Error::MarkInUse { mark: 0x1234, .. }), "{e}");
        assert!(pick(Some(0x2234), Some(101), 3, PROXY, &u).is_ok());
        assert!(matches!(
            pick(Some(PROXY), None, 3, PROXY, &u),
            Err(Error::Config(config::Error::MarksCollide {
                mark: PROXY,
                ..
            }))
        ));
        for e in [
            Error::TableInUse {
                table: 1,
                user: "x".into(),
            },
            Error::MarkInUse {
                mark: 1,
                user: "x".into(),
            },
            crate::config::Error::ReservedTable {
                table: 254,
                via: crate::config::Via::Flags,
            }
            .into(),
            Error::NoFreeRouting {
                what: "steer mark",
                from: 1,
                searched: SEARCH,
            },
        ] {
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn taken_defaults_move_to_the_next_free_value() {
        let mut u = InUse::default();
        u.add_mark(0x7403, u32::MAX, "a");
        u.add_table(0x7404, "b");
        u.add_table(0x7405, "c");
        // Mark 0x7403 taken -> 0x7404; table 0x7404, 0x7405 taken -> 0x7406.
        assert_eq!(pick(None, None, 3, PROXY, &u).unwrap(), (0x7404, 0x7406));
        // An explicit mark: the default table follows it.
        assert_eq!(pick(Some(0x20), None, 3, PROXY, &u).unwrap(), (0x20, 0x20));
        // An explicit mark in a reserved range: the table skips those.
        assert_eq!(pick(Some(253), None, 3, PROXY, &u).unwrap(), (253, 256));
        // The proxy mark is never a default.
        assert_eq!(
            pick(None, None, 3, 0x7403, &InUse::default()).unwrap(),
            (0x7404, 0x7404)
        );
    }

    #[test]
    fn a_namespace_with_every_value_taken_is_an_error() {
        let mut u = InUse::default();
        u.add_mark(0, 0, "a rule matching every mark");
        assert!(matches!(
            pick(None, None, 3, PROXY, &u),
            Err(Error::NoFreeRouting {
                what: "steer mark",
                ..
            })
        ));
    }

    fn spec() -> TproxySpec {
        TproxySpec::new("eth0", 0x740a, 0x740a, 15006)
    }

    #[test]
    fn the_batch_creates_the_table_and_marks_every_rule() {
        let s = spec();
        assert_ne!(s.owner, spec().owner, "each install has its own marker");
        let v = serde_json::to_value(nft_batch(&s, true).to_nftables()).unwrap();
        let objects = v["nftables"].as_array().unwrap();
        assert_eq!(objects[0]["create"]["table"]["name"], "tproxy_eth0");
        let comments: Vec<&str> = objects
            .iter()
            .filter_map(|o| o.pointer("/add/rule/comment")?.as_str())
            .collect();
        assert_eq!(comments.len(), 3, "{v}");
        assert!(comments.iter().all(|c| c.starts_with(&s.marker())), "{v}");
        // `nft --check` only asks the kernel about the rules.
        let v = serde_json::to_value(nft_batch(&s, false).to_nftables()).unwrap();
        assert_eq!(v["nftables"][0]["add"]["table"]["name"], "tproxy_eth0");
    }

    #[test]
    fn only_a_table_whose_rules_carry_the_marker_is_ours() {
        let s = spec();
        let listing = |comment: Option<&str>| {
            let mut objects = vec![
                serde_json::json!({"metainfo": {"version": "1.0.6"}}),
                serde_json::json!({"table": {"family": "inet", "name": "tproxy_eth0", "handle": 7}}),
                serde_json::json!({"chain": {"family": "inet", "table": "tproxy_eth0", "name": "input", "handle": 1}}),
            ];
            let mut rule = serde_json::json!({"family": "inet", "table": "tproxy_eth0", "chain": "input", "handle": 2, "expr": []});
            if let Some(c) = comment {
                rule["comment"] = c.into();
            }
            objects.push(serde_json::json!({ "rule": rule }));
            serde_json::json!({ "nftables": objects })
        };
        let ours = format!("{} proxy not listening", s.marker());
        assert_eq!(
            marked_table_handle(&listing(Some(&ours)), &s.marker()),
            Some(7)
        );
        // Someone's table, an older tproxy's rules, another install's.
        for other in [
            None,
            Some("the operator's"),
            Some("tproxy: proxy not listening"),
            Some(&*format!("{} proxy not listening", spec().marker())),
        ] {
            assert_eq!(
                marked_table_handle(&listing(other), &s.marker()),
                None,
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_record_without_a_marker_still_reads() {
        let old = r#"{"nft_table":"tproxy_eth0","mark":29706,"table":29706,"proxy_port":15006}"#;
        let s: TproxySpec = serde_json::from_str(old).unwrap();
        assert!(s.owner.is_empty());
    }

    fn rule(attrs: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header.family = AddressFamily::Inet;
        r.header.action = RuleAction::ToTable;
        r.header.table = 252; // RT_TABLE_COMPAT: the id is in FRA_TABLE
        r.attributes = attrs;
        r
    }

    fn ours() -> Vec<RuleAttribute> {
        vec![
            RuleAttribute::Table(0x740a),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Protocol(RouteProtocol::Unspec),
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::FwMark(0x740a),
            RuleAttribute::FwMask(u32::MAX),
        ]
    }

    #[test]
    fn only_the_rule_tproxy_adds_is_ours() {
        assert!(is_our_rule(&rule(ours()), &spec()));
        let mut other_prio = ours();
        other_prio[3] = RuleAttribute::Priority(9001);
        assert!(!is_our_rule(&rule(other_prio), &spec()));
        let mut with_iif = ours();
        with_iif.push(RuleAttribute::Iifname("eth0".into()));
        assert!(!is_our_rule(&rule(with_iif), &spec()));
        let mut masked = ours();
        masked[5] = RuleAttribute::FwMask(0xff00);
        assert!(!is_our_rule(&rule(masked), &spec()));
        let mut from = rule(ours());
        from.header.src_len = 24;
        assert!(!is_our_rule(&from, &spec()));
        let mut no_mark = ours();
        no_mark.retain(|a| !matches!(a, RuleAttribute::FwMark(_) | RuleAttribute::FwMask(_)));
        assert!(!is_our_rule(&rule(no_mark), &spec()));
    }

    #[test]
    fn only_the_routes_tproxy_adds_are_ours() {
        for v6 in [false, true] {
            let r = local_default_route(0x740a, v6);
            assert!(is_our_route(&r, &spec()), "{r:?}");
            let mut other_table = spec();
            other_table.table = 0x740b;
            assert!(!is_our_route(&r, &other_table));
            let mut prefix = r.clone();
            prefix.header.destination_prefix_length = 24;
            assert!(!is_our_route(&prefix, &spec()));
            let mut unicast = r.clone();
            unicast.header.kind = RouteType::Unicast;
            assert!(!is_our_route(&unicast, &spec()));
            let mut metric = r.clone();
            metric.attributes.push(RouteAttribute::Priority(7));
            assert!(!is_our_route(&metric, &spec()));
            let mut dev = r.clone();
            dev.attributes
                .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
            dev.attributes.push(RouteAttribute::Oif(2));
            assert!(!is_our_route(&dev, &spec()));
        }
    }
}
