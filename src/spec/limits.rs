//! Size guards applied before a pipeline's YAML becomes a tree.
//!
//! serde_yaml bounds nesting depth (128) and the number of alias jumps (100 per event), but
//! not what the aliases expand to: one anchored list of n items aliased n times is n^2 nodes,
//! and nested anchors (the "billion laughs") grow exponentially within the jump limit. A first
//! pass deserializes into nothing, counting nodes as aliases replay them, and stops at
//! [`MAX_NODES`]: its cost is bounded by that count, and it allocates nothing.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// Most YAML nodes (scalars, lists, maps) a pipeline may hold once aliases are expanded.
/// The shipped pipelines hold a few hundred; a generated sweep of 100,000 values fits.
pub const MAX_NODES: usize = 1_000_000;

/// Errors (with serde_yaml's line and column of the node where the count ran out) when the
/// document expands to more than [`MAX_NODES`] nodes; also reports what `from_str` would
/// (syntax errors, a second document), so the caller may map errors once.
pub fn check_size(source: &str) -> Result<(), serde_yaml::Error> {
    check_size_with(source, MAX_NODES)
}

fn check_size_with(source: &str, max: usize) -> Result<(), serde_yaml::Error> {
    let left = Cell::new(max);
    Budget { left: &left, max }.deserialize(serde_yaml::Deserializer::from_str(source))
}

#[derive(Clone, Copy)]
struct Budget<'a> {
    left: &'a Cell<usize>,
    max: usize,
}

impl Budget<'_> {
    fn take<E: de::Error>(self) -> Result<(), E> {
        match self.left.get() {
            0 => Err(E::custom(format!(
                "the document expands to more than {} YAML nodes (aliases counted as often as they are used); \
                 is this an alias bomb?",
                self.max
            ))),
            n => {
                self.left.set(n - 1);
                Ok(())
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! scalars {
    ($($f:ident: $t:ty),*) => {
        $(fn $f<E: de::Error>(self, _: $t) -> Result<(), E> { self.take() })*
    };
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128, visit_f64: f64,
             visit_char: char, visit_str: &str, visit_bytes: &[u8]);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.take()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.take()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        self.take()?;
        while a.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        self.take()?;
        while a.next_key_seed(self)?.is_some() {
            a.next_value_seed(self)?;
        }
        Ok(())
    }
    /// A tagged value (`!tag value`): the tag, then the value.
    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        self.take()?;
        let ((), v) = a.variant_seed(self)?;
        v.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten levels of ten aliases each: 10^10 nodes if expanded.
    fn billion_laughs() -> String {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
        }
        s
    }

    #[test]
    fn alias_bombs_stop_at_the_budget_with_a_location() {
        let t = std::time::Instant::now();
        // serde_yaml's own jump limit stops this one (without a location: `parse` finds one).
        let e = check_size(&billion_laughs()).expect_err("a bomb");
        assert!(e.to_string().contains("repetition limit exceeded"), "{e}");
        // Quadratic: one list of 2,000 items aliased 2,000 times (4 million nodes).
        let items = vec!["1"; 2000].join(", ");
        let uses = vec!["*l"; 2000].join(", ");
        let e = check_size(&format!("l: &l [{items}]\nm: [{uses}]\n")).expect_err("quadratic");
        assert!(e.to_string().contains("alias bomb"), "{e}");
        // Where the count ran out: inside the anchored list that the aliases replay.
        assert!(e.location().is_some(), "{e}");
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    }

    #[test]
    fn ordinary_documents_pass_and_count_tags() {
        check_size("name: x\nd: &d {a: 1}\ne: *d\nt: !tag [1, 2]\n").expect("fits");
        // The map, its key, the list and its items.
        assert!(check_size_with("a: [1, 2, 3]\n", 6).is_ok());
        assert!(check_size_with("a: [1, 2, 3, 4]\n", 6).is_err());
        assert!(check_size("a: 1\n---\nb: 2\n").is_err());
    }
}
