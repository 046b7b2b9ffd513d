//! The intercepted port set: `8000`, `8000,8080`, `9000-9010`, or a mix.
use std::{fmt, str::FromStr};

use super::Error;

/// A set of TCP ports, kept sorted and merged into ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&port))
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(|&(lo, hi)| lo..=hi)
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    pub fn len(&self) -> usize {
        self.ranges
            .iter()
            .map(|&(lo, hi)| usize::from(hi - lo) + 1)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, Error> {
    let bad = |why: &str| Error::BadPorts(format!("{whole:?}: {why}"));
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty entry"));
    }
    let n: u32 = s
        .parse()
        .map_err(|_| bad(&format!("{s:?} is not a port number")))?;
    match n {
        0 => Err(bad("port 0 cannot be intercepted")),
        1..=65535 => Ok(n as u16),
        _ => Err(bad(&format!("{n} is above 65535"))),
    }
}

impl FromStr for PortSet {
    type Err = Error;

    fn from_str(whole: &str) -> Result<Self, Error> {
        if whole.trim().is_empty() {
            return Err(Error::BadPorts("the port list is empty".into()));
        }
        let mut ranges = Vec::new();
        for item in whole.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (parse_port(a, whole)?, parse_port(b, whole)?),
                None => {
                    let p = parse_port(item, whole)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(Error::BadPorts(format!(
                    "{whole:?}: range {lo}-{hi} runs backwards"
                )));
            }
            ranges.push((lo, hi));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(PortSet { ranges: merged })
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges() {
        let p: PortSet = "8000,8080,9000-9010".parse().unwrap();
        assert_eq!(p.ranges(), &[(8000, 8000), (8080, 8080), (9000, 9010)]);
        assert_eq!(p.len(), 13);
        assert!(p.contains(9005) && !p.contains(9011) && !p.contains(8001));
        assert_eq!(p.to_string(), "8000,8080,9000-9010");
    }

    #[test]
    fn merges_overlaps_and_neighbours() {
        let p: PortSet = "10-20, 15-25,26,5".parse().unwrap();
        assert_eq!(p.ranges(), &[(5, 5), (10, 26)]);
        assert_eq!(p.iter().count(), 18);
    }

    #[test]
    fn full_range() {
        let p: PortSet = "1-65535".parse().unwrap();
        assert_eq!(p.len(), 65535);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            " ",
            "0",
            "65536",
            "8000,",
            ",8000",
            "80-",
            "-80",
            "abc",
            "90-80",
            "1-70000",
            "8000;8080",
            "-1",
        ] {
            let err = bad.parse::<PortSet>().unwrap_err();
            assert!(matches!(err, Error::BadPorts(_)), "{bad:?} gave {err:?}");
        }
    }
}
