//! Key selection: which entries of a checkpoint a merge averages, copies, keeps or leaves out.
//!
//! Framework checkpoints hold far more than model weights: torchtitan puts `optimizer.*`,
//! `lr_scheduler`, `dataloader` and `train_state` beside the model FQNs, Megatron adds
//! `_extra_state` objects, and every bytes item is opaque. [`select_keys`] decides, entry by
//! entry, one [`Action`] and a reason, and returns a [`KeySelection`] that `--dry-run` prints
//! grouped by key prefix. The rule, in order:
//!
//! 1. **`--exclude` wins.** An entry matched by any exclude glob is left out, whatever else
//!    matches it (even with `--keep-state newest`).
//! 2. **Model weights by default.** A model entry ([`EntryRole::Model`], from
//!    [`pma_format::classify_key`]) that is a float tensor is merged; a non-float model tensor
//!    is copied and must be identical in every member, as for safetensors today.
//! 3. **`--include` adds float training-state tensors.** Includes add to the default; they do
//!    not restrict it (use `--exclude` for that). A float training-state tensor matched by an
//!    include glob is merged, with one exception: **optimizer state** (first key component,
//!    after a leading `model.`, is `optimizer`, `optimizers` or `optim`) is merged only by an
//!    include whose literal prefix (the text before its first `*`, `?`, `[`, `{` or `\`), after
//!    an optional `model.`, starts with `optim`. So `--include 'optimizer.*'` or
//!    `--include 'optim*'` merges optimizer state, while `--include '*'` or
//!    `--include '*.exp_avg'` does not: averaging Adam moments must be asked for by name.
//! 4. **Never averaged:** bytes items (dataloader, train state, pickled objects) and non-float
//!    training-state tensors (step counters differ between members, so "identical in every
//!    member" would fail) keep the default of rule 5 even when an include matches them; the
//!    reason says so.
//! 5. **Everything else** (training state not selected above) is left out, or with
//!    `--keep-state newest` copied verbatim from the newest member.
//!
//! Each include glob must select at least one entry (merge or copy); one that selects nothing is
//! an error ([`Error::IncludeSelectsNothing`]) naming what it matched instead, so a typo cannot
//! silently merge nothing. An exclude glob that matches nothing is a warning in the report.
//! Globs use [`globset`] syntax (`*`, `?`, `[...]`, `{a,b}`), case-sensitive, on whole keys;
//! `*` crosses `.`.

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobMatcher};
use pma_format::dtype::{classify, DtypeClass};
use pma_format::{classify_key, DcpEntry, Dtype, EntryRole, StoreEntry};
use serde::Serialize;

use crate::error::{Error, Result};

/// What an entry is, as far as selection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A tensor of a float dtype (bf16, f16, f32, f64): can be averaged.
    FloatTensor,
    /// A tensor of any other dtype: can only be copied.
    OtherTensor,
    /// An opaque bytes item (DCP `BytesStorageMetadata`): never averaged.
    Bytes,
}

impl EntryKind {
    /// The kind of a tensor of `dtype`.
    pub fn of_dtype(dtype: Dtype) -> EntryKind {
        match classify(dtype) {
            DtypeClass::Float(_) => EntryKind::FloatTensor,
            _ => EntryKind::OtherTensor,
        }
    }
}

/// One entry of a member, as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key (tensor name or DCP FQN).
    pub name: String,
    /// Float tensor, other tensor or bytes item.
    pub kind: EntryKind,
    /// Model weight or training state.
    pub role: EntryRole,
}

impl KeyEntry {
    /// A tensor entry, its role from [`classify_key`].
    pub fn tensor(name: &str, dtype: Dtype) -> KeyEntry {
        KeyEntry {
            name: name.to_string(),
            kind: EntryKind::of_dtype(dtype),
            role: classify_key(name),
        }
    }

