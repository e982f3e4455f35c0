//! The `lorac` command-line tool's library side: the reports `inspect` prints, shared with
//! the snapshot tests.

pub mod report;
