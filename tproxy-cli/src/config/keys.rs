//! How settings are read from YAML (a `--config` file, an agent target
//! file) and JSON (the agent API): each value is checked as it is read,
//! and a target's keys are read beside the keys of what holds it (a
//! `--config` file's run keys, an agent target's `netns`…), at one level.
//!
//! Both so that every error names its key, and in YAML its line and
//! column: serde_norway puts them on an error raised while it reads a key
//! or a value, not on one raised after. serde's `flatten` would put the
//! two sets of keys side by side, but it reads every value into a buffer
//! first (its errors lose their location) and cannot refuse unknown keys.
//! Here the target's derived `Deserialize` reads the mapping through
//! `Keys`: it hands the context's own keys to the [`Context`], and checks
//! every key while the format's deserializer reads it.
use std::{fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer, Serializer,
    de::{self, DeserializeSeed, IntoDeserializer as _, MapAccess, Visitor},
};

use super::{
    Error, PortSet, Target,
    options::{MAX_DRAIN_TIMEOUT, RESERVED_TABLES, parse_mark},
};

/// What holds a target: the keys it adds to the target's, and what it
/// makes of both.
pub trait Context: Default {
    /// What the whole mapping is, for a type error ("a tproxy config file").
    const EXPECTING: &'static str;
    /// Its own keys.
    const KEYS: &'static [&'static str];
    /// The target's keys it has no use for: refused as unknown ones.
    const REFUSED: &'static [&'static str] = &[];

    type Output;

    /// Reads the value of `key`, one of [`Self::KEYS`], from `map` (with
    /// `next_value` or `next_value_seed`).
    fn read<'de, A: MapAccess<'de>>(
        &mut self,
        key: &'static str,
        map: &mut A,
    ) -> Result<(), A::Error>;

    /// Both parts, once every key is read.
    fn finish<E: de::Error>(self, target: Target) -> Result<Self::Output, E>;
}

/// Reads a mapping of `C`'s keys and a target's (a `Deserialize` impl's
/// body).
pub fn read<'de, D: Deserializer<'de>, C: Context>(d: D) -> Result<C::Output, D::Error> {
    d.deserialize_map(Mapping::<C>(PhantomData))
}

struct Mapping<C>(PhantomData<C>);

impl<'de, C: Context> Visitor<'de> for Mapping<C> {
    type Value = C::Output;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(C::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<C::Output, A::Error> {
        let mut keys = Keys {
            map,
            context: C::default(),
            seen: 0,
        };
        let target = Target::deserialize(de::value::MapAccessDeserializer::new(&mut keys))?;
        keys.context.finish(target)
    }
}

/// The mapping as the target's derived `Deserialize` sees it: its own keys
/// only, the context's taken out on the way.
struct Keys<A, C> {
    map: A,
    context: C,
    /// The context's keys read so far, by index in `C::KEYS`.
    seen: u64,
}

impl<'de, A: MapAccess<'de>, C: Context> MapAccess<'de> for Keys<A, C> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            let key = self.map.next_key_seed(KeySeed {
                target: &mut seed,
                seen: &mut self.seen,
                context: PhantomData::<C>,
            })?;
            match key {
                None => return Ok(None),
                Some(Key::Target(key)) => return Ok(Some(key)),
                Some(Key::Own(key)) => self.context.read(key, &mut self.map)?,
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

enum Key<K> {
    /// One of the target's, as its derived `Deserialize` names it.
    Target(K),
    /// One of the context's.
    Own(&'static str),
}

/// Reads one key and sorts it, inside the format's deserializer: an
/// unknown, refused or repeated key is an error there, with its location.
struct KeySeed<'a, K, C> {
    /// The target's key reader; used once, for the first target key.
    target: &'a mut Option<K>,
    seen: &'a mut u64,
    context: PhantomData<C>,
}

impl<'de, K: DeserializeSeed<'de>, C: Context> DeserializeSeed<'de> for KeySeed<'_, K, C> {
    type Value = Key<K::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de, K: DeserializeSeed<'de>, C: Context> Visitor<'de> for KeySeed<'_, K, C> {
    type Value = Key<K::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a setting's name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if let Some(i) = C::KEYS.iter().position(|k| *k == key) {
            let bit = 1u64 << i;
            if *self.seen & bit != 0 {
                return Err(E::duplicate_field(C::KEYS[i]));
            }
            *self.seen |= bit;
            return Ok(Key::Own(C::KEYS[i]));
        }
        let target = target_keys();
        if C::REFUSED.contains(&key) || !target.contains(&key) {
            let expected: Vec<&str> = (target.iter())
                .filter(|k| !C::REFUSED.contains(k))
                .chain(C::KEYS)
                .copied()
                .collect();
            return Err(E::custom(format_args!(
                "unknown field `{key}`, expected one of {}",
                OneOf(&expected)
            )));
        }
        let seed = self
            .target
            .take()
            .expect("one target key per next_key_seed");
        seed.deserialize(key.into_deserializer()).map(Key::Target)
    }
}

