//! HF checkpoint layout: which tensors go in which shard file, and the shard index.

use std::path::Path;

use super::encode::TensorSpec;
use super::fs::write_file_synced;
use crate::checkpoint::{ShardIndex, INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::error::Result;

/// Splits tensors (in write order) into shards of at most `max_shard_bytes`, as
/// `transformers`' `save_pretrained` does: a tensor larger than the limit gets a shard of its own.
pub fn plan_shards(tensor_bytes: &[u64], max_shard_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, &n) in tensor_bytes.iter().enumerate() {
        if i > start && size + n > max_shard_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < tensor_bytes.len() || shards.is_empty() {
        shards.push(start..tensor_bytes.len());
    }
    shards
}

/// File name of shard `i` (0-based) of `n` in HF style; `model.safetensors` when `n == 1`.
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE_NAME.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Writes `model.safetensors.index.json` into `dir`.
pub fn write_index(dir: &Path, shards: &[(String, Vec<&TensorSpec>)]) -> Result<()> {
    let mut index = ShardIndex::default();
    let mut total = 0u64;
    for (file, tensors) in shards {
        for t in tensors {
            total += t.n_bytes();
            index.weight_map.insert(t.name.clone(), file.clone());
        }
    }
    index.metadata.insert("total_size".into(), total.into());
    let path = dir.join(INDEX_FILE_NAME);
    let text = serde_json::to_vec_pretty(&index).expect("index always serializes");
    write_file_synced(&path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_follow_hf_rule() {
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[], 8), vec![0..0]);
        assert_eq!(shard_file_name(0, 3), "model-00001-of-00003.safetensors");
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
    }
}
