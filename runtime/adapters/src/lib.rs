//! PEFT adapter loading for the lorac runtime (host side, CPU only).
//!
//! * [`LoadedAdapter::load`] reads an adapter directory (`adapter_config.json` +
//!   `adapter_model.safetensors`) and validates it completely against a compiled plan:
//!   config settings, tensor names, A/B pairs, shapes, ranks against the plan's max rank,
//!   modules against the plan's targets. It never touches a pool, so a refused adapter leaves
//!   every pool as it was by construction.
//! * [`HostPool`] is the host copy of each rank's adapter pool, in the plan's layout and
//!   dtype; [`HostPool::write_slot`] / [`HostPool::clear_slot`] fill or zero exactly one
//!   slot's region of every buffer. See [`pool`] for how scaling and ranks are handled.

pub mod config;
pub mod error;
mod layout;
pub mod load;
pub mod pool;

pub use config::{AdapterConfig, TargetModules};
pub use error::AdapterError;
pub use load::{LoadedAdapter, ModuleInfo};
pub use pool::{HostPool, SlotInfo};
