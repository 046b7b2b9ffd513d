//! What a removal did, object by object: the report every removal path
//! (tc filters, the qdisc, routing, records) returns.
use std::fmt;

/// One object removed, described for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub kind: RemovedKind,
    pub what: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovedKind {
    TcFilter,
    Qdisc,
    /// A fwmark rule, a local route or the nftables table.
    Routing,
    Record,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

/// What a removal did: the objects removed, and those that should have
/// gone and did not (one line each).
#[derive(Debug, Default)]
pub struct Removal {
    pub removed: Vec<Removed>,
    pub failed: Vec<String>,
}

impl Removal {
    pub(crate) fn push(&mut self, kind: RemovedKind, what: String) {
        self.removed.push(Removed { kind, what });
    }

    pub fn extend(&mut self, other: Removal) {
        self.removed.extend(other.removed);
        self.failed.extend(other.failed);
    }

    pub fn count(&self, kind: RemovedKind) -> usize {
        self.removed.iter().filter(|r| r.kind == kind).count()
    }
}
