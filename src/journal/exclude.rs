//! Exclusion rules: globs over paths relative to the mount root whose files are
//! served normally but never journaled or replicated.
//!
//! A pattern without '/' matches a name at any depth (`*.swap`); a pattern with
//! '/' matches from the root (`scratch/**`). `*` never crosses '/', `**` does.
//! A path is excluded when it or any of its ancestors matches.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, Clone)]
pub struct Exclusions {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Default for Exclusions {
    fn default() -> Self {
        Exclusions::new(&[]).expect("the empty rule set is valid")
    }
}

impl Exclusions {
    pub fn new(patterns: &[String]) -> Result<Exclusions, String> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            if p.is_empty() {
                return Err("empty exclusion pattern".into());
            }
            let anchored = p.trim_start_matches('/');
            let glob = if anchored.contains('/') {
                anchored.to_string()
            } else {
                format!("**/{anchored}")
            };
            let g = GlobBuilder::new(&glob)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("bad exclusion pattern {p:?}: {e}"))?;
            builder.add(g);
        }
        let set = builder
            .build()
            .map_err(|e| format!("bad exclusion patterns: {e}"))?;
        Ok(Exclusions {
            patterns: patterns.to_vec(),
            set,
        })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `rel` (relative to the mount root, no leading '/') or an ancestor is excluded.
    pub fn is_excluded(&self, rel: &[u8]) -> bool {
        if self.patterns.is_empty() || rel.is_empty() {
            return false;
        }
        let path = String::from_utf8_lossy(rel);
        for (i, c) in path.char_indices() {
            if c == '/' && i > 0 && self.set.is_match(&path[..i]) {
                return true;
            }
        }
        self.set.is_match(path.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Exclusions {
        Exclusions::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn basename_patterns_match_at_any_depth() {
        let e = ex(&["*.swap", "**/pagefile*"]);
        assert!(e.is_excluded(b"a.swap"));
        assert!(e.is_excluded(b"vm/b.swap"));
        assert!(e.is_excluded(b"vm/win/pagefile.vhdx"));
        assert!(e.is_excluded(b"pagefile.sys"));
        assert!(!e.is_excluded(b"vm/disk.img"));
        assert!(!e.is_excluded(b"swap"));
    }

    #[test]
    fn anchored_patterns_and_ancestors() {
        let e = ex(&["scratch/**", "tmp"]);
        assert!(e.is_excluded(b"scratch/x"));
        assert!(e.is_excluded(b"scratch/a/b"));
        assert!(!e.is_excluded(b"vm/scratch/x"));
        assert!(e.is_excluded(b"tmp"));
        assert!(e.is_excluded(b"tmp/inside/file"));
        assert!(e.is_excluded(b"a/tmp/file"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Exclusions::new(&["a[".to_string()]).is_err());
        assert!(Exclusions::new(&[String::new()]).is_err());
    }
}
