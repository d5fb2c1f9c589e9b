//! The v1 manifest (being written).
