//! Dependency tracking: a function's version folds in the versions of the functions it calls.
//!
//! Each tracked function (`#[memo::track]`, and every free `#[cached]` function) has a static
//! [`DepNode`]: the hash of its own tokens and the nodes of its declared dependencies. The
//! effective version of a cached function is BLAKE3 over the set of the paths and own-hashes
//! reachable from it. A set, so the result does not depend on the order the functions are first
//! called in, and cycles (helpers that call each other) are fine; with the paths, so that calling
//! `v2::weights` instead of a `v1::weights` of the same text is a new version.

use std::collections::BTreeSet;

/// One tracked function, as the macros record it.
#[derive(Debug)]
pub struct DepNode {
    /// The function's path (part of the versions of the functions that depend on it).
    pub name: &'static str,
    /// The hash of the function's own tokens (64 hex digits).
    pub own: &'static str,
    /// The nodes of the functions it declares as dependencies.
    pub deps: &'static [fn() -> &'static DepNode],
}

/// The version of a function with own-hash `own` and dependencies `deps`: `own` itself when
/// there are none, else 64 hex digits of BLAKE3 over `own` and the sorted paths and own-hashes
/// of everything reachable.
pub fn combined_version(own: &'static str, deps: &[fn() -> &'static DepNode]) -> String {
    if deps.is_empty() {
        return own.to_owned();
    }
    let mut owns = BTreeSet::from([("", own)]);
    let mut visited: BTreeSet<usize> = BTreeSet::new();
    let mut stack: Vec<&'static DepNode> = deps.iter().map(|node| node()).collect();
    while let Some(node) = stack.pop() {
        if !visited.insert(node as *const DepNode as usize) {
            continue;
        }
        owns.insert((node.name, node.own));
        stack.extend(node.deps.iter().map(|dep| dep()));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"memo dependency version v2\0");
    for (name, hash) in owns {
        hasher.update(name.as_bytes());
        hasher.update(b"\0");
        hasher.update(hash.as_bytes());
        hasher.update(b"\0");
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    static A: DepNode = DepNode {
        name: "a",
        own: "aaaa",
        deps: &[b as fn() -> &'static DepNode],
    };
    static B: DepNode = DepNode {
        name: "b",
        own: "bbbb",
        deps: &[a as fn() -> &'static DepNode, c as fn() -> &'static DepNode],
    };
    static C: DepNode = DepNode {
        name: "c",
        own: "cccc",
        deps: &[],
    };
    static C2: DepNode = DepNode {
        name: "c",
        own: "cc22",
        deps: &[],
    };

    fn a() -> &'static DepNode {
        &A
    }
    fn b() -> &'static DepNode {
        &B
    }
    fn c() -> &'static DepNode {
        &C
    }
    fn c2() -> &'static DepNode {
        &C2
    }

    /// `c`'s text in another module.
    static ELSEWHERE: DepNode = DepNode {
        name: "other::c",
        own: "cccc",
        deps: &[],
    };

    fn elsewhere() -> &'static DepNode {
        &ELSEWHERE
    }

    #[test]
    fn without_dependencies_the_version_is_the_own_hash() {
        assert_eq!(combined_version("ffff", &[]), "ffff");
    }

    #[test]
    fn transitive_dependencies_count_and_cycles_end() {
        // f -> a -> b -> (a, c): a cycle between a and b.
        let through_a = combined_version("ffff", &[a]);
        let through_b = combined_version("ffff", &[b]);
        assert_eq!(
            through_a, through_b,
            "the same reachable set, whatever the order"
        );
        assert_ne!(through_a, combined_version("ffff", &[c]));
        assert_eq!(through_a.len(), 64);
    }

    #[test]
    fn a_changed_dependency_changes_the_version() {
        assert_ne!(
            combined_version("ffff", &[c]),
            combined_version("ffff", &[c2])
        );
        assert_ne!(
            combined_version("ffff", &[c]),
            combined_version("eeee", &[c])
        );
    }

    #[test]
    fn a_dependency_of_the_same_text_in_another_module_changes_the_version() {
        assert_ne!(
            combined_version("ffff", &[c]),
            combined_version("ffff", &[elsewhere])
        );
    }
}
