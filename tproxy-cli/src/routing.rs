//! The `tproxy` steering back-end's kernel state outside eBPF: a fwmark
//! rule and a `local` default route in a table of its own (rtnetlink), and
//! an nftables table whose `tproxy` rule hands marked flows to the proxy's
//! transparent listener. `TproxyRouting` owns all of it; Drop removes it.
//! Nothing else in the host's rules or tables is touched.
use std::borrow::Cow;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression},
    helper,
    schema::{Chain, NfListObject, Rule, Table},
    stmt::{Accept, Match, Operator, Reject, RejectType, Statement, TProxy},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use tracing::{debug, warn};

use crate::{Error, Result, tc::with_rtnetlink};

/// Priority of the fwmark rule: ahead of `main` (32766), after `local` (0).
pub const RULE_PRIORITY: u32 = 9000;
const LOOPBACK_IFINDEX: u32 = 1;

/// What the back-end installs, by value, so a later run can remove what a
/// killed one left (the runtime record stores it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TproxySpec {
    pub nft_table: String,
    pub mark: u32,
    pub table: u32,
    pub proxy_port: u16,
}

impl TproxySpec {
    pub fn new(iface: &str, mark: u32, table: u32, proxy_port: u16) -> Self {
        TproxySpec {
            nft_table: format!("tproxy_{iface}"),
            mark,
            table,
            proxy_port,
        }
    }
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

fn nft_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(
        format!(
            "nftables: {what} (is the nftables package installed and the nf_tproxy module available?)"
        ),
        std::io::Error::other(e.to_string()),
    )
}

fn nft_table(spec: &TproxySpec) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Owned(spec.nft_table.clone()),
        handle: None,
    })
}

fn install_nft(spec: &TproxySpec) -> Result<()> {
    let table: Cow<'static, str> = Cow::Owned(spec.nft_table.clone());
    let mut batch = Batch::new();
    batch.add(nft_table(spec));
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
    let rule = |expr: Vec<Statement<'static>>, comment: &'static str| {
        NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: table.clone(),
            chain: "prerouting".into(),
            expr: Cow::Owned(expr),
            comment: Some(comment.into()),
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
            "tproxy: steered flows to the proxy's transparent listener",
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
        "tproxy: proxy not listening",
    ));
    helper::apply_ruleset(&batch.to_nftables()).map_err(|e| nft_err("adding the tproxy table", e))
}

fn remove_nft(spec: &TproxySpec) -> Result<bool> {
    let mut batch = Batch::new();
    batch.delete(nft_table(spec));
    match helper::apply_ruleset(&batch.to_nftables()) {
        Ok(()) => Ok(true),
        Err(e) if e.to_string().contains("No such file") => Ok(false),
        Err(e) => Err(nft_err("removing the tproxy table", e)),
    }
}

fn rule_matches(m: &RuleMessage, spec: &TproxySpec) -> bool {
    let mut mark = None;
    let mut table = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::Table(v) => table = Some(*v),
            _ => {}
        }
    }
    mark == Some(spec.mark)
        && (table == Some(spec.table) || u32::from(m.header.table) == spec.table)
}

/// `local default dev lo table T`, for one family.
fn local_default_route(table: u32, v6: bool) -> netlink_packet_route::route::RouteMessage {
    use rtnetlink::RouteMessageBuilder;
    let mut msg = if v6 {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .build()
    } else {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
            .build()
    };
    msg.header.kind = RouteType::Local;
    msg.header.scope = RouteScope::Host;
    msg.header.protocol = RouteProtocol::Static;
    msg.attributes
        .push(netlink_packet_route::route::RouteAttribute::Oif(
            LOOPBACK_IFINDEX,
        ));
    msg.attributes
        .push(netlink_packet_route::route::RouteAttribute::Table(table));
    if table <= 255 {
        msg.header.table = table as u8;
    }
    msg
}

async fn install_routes(
    handle: rtnetlink::Handle,
    spec: TproxySpec,
) -> std::result::Result<(), rtnetlink::Error> {
    for v6 in [false, true] {
        handle
            .route()
            .add(local_default_route(spec.table, v6))
            .replace()
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

/// Removes our rules (by mark and table) and every route in our table.
/// Returns how many objects it removed.
async fn remove_routes(
    handle: rtnetlink::Handle,
    spec: TproxySpec,
) -> std::result::Result<usize, rtnetlink::Error> {
    let mut n = 0;
    for family in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(family.clone())
            .execute()
            .try_collect()
            .await?;
        for r in rules.into_iter().filter(|r| rule_matches(r, &spec)) {
            handle.rule().del(r).execute().await?;
            n += 1;
        }
        let filter = match family {
            rtnetlink::IpVersion::V4 => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(spec.table)
                .build(),
            rtnetlink::IpVersion::V6 => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(spec.table)
                .build(),
        };
        let routes: Vec<_> = handle.route().get(filter).execute().try_collect().await?;
        for r in routes {
            let in_table = r.attributes.iter().any(|a| {
                matches!(a, netlink_packet_route::route::RouteAttribute::Table(t) if *t == spec.table)
            }) || u32::from(r.header.table) == spec.table;
            let ours = in_table
                && (r.header.address_family == AddressFamily::Inet
                    || r.header.address_family == AddressFamily::Inet6);
            if ours {
                handle.route().del(r).execute().await?;
                n += 1;
            }
        }
    }
    Ok(n)
}

impl TproxyRouting {
    /// Installs rule, routes and nftables table; on any failure removes what
    /// it had added before returning the error.
    pub fn install(spec: TproxySpec) -> Result<TproxyRouting> {
        // Constructed first so that Drop cleans up a partial install.
        let owner = TproxyRouting { spec: spec.clone() };
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
        install_nft(&spec)?;
        debug!(?spec, "tproxy routing installed");
        Ok(owner)
    }

    pub fn spec(&self) -> &TproxySpec {
        &self.spec
    }

    /// Removes whatever of `spec` exists (also after a killed instance).
    pub fn remove(spec: &TproxySpec) -> usize {
        let mut n = 0;
        match remove_nft(spec) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => warn!("{e}"),
        }
        let s = spec.clone();
        match with_rtnetlink(async move |h| remove_routes(h, s).await) {
            Ok(k) => n += k,
            Err(e) => warn!("removing tproxy rules/routes: {e}"),
        }
        n
    }
}

impl Drop for TproxyRouting {
    fn drop(&mut self) {
        let n = TproxyRouting::remove(&self.spec);
        debug!("removed tproxy routing ({n} objects)");
    }
}
