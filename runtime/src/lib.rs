//! Placeholder until the kernel crate lands.