/// `a`, `b`, `c` (as serde lists the fields it expected).
struct OneOf<'a>(&'a [&'a str]);

impl fmt::Display for OneOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{key}`")?;
        }
        Ok(())
    }
}

/// The target's keys, as its derived `Deserialize` knows them (it names
/// them in its error for a key it does not know): listed nowhere else.
pub fn target_keys() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Expected(&'static [&'static str]);
    impl de::Error for Expected {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Expected(&[])
        }
        fn unknown_field(_: &str, expected: &'static [&'static str]) -> Self {
            Expected(expected)
        }
    }
    impl fmt::Display for Expected {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "expected one of {}", OneOf(self.0))
        }
    }
    impl std::error::Error for Expected {}
    let probe = de::value::MapDeserializer::<_, Expected>::new(std::iter::once(("", ())));
    match Target::deserialize(probe) {
        Err(Expected(keys)) => keys,
        Ok(_) => &[],
    }
}

// Readers of the values that need more than their type's own checks. The
// messages read after the key, which serde_norway puts first. A null (`~`,
// an empty value, JSON `null`) is a key left out, as for every other key.

/// A scalar as the format gave it, for the checks below.
pub enum Scalar<'a> {
    Int(i128),
    Str(&'a str),
}

/// Reads a scalar and checks it inside the visitor: an error raised there
/// gets the key, line and column from serde_norway; one raised after the
/// value is read would get neither. Also a seed, for a [`Context::read`].
pub struct Checked<T> {
    pub expecting: &'static str,
    pub check: fn(Scalar) -> Result<T, String>,
}

impl<T> Visitor<'_> for Checked<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<T>, E> {
        (self.check)(Scalar::Int(n.into()))
            .map(Some)
            .map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<T>, E> {
        (self.check)(Scalar::Int(n.into()))
            .map(Some)
            .map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<T>, E> {
        (self.check)(Scalar::Str(s)).map(Some).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
}

impl<'de, T> DeserializeSeed<'de> for Checked<T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_any(self)
    }
}

pub fn iface<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    const EXPECTING: &str = "an interface name";
    Checked {
        expecting: EXPECTING,
        check: |v| match v {
            // IFNAMSIZ is 16 with the terminating NUL.
            Scalar::Str(name)
                if !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\0']) =>
            {
                Ok(name.to_string())
            }
            Scalar::Str(name) => Err(format!(
                "{name:?} is not an interface name (1-15 characters, no '/' or space)"
            )),
            Scalar::Int(n) => Err(format!("invalid type: integer `{n}`, expected {EXPECTING}")),
        },
    }
    .deserialize(d)
}

/// `8000`, `"8000,9000-9010"`, or a list of numbers and such strings.
pub fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PortSet>, D::Error> {
    d.deserialize_any(PortsVisitor)
}

/// On the wire as one string, `"8000,9000-9010"`.
pub fn ports_str<S: Serializer>(ports: &Option<PortSet>, s: S) -> Result<S::Ok, S::Error> {
    match ports {
        Some(p) => s.collect_str(p),
        None => s.serialize_none(),
    }
}

struct PortsVisitor;

const PORTS_EXPECTED: &str = "a port list: 8000, \"8000,9000-9010\" or [8000, \"9000-9010\"]";

fn port_set<E: de::Error>(list: &str) -> Result<Option<PortSet>, E> {
    list.parse().map(Some).map_err(|e| match e {
        Error::BadPorts(why) => E::custom(format!(
            "bad port list {why}; write {PORTS_EXPECTED} (ports 1-65535)"
        )),
        other => E::custom(other),
    })
}

impl<'de> Visitor<'de> for PortsVisitor {
    type Value = Option<PortSet>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PORTS_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        port_set(s)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        port_set(&n.to_string())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        port_set(&n.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(PortItem(item)) = seq.next_element()? {
            items.push(item);
        }
        port_set(&items.join(","))
    }
}

/// One entry of a port list: a number or a string such as "9000-9010".
struct PortItem(String);

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port or a range (8000 or \"9000-9010\")")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortItem, E> {
                Ok(PortItem(s.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortItem, E> {
                Ok(PortItem(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortItem, E> {
                Ok(PortItem(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    const EXPECTING: &str = "a port (1-65535)";
    Checked {
        expecting: EXPECTING,
        check: |v| match v {
            Scalar::Int(n) => match u16::try_from(n) {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("port {n} is out of range: ports are 1-65535")),
            },
            Scalar::Str(s) => Err(format!("invalid type: string {s:?}, expected {EXPECTING}")),
        },
    }
    .deserialize(d)
}

/// A 32-bit value as a number (`0x539` too) or a string ("0x539", "1337").
fn u32_value(v: Scalar, what: &str) -> Result<u32, String> {
    match v {
        Scalar::Int(n) => {
            u32::try_from(n).map_err(|_| format!("{n} is not a 32-bit {what} (0 to 0xffffffff)"))
        }
        Scalar::Str(s) => parse_mark(s.trim()),
    }
}

pub fn mark<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Checked {
        expecting: "a 32-bit mark (decimal or \"0x…\" hex)",
        check: |v| match u32_value(v, "mark")? {
            0 => Err("a mark must be non-zero: marks are how tproxy tells traffic apart".into()),
            m => Ok(m),
        },
    }
    .deserialize(d)
}

pub fn route_table<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Checked {
        expecting: "a routing table id (decimal or \"0x…\" hex)",
        check: |v| {
            let table = u32_value(v, "routing table id")?;
            if RESERVED_TABLES.contains(&table) {
                return Err(format!(
                    "table {table} is reserved (0 unspec, 253 default, 254 main, 255 local); choose an unused table (e.g. 100) or leave route_table out to have one picked"
                ));
            }
            Ok(table)
        },
    }
    .deserialize(d)
}

/// The run's drain timeout, in seconds (a [`Context::read`] seed).
pub const DRAIN_TIMEOUT: Checked<u64> = Checked {
    expecting: "seconds (0 to 86400)",
    check: |v| match v {
        Scalar::Int(n) => match u64::try_from(n) {
            Ok(s) if s <= MAX_DRAIN_TIMEOUT => Ok(s),
            _ => Err(format!(
                "{n} s is out of range: 0 (stop at once) to {MAX_DRAIN_TIMEOUT} s (a day)"
            )),
        },
        Scalar::Str(s) => Err(format!(
            "invalid type: string {s:?}, expected seconds (0 to 86400)"
        )),
    },
};
