//! Online merging beside a running job (being written).