    /// An entry of any checkpoint, as [`pma_format::AnyCheckpoint::entries`] lists it (a
    /// bytes item, with no dtype, is always training state).
    pub fn from_store(entry: &StoreEntry) -> KeyEntry {
        match entry.dtype {
            Some(dtype) => KeyEntry {
                name: entry.name.clone(),
                kind: EntryKind::of_dtype(dtype),
                role: entry.role,
            },
            None => KeyEntry {
                name: entry.name.clone(),
                kind: EntryKind::Bytes,
                role: EntryRole::TrainingState,
            },
        }
    }

    /// An entry of a DCP checkpoint (bytes entries are always training state).
    pub fn from_dcp(entry: &DcpEntry) -> KeyEntry {
        match entry {
            DcpEntry::Tensor(t) => KeyEntry {
                name: t.fqn.clone(),
                kind: EntryKind::of_dtype(t.dtype),
                role: t.role,
            },
            DcpEntry::Bytes(b) => KeyEntry {
                name: b.fqn.clone(),
                kind: EntryKind::Bytes,
                role: EntryRole::TrainingState,
            },
        }
    }
}

/// What the merge does with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Averaged over the members (f64, oldest to newest).
    Merge,
    /// Copied exactly; must be identical in every member (taken from the newest).
    Copy,
    /// Copied verbatim from the newest member only (`--keep-state newest`).
    KeepNewest,
    /// Not written to the output.
    LeaveOut,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Merge => "merges",
            Action::Copy => "copies",
            Action::KeepNewest => "keeps from the newest",
            Action::LeaveOut => "leaves out",
        }
    }
}

/// The user's key-selection options. Plain data; [`select_keys`] validates it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySelectionConfig {
    /// `--include GLOB` (repeatable): float training-state tensors to merge too.
    pub include: Vec<String>,
    /// `--exclude GLOB` (repeatable): entries to leave out, whatever else matches.
    pub exclude: Vec<String>,
    /// `--keep-state newest`: copy training state from the newest member instead of leaving it
    /// out.
    pub keep_state_newest: bool,
}

/// The decision for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDecision {
    /// The key.
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// What the merge does with it.
    pub action: Action,
    /// Why, in a few words (shown by `--dry-run`).
    pub reason: String,
}

/// Entries with the same action, key prefix and reason, for a compact `--dry-run` listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyGroup {
    /// What the merge does with them.
    pub action: Action,
    /// Their shared prefix: the first key component, as `optimizer.*`, or the whole key.
    pub prefix: String,
    /// How many entries.
    pub count: usize,
    /// Why.
    pub reason: String,
}

/// The result of [`select_keys`]: one decision per entry, in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySelection {
    /// Per-entry decisions, in the order the entries were given.
    pub decisions: Vec<KeyDecision>,
    /// Non-fatal findings (an exclude glob that matches nothing).
    pub warnings: Vec<String>,
}

impl KeySelection {
    /// The decision for `name`, if it was an entry.
    pub fn decision(&self, name: &str) -> Option<&KeyDecision> {
        self.decisions.iter().find(|d| d.name == name)
    }

    /// How many entries get `action`.
    pub fn count(&self, action: Action) -> usize {
        self.decisions.iter().filter(|d| d.action == action).count()
    }

    /// Names of the entries that get `action`, in input order.
    pub fn names(&self, action: Action) -> impl Iterator<Item = &str> {
        self.decisions
            .iter()
            .filter(move |d| d.action == action)
            .map(|d| d.name.as_str())
    }

    /// Decisions grouped by action, key prefix and reason; ordered by action, then prefix.
    pub fn groups(&self) -> Vec<KeyGroup> {
        let mut groups: BTreeMap<(Action, String, String), usize> = BTreeMap::new();
        for d in &self.decisions {
            *groups
                .entry((d.action, group_prefix(&d.name), d.reason.clone()))
                .or_default() += 1;
        }
        groups
            .into_iter()
            .map(|((action, prefix, reason), count)| KeyGroup {
                action,
                prefix,
                count,
                reason,
            })
            .collect()
    }
}

