//! Progress reporting.
