//! Errors of the host-side launch API. Every check that can fail on caller input (buffer sizes,
//! ranks, slot indices, batch metadata) returns one of these instead of panicking.

use lorac_plan::LayoutError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoraError {
    #[error("buffer `{name}` holds {actual} elements but the layout needs {expected}")]
    BufferSize { name: &'static str, expected: usize, actual: usize },
    #[error("slot {slot} has rank {rank} but the pool's max rank is {max_rank}")]
    RankTooLarge { slot: usize, rank: u32, max_rank: u32 },
    #[error("slot {slot} is out of range: the pool has {slots} slots")]
    SlotOutOfRange { slot: u32, slots: u32 },
    #[error("expert {expert} is out of range: the module has {experts} local experts")]
    ExpertOutOfRange { expert: u32, experts: u32 },
    #[error("token {token} is out of range: the batch has {tokens} tokens")]
    TokenOutOfRange { token: u32, tokens: u32 },
    #[error("token {token} appears twice in the permutation")]
    DuplicateToken { token: u32 },
    #[error("seg_indptr is malformed: {0}")]
    BadIndptr(&'static str),
    #[error("batch needs {needed} segments but the plan sized {capacity}")]
    CapacityExceeded { needed: usize, capacity: usize },
    #[error("layout is not valid for this kernel: {0}")]
    Layout(String),
    #[error(transparent)]
    Plan(#[from] LayoutError),
    #[error("the device does not support {0}")]
    Unsupported(String),
    #[error("buffer view: {0}")]
    View(String),
}

pub type Result<T> = std::result::Result<T, LoraError>;