/// The key decisions as `--dry-run` shows them: counts per action and the grouped listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeySummary {
    /// Entries averaged.
    pub merged: usize,
    /// Non-float entries copied (identical in every member).
    pub copied: usize,
    /// Entries copied verbatim from the newest member (`--keep-state newest`).
    pub kept_newest: usize,
    /// Entries not written.
    pub left_out: usize,
    /// Decisions grouped by action, key prefix and reason ([`KeySelection::groups`]).
    pub groups: Vec<KeyGroup>,
    /// Non-fatal findings (an exclude glob that matches nothing).
    pub warnings: Vec<String>,
}

impl KeySelection {
    /// Counts and groups, for plans and reports.
    pub fn summary(&self) -> KeySummary {
        KeySummary {
            merged: self.count(Action::Merge),
            copied: self.count(Action::Copy),
            kept_newest: self.count(Action::KeepNewest),
            left_out: self.count(Action::LeaveOut),
            groups: self.groups(),
            warnings: self.warnings.clone(),
        }
    }
}

/// One line per action: "merges 290 tensors: layers.* (288, model weight), ...".
impl fmt::Display for KeySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "merges {} tensors, copies {}, keeps {} from the newest, leaves out {}",
            self.merged, self.copied, self.kept_newest, self.left_out
        )?;
        for action in [
            Action::Merge,
            Action::Copy,
            Action::KeepNewest,
            Action::LeaveOut,
        ] {
            let listed: Vec<String> = self
                .groups
                .iter()
                .filter(|g| g.action == action)
                .map(|g| format!("{} ({}, {})", g.prefix, g.count, g.reason))
                .collect();
            if !listed.is_empty() {
                write!(f, "\n  {}: {}", action.verb(), listed.join(", "))?;
            }
        }
        for w in &self.warnings {
            write!(f, "\n  warning: {w}")?;
        }
        Ok(())
    }
}

/// [`KeySummary`]'s listing.
impl fmt::Display for KeySelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.summary().fmt(f)
    }
}

/// `optimizer.state.x` → `optimizer.*`; `lr_scheduler` → `lr_scheduler`. A leading `model.`
/// stays part of the prefix (`model.layers.*`), so accelerate keys group usefully.
fn group_prefix(name: &str) -> String {
    let (head, rest) = match name.strip_prefix("model.") {
        Some(rest) => ("model.", rest),
        None => ("", name),
    };
    match rest.split_once('.') {
        Some((first, _)) => format!("{head}{first}.*"),
        None => name.to_string(),
    }
}

/// Whether `name` is optimizer state: its first component (after `model.`) is an optimizer's.
pub fn is_optimizer_key(name: &str) -> bool {
    let key = name.strip_prefix("model.").unwrap_or(name);
    let first = key.split(['.', '/']).next().unwrap_or(key);
    matches!(first, "optimizer" | "optimizers" | "optim")
}

/// Whether an include glob names optimizer state explicitly: its literal prefix (before the
/// first glob metacharacter), after an optional `model.`, starts with `optim`.
fn names_optimizer(pattern: &str) -> bool {
    let literal = pattern
        .split(['*', '?', '[', '{', '\\'])
        .next()
        .unwrap_or("");
    let literal = literal.strip_prefix("model.").unwrap_or(literal);
    literal.starts_with("optim")
}

struct Pattern {
    text: String,
    matcher: GlobMatcher,
    names_optimizer: bool,
}

fn compile(flag: &'static str, patterns: &[String]) -> Result<Vec<Pattern>> {
    patterns
        .iter()
        .map(|p| {
            let glob = Glob::new(p).map_err(|e| Error::InvalidGlob {
                flag,
                pattern: p.clone(),
                reason: e.kind().to_string(),
            })?;
            Ok(Pattern {
                text: p.clone(),
                matcher: glob.compile_matcher(),
                names_optimizer: names_optimizer(p),
            })
        })
        .collect()
}

/// What one include glob matched but could not select, for its error message.
#[derive(Default)]
struct Unselectable {
    optimizer: usize,
    bytes: usize,
    non_float_state: usize,
}

