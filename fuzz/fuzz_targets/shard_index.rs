//! `model.safetensors.index.json`: parsed, and every accepted shard name is one plain
//! component (so it cannot escape the checkpoint directory).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("model.safetensors.index.json");
    if let Ok(index) = pma_format::ShardIndex::parse(path, data) {
        for shard in index.weight_map.values() {
            let p = std::path::Path::new(shard.as_str());
            assert_eq!(p.components().count(), 1, "{shard:?}");
            assert!(!shard.contains('/'), "{shard:?}");
            assert!(shard != ".." && shard != ".", "{shard:?}");
        }
    }
});