/// Decides an [`Action`] for every entry; see the module docs for the rule.
pub fn select_keys(entries: &[KeyEntry], config: &KeySelectionConfig) -> Result<KeySelection> {
    let includes = compile("--include", &config.include)?;
    let excludes = compile("--exclude", &config.exclude)?;
    let mut include_selected = vec![0usize; includes.len()];
    let mut include_blocked: Vec<Unselectable> =
        includes.iter().map(|_| Unselectable::default()).collect();
    let mut exclude_hits = vec![0usize; excludes.len()];
    let state_action = if config.keep_state_newest {
        Action::KeepNewest
    } else {
        Action::LeaveOut
    };
    let state_verb = if config.keep_state_newest {
        "training state, --keep-state newest"
    } else {
        "training state"
    };

    let mut decisions = Vec::with_capacity(entries.len());
    for e in entries {
        let excluded_by = excludes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.matcher.is_match(&e.name))
            .map(|(i, _)| i)
            .collect::<Vec<_>>();
        for &i in &excluded_by {
            exclude_hits[i] += 1;
        }
        let (action, reason) = if let Some(&i) = excluded_by.first() {
            (
                Action::LeaveOut,
                format!("--exclude '{}'", excludes[i].text),
            )
        } else {
            let optimizer = is_optimizer_key(&e.name);
            // Which include globs match, and which of those may select this entry.
            let mut matched_by = None;
            for (i, p) in includes.iter().enumerate() {
                if !p.matcher.is_match(&e.name) {
                    continue;
                }
                let blocked = &mut include_blocked[i];
                let selectable = match e.kind {
                    EntryKind::Bytes => {
                        blocked.bytes += 1;
                        false
                    }
                    EntryKind::OtherTensor if e.role == EntryRole::TrainingState => {
                        blocked.non_float_state += 1;
                        false
                    }
                    _ if optimizer && !p.names_optimizer => {
                        blocked.optimizer += 1;
                        false
                    }
                    _ => true,
                };
                if selectable {
                    include_selected[i] += 1;
                    matched_by.get_or_insert(i);
                }
            }
            match (e.kind, e.role, matched_by) {
                (EntryKind::FloatTensor, EntryRole::Model, _) => {
                    (Action::Merge, "model weight".to_string())
                }
                (EntryKind::OtherTensor, EntryRole::Model, _) => (
                    Action::Copy,
                    "non-float model tensor, identical in every member".to_string(),
                ),
                (EntryKind::FloatTensor, EntryRole::TrainingState, Some(i)) => {
                    (Action::Merge, format!("--include '{}'", includes[i].text))
                }
                (EntryKind::Bytes, _, _) => (
                    state_action,
                    format!("bytes item, never averaged ({state_verb})"),
                ),
                (EntryKind::OtherTensor, _, _) => (state_action, format!("non-float {state_verb}")),
                (EntryKind::FloatTensor, EntryRole::TrainingState, None) if optimizer => (
                    state_action,
                    format!("optimizer {state_verb}; merge it with --include 'optimizer.*'"),
                ),
                (EntryKind::FloatTensor, EntryRole::TrainingState, None) => {
                    (state_action, state_verb.to_string())
                }
            }
        };
        decisions.push(KeyDecision {
            name: e.name.clone(),
            kind: e.kind,
            action,
            reason,
        });
    }

    for (i, p) in includes.iter().enumerate() {
        if include_selected[i] > 0 {
            continue;
        }
        let b = &include_blocked[i];
        let mut found = Vec::new();
        if b.optimizer > 0 {
            found.push(format!(
                "{} optimizer keys (optimizer state is merged only by an include that starts with 'optim', e.g. 'optimizer.*')",
                b.optimizer
            ));
        }
        if b.bytes > 0 {
            found.push(format!("{} bytes items (never averaged)", b.bytes));
        }
        if b.non_float_state > 0 {
            found.push(format!(
                "{} non-float training-state tensors (never averaged)",
                b.non_float_state
            ));
        }
        let detail = if found.is_empty() {
            format!("it matches none of the {} keys", entries.len())
        } else {
            format!("it matches only {}", found.join(" and "))
        };
        return Err(Error::IncludeSelectsNothing {
            pattern: p.text.clone(),
            detail,
        });
    }
    let warnings = excludes
        .iter()
        .zip(&exclude_hits)
        .filter(|(_, &hits)| hits == 0)
        .map(|(p, _)| format!("--exclude '{}' matches no key", p.text))
        .collect();
    Ok(KeySelection {
        decisions,
        warnings,
    })
}

/// A file of pma-format's DCP fixtures (`run-fsdp2/step-0000100`), for this crate's unit tests.
#[cfg(test)]
pub(crate) fn dcp_fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pma-format/tests/fixtures/dcp")
        .join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use pma_format::DcpCheckpoint;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures")
            .join(name)
    }

    fn dcp_entries(dir: &str) -> Vec<KeyEntry> {
        let ckpt = DcpCheckpoint::open(&fixture(dir)).expect("fixture opens");
        ckpt.entries().iter().map(KeyEntry::from_dcp).collect()
    }

    fn config(include: &[&str], exclude: &[&str], keep: bool) -> KeySelectionConfig {
        KeySelectionConfig {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            keep_state_newest: keep,
        }
    }

    /// A torchtitan-like member: weights beside optimizer moments, a scheduler, a step counter
    /// and a dataloader bytes item.
    fn titan() -> Vec<KeyEntry> {
        let bytes = |n: &str| KeyEntry {
            name: n.to_string(),
            kind: EntryKind::Bytes,
            role: EntryRole::TrainingState,
        };
        vec![
            KeyEntry::tensor("tok_embeddings.weight", Dtype::BF16),
            KeyEntry::tensor("layers.0.attention.wq.weight", Dtype::BF16),
            KeyEntry::tensor("layers.0.attention.rope.inv_freq", Dtype::F32),
            KeyEntry::tensor("position_ids", Dtype::I64),
            KeyEntry::tensor("optimizer.state.tok_embeddings.weight.exp_avg", Dtype::F32),
            KeyEntry::tensor("optimizer.state.tok_embeddings.weight.step", Dtype::F32),
            KeyEntry::tensor("lr_scheduler.base_lr", Dtype::F32),
            KeyEntry::tensor("train_state.step", Dtype::I64),
            bytes("dataloader.dp_rank_0"),
            bytes("lr_scheduler.state"),
        ]
    }

    fn action(s: &KeySelection, name: &str) -> Action {
        s.decision(name).expect("entry has a decision").action
    }

    #[test]
    fn default_merges_model_weights_only() {
        let s = select_keys(&titan(), &KeySelectionConfig::default()).unwrap();
        assert_eq!(
            s.names(Action::Merge).collect::<Vec<_>>(),
            [
                "tok_embeddings.weight",
                "layers.0.attention.wq.weight",
                "layers.0.attention.rope.inv_freq"
            ]
        );
        assert_eq!(s.names(Action::Copy).collect::<Vec<_>>(), ["position_ids"]);
        assert_eq!(s.count(Action::LeaveOut), 6);
        assert_eq!(s.count(Action::KeepNewest), 0);
    }

    #[test]
    fn keep_state_keeps_training_state_from_the_newest() {
        let s = select_keys(&titan(), &config(&[], &[], true)).unwrap();
        assert_eq!(s.count(Action::Merge), 3);
        assert_eq!(s.count(Action::KeepNewest), 6);
        assert_eq!(action(&s, "dataloader.dp_rank_0"), Action::KeepNewest);
    }

    #[test]
    fn star_include_does_not_pull_in_optimizer_state() {
        let s = select_keys(&titan(), &config(&["*"], &[], false)).unwrap();
        assert_eq!(action(&s, "lr_scheduler.base_lr"), Action::Merge);
        for k in [
            "optimizer.state.tok_embeddings.weight.exp_avg",
            "optimizer.state.tok_embeddings.weight.step",
        ] {
            assert_eq!(action(&s, k), Action::LeaveOut, "{k}");
        }
        // Bytes items and non-float state stay out whatever the globs.
        assert_eq!(action(&s, "dataloader.dp_rank_0"), Action::LeaveOut);
        assert_eq!(action(&s, "train_state.step"), Action::LeaveOut);
        let s = select_keys(&titan(), &config(&["*.exp_avg", "*"], &[], false));
        let err = s.unwrap_err();
        assert!(
            matches!(&err, Error::IncludeSelectsNothing { pattern, detail }
                if pattern == "*.exp_avg" && detail.contains("1 optimizer keys")),
            "{err}"
        );
    }

    #[test]
    fn explicit_optimizer_include_merges_it() {
        for pat in ["optimizer.*", "optim*", "optimizer.state.*.exp_avg"] {
            let s = select_keys(&titan(), &config(&[pat], &[], false)).unwrap();
            assert_eq!(
                action(&s, "optimizer.state.tok_embeddings.weight.exp_avg"),
                Action::Merge,
                "{pat}"
            );
            assert_eq!(action(&s, "lr_scheduler.base_lr"), Action::LeaveOut);
        }
    }

    #[test]
    fn exclude_wins_over_include_and_defaults() {
        let s = select_keys(
            &titan(),
            &config(&["optimizer.*"], &["*.step", "tok_*"], true),
        )
        .unwrap();
        assert_eq!(action(&s, "tok_embeddings.weight"), Action::LeaveOut);
        assert_eq!(
            action(&s, "optimizer.state.tok_embeddings.weight.step"),
            Action::LeaveOut
        );
        assert_eq!(action(&s, "train_state.step"), Action::LeaveOut);
        assert_eq!(
            s.decision("train_state.step").unwrap().reason,
            "--exclude '*.step'"
        );
        assert_eq!(
            action(&s, "optimizer.state.tok_embeddings.weight.exp_avg"),
            Action::Merge
        );
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn typo_include_and_bad_glob_are_errors() {
        let err = select_keys(&titan(), &config(&["layer.*"], &[], false)).unwrap_err();
        assert!(
            matches!(&err, Error::IncludeSelectsNothing { pattern, detail }
                if pattern == "layer.*" && detail == "it matches none of the 10 keys"),
            "{err}"
        );
        let err = select_keys(&titan(), &config(&["dataloader.*"], &[], false)).unwrap_err();
        assert!(
            matches!(&err, Error::IncludeSelectsNothing { detail, .. }
                if detail.contains("1 bytes items (never averaged)")),
            "{err}"
        );
        let err = select_keys(&titan(), &config(&[], &["layers.[0"], false)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidGlob { flag: "--exclude", pattern, .. } if pattern == "layers.[0"),
            "{err}"
        );
        // An exclude that matches nothing is only a warning.
        let s = select_keys(&titan(), &config(&[], &["nope.*"], false)).unwrap();
        assert_eq!(s.warnings, ["--exclude 'nope.*' matches no key"]);
    }

    #[test]
    fn class_and_alternation_globs() {
        let s = select_keys(&titan(), &config(&["lr_sch?duler.[a-c]*"], &[], false)).unwrap();
        assert_eq!(action(&s, "lr_scheduler.base_lr"), Action::Merge);
        let s = select_keys(
            &titan(),
            &config(&[], &["{tok_embeddings,position_ids}*"], false),
        )
        .unwrap();
        assert_eq!(action(&s, "tok_embeddings.weight"), Action::LeaveOut);
        assert_eq!(action(&s, "position_ids"), Action::LeaveOut);
    }

    #[test]
    fn dry_run_summary_groups_by_prefix() {
        let s = select_keys(&titan(), &KeySelectionConfig::default()).unwrap();
        let text = s.to_string();
        assert!(
            text.starts_with("merges 3 tensors, copies 1, keeps 0 from the newest, leaves out 6"),
            "{text}"
        );
        assert!(text.contains("layers.* (2, model weight)"), "{text}");
        assert!(
            text.contains(
                "optimizer.* (2, optimizer training state; merge it with --include 'optimizer.*')"
            ),
            "{text}"
        );
        assert!(text.contains("dataloader.* (1, bytes item"), "{text}");
    }

    #[test]
    fn store_entries_map_to_key_entries_and_summaries_serialize() {
        let tensor = StoreEntry {
            name: "optimizer.state.w.exp_avg".into(),
            dtype: Some(Dtype::F32),
            role: EntryRole::TrainingState,
        };
        let bytes = StoreEntry {
            name: "dataloader.dp_rank_0".into(),
            dtype: None,
            role: EntryRole::Model,
        };
        assert_eq!(
            KeyEntry::from_store(&tensor),
            KeyEntry {
                name: tensor.name.clone(),
                kind: EntryKind::FloatTensor,
                role: EntryRole::TrainingState
            }
        );
        // A bytes item is training state whatever role it was given.
        let b = KeyEntry::from_store(&bytes);
        assert_eq!(
            (b.kind, b.role),
            (EntryKind::Bytes, EntryRole::TrainingState)
        );

        let s = select_keys(&titan(), &config(&[], &["nope"], false)).unwrap();
        let summary = s.summary();
        assert_eq!(
            (
                summary.merged,
                summary.copied,
                summary.kept_newest,
                summary.left_out
            ),
            (3, 1, 0, 6)
        );
        assert_eq!(summary.to_string(), s.to_string());
        let v = serde_json::to_value(&summary).unwrap();
        assert_eq!(v["left_out"], 6);
        assert_eq!(v["warnings"][0], "--exclude 'nope' matches no key");
        let g = &v["groups"][0];
        assert_eq!(
            (&g["action"], &g["prefix"], &g["count"]),
            (&"merge".into(), &"layers.*".into(), &2.into())
        );
        let actions: Vec<_> = [
            Action::Merge,
            Action::Copy,
            Action::KeepNewest,
            Action::LeaveOut,
        ]
        .iter()
        .map(|a| serde_json::to_value(a).unwrap())
        .collect();
        assert_eq!(actions, ["merge", "copy", "keep_newest", "leave_out"]);
    }

    #[test]
    fn fsdp2_fixture_merges_weights_and_leaves_optimizer_out() {
        let entries = dcp_entries("dcp/run-fsdp2/step-0000100");
        let s = select_keys(&entries, &KeySelectionConfig::default()).unwrap();
        assert!(s.count(Action::Merge) > 0);
        for d in &s.decisions {
            let expect = if is_optimizer_key(&d.name) || classify_key(&d.name) != EntryRole::Model {
                Action::LeaveOut
            } else if d.kind == EntryKind::FloatTensor {
                Action::Merge
            } else {
                Action::Copy
            };
            assert_eq!(d.action, expect, "{}", d.name);
        }
        assert!(s.decisions.iter().any(|d| is_optimizer_key(&d.name)));
        let s = select_keys(&entries, &config(&["optim*"], &[], false)).unwrap();
        assert!(s
            .decisions
            .iter()
            .filter(|d| is_optimizer_key(&d.name) && d.kind == EntryKind::FloatTensor)
            .all(|d| d.action == Action::Merge));
    }

    #[test]
    fn megatron_fixture_never_averages_extra_state() {
        let entries = dcp_entries("dcp/run-megatron/iter_0000100");
        // `*` selects float non-optimizer state too, but never a bytes item (Megatron's
        // sharded `_extra_state` objects are bytes items).
        let s = select_keys(&entries, &config(&["*"], &[], false)).unwrap();
        assert!(s.decisions.iter().any(|d| d.kind == EntryKind::Bytes));
        for d in s.decisions.iter().filter(|d| d.kind == EntryKind::Bytes) {
            assert_eq!(d.action, Action::LeaveOut, "{}", d.name);
        }
        let s = select_keys(&entries, &KeySelectionConfig::default()).unwrap();
        assert!(s.count(Action::Merge) > 0);
        for d in &s.decisions {
            if d.name.contains("_extra_state") {
                assert_ne!(d.action, Action::Merge, "{}", d.name);
            }
        }
        assert!(s.decisions.iter().any(|d| d.name.contains("_extra_state")));
    }
}
