//! The compiler's dataflow graph. Nodes are operations, edges carry the values (activation
//! tensors) between them. Tables of linears, values and LoRA modules are indexed by typed ids;
//! petgraph stays inside this module and never reaches plan.bin.

use std::marker::PhantomData;

use lorac_models::spec::{Activation, LinearSpec, ShardUnit};
use lorac_plan::{DType, LinearRole, LoraLayout, Rows};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};

/// A vector indexed by a typed id.
#[derive(Debug, Clone)]
pub struct IdVec<I, T> {
    items: Vec<T>,
    _id: PhantomData<I>,
}

pub trait Id: Copy {
    fn new(index: usize) -> Self;
    fn index(self) -> usize;
}

macro_rules! id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);
        impl Id for $name {
            fn new(index: usize) -> Self {
                $name(u32::try_from(index).expect("fewer than 2^32 entries"))
            }
            fn index(self) -> usize {
                self.0 as usize
            }
        }
    };
}

id!(/// A linear layer in [`Graph::linears`].
    LinearId);
id!(/// An activation in [`Graph::values`].
    ValueId);
id!(/// A LoRA module in [`Graph::loras`].
    LoraId);

impl<I: Id, T> IdVec<I, T> {
    pub fn new() -> Self {
        IdVec { items: Vec::new(), _id: PhantomData }
    }
    pub fn push(&mut self, item: T) -> I {
        self.items.push(item);
        I::new(self.items.len() - 1)
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (I, &T)> {
        self.items.iter().enumerate().map(|(i, t)| (I::new(i), t))
    }
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.iter_mut()
    }
}

impl<I: Id, T> Default for IdVec<I, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I: Id, T> std::ops::Index<I> for IdVec<I, T> {
    type Output = T;
    fn index(&self, id: I) -> &T {
        &self.items[id.index()]
    }
}

impl<I: Id, T> std::ops::IndexMut<I> for IdVec<I, T> {
    fn index_mut(&mut self, id: I) -> &mut T {
        &mut self.items[id.index()]
    }
}

/// A linear layer and what the passes learn about it.
#[derive(Debug, Clone)]
pub struct Linear {
    pub spec: LinearSpec,
    /// What it computes in its block (from where the model description holds it).
    pub role: LinearRole,
    /// None for embed_tokens and lm_head.
    pub layer: Option<u32>,
    /// Experts chosen per token (routed experts only).
    pub top_k: Option<u32>,
    /// Filled by the sharding pass.
    pub shard: Option<LinearShard>,
    /// Filled by the LoRA pass.
    pub lora: Option<LoraId>,
}

/// Per-rank geometry of a linear, identical in shape on every rank; only the row, column and
/// expert ranges differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearShard {
    pub in_features: u32,
    pub slices: Vec<SliceShard>,
    /// Per rank: the columns of the full input it takes.
    pub input_cols: Vec<(u32, u32)>,
    /// Local expert count and, per rank, the experts it holds.
    pub experts: Option<(u32, Vec<(u32, u32)>)>,
}

impl LinearShard {
    pub fn out_features(&self) -> u32 {
        self.slices.iter().map(|s| s.width).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceShard {
    pub name: String,
    pub group: u32,
    pub width: u32,
    /// Per rank: the rows of the full weight it takes.
    pub rows: Vec<(u32, u32)>,
}

/// How wide a value is on each rank, before the sharding pass resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WidthSpec {
    /// The same on every rank.
    Full(u32),
    /// Concatenated parts, each split across ranks (attention output: its heads).
    Split(Vec<ShardUnit>),
    /// The per-rank output of a linear (full for row-parallel layers before the all-reduce).
    LinearOut(LinearId),
    /// The per-rank input of a linear (the sharded input of a row-parallel layer).
    LinearIn(LinearId),
    /// A LoRA shrink result: `groups × max_rank`.
    LoraIntermediate(LoraId),
}

#[derive(Debug, Clone)]
pub struct Value {
    pub name: String,
    pub rows: Rows,
    pub width: WidthSpec,
    /// Filled by the sharding pass.
    pub rank_width: Option<u32>,
    pub dtype: DType,
    /// An in-place update (LoRA expand) writes its result into this value's storage.
    pub alias_of: Option<ValueId>,
    /// The node that writes it (none for graph inputs).
    pub producer: Option<NodeIndex>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    TokenIds,
    Embedding(LinearId),
    RmsNorm {
        width: u32,
    },
    Linear(LinearId),
    Attention {
        heads: u32,
        kv_heads: u32,
        head_dim: u32,
        output_gate: bool,
        qk_norm: bool,
    },
    /// MLA's q_a/kv_a layernorms; splits the fused latent into (q latent,) kv latent, k rope.
    MlaLatentNorm {
        q_lora_rank: u32,
        kv_lora_rank: u32,
        qk_rope_head_dim: u32,
    },
    Mla {
        heads: u32,
        kv_lora_rank: u32,
        qk_nope_head_dim: u32,
        qk_rope_head_dim: u32,
        v_head_dim: u32,
    },
    GatedDeltaNet {
        k_heads: u32,
        v_heads: u32,
        k_head_dim: u32,
        v_head_dim: u32,
        conv_kernel: u32,
        state_dtype: DType,
    },
    Mamba2 {
        heads: u32,
        head_dim: u32,
        groups: u32,
        state_size: u32,
        conv_kernel: u32,
        state_dtype: DType,
    },
    Activation(Activation),
    Router {
        experts: u32,
        top_k: u32,
    },
    MoeCombine {
        top_k: u32,
    },
    Add,
    AllReduce,
    /// Each sequence's last position (the rows that reach lm_head).
    GatherLast,
    Sample,
    LoraShrink(LoraId),
    LoraExpand(LoraId),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub layer: Option<u32>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Filled by kernel selection.
    pub kernel: Option<lorac_plan::KernelSpec>,
    /// Checkpoint tensors the node reads (routed experts keep `{expert}` in the name).
    pub weights: Vec<String>,
}

/// A LoRA module: the buffers one targeted linear gets in the adapter pool.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub linear: LinearId,
    pub layout: LoraLayout,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub dag: StableDiGraph<Node, ValueId>,
    /// Program order: the execution order passes keep valid (the verifier checks it against
    /// the edges).
    pub order: Vec<NodeIndex>,
    pub linears: IdVec<LinearId, Linear>,
    pub values: IdVec<ValueId, Value>,
    pub loras: IdVec<LoraId, LoraModule>,
}

impl Graph {
    pub fn add_value(&mut self, name: impl Into<String>, rows: Rows, width: WidthSpec, dtype: DType) -> ValueId {
        self.values.push(Value { name: name.into(), rows, width, rank_width: None, dtype, alias_of: None, producer: None })
    }

    /// Appends a node at the end of program order and links it to its inputs' producers.
    pub fn push_node(&mut self, op: Op, layer: Option<u32>, inputs: Vec<ValueId>, outputs: Vec<ValueId>) -> NodeIndex {
        let at = self.order.len();
        self.insert_node(at, op, layer, inputs, outputs)
    }

    /// Inserts a node at position `at` of program order.
    pub fn insert_node(&mut self, at: usize, op: Op, layer: Option<u32>, inputs: Vec<ValueId>, outputs: Vec<ValueId>) -> NodeIndex {
        let node =
            self.dag.add_node(Node { op, layer, inputs: inputs.clone(), outputs: outputs.clone(), kernel: None, weights: Vec::new() });
        for value in outputs {
            self.values[value].producer = Some(node);
        }
        for value in inputs {
            if let Some(producer) = self.producer(value) {
                self.dag.add_edge(producer, node, value);
            }
        }
        self.order.insert(at, node);
        node
    }

    pub fn producer(&self, value: ValueId) -> Option<NodeIndex> {
        self.values[value].producer
    }

    /// Replaces `old` by `new` as an input of `consumer`, keeping the edges in step.
    pub fn replace_input(&mut self, consumer: NodeIndex, old: ValueId, new: ValueId) {
        if !self.dag[consumer].inputs.contains(&old) {
            return;
        }
        for input in self.dag[consumer].inputs.iter_mut().filter(|v| **v == old) {
            *input = new;
        }
        let stale: Vec<_> = self
            .dag
            .edges_directed(consumer, petgraph::Direction::Incoming)
            .filter(|e| *e.weight() == old)
            .map(|e| petgraph::visit::EdgeRef::id(&e))
            .collect();
        for e in stale {
            self.dag.remove_edge(e);
        }
        if let Some(producer) = self.producer(new) {
            self.dag.add_edge(producer, consumer, new);
        }
    }

    pub fn consumers(&self, value: ValueId) -> Vec<NodeIndex> {
        self.order.iter().copied().filter(|n| self.dag[*n].inputs.contains(&value)).collect()
    }

    pub fn nodes_in_order(&self) -> impl Iterator<Item = (NodeIndex, &Node)> {
        self.order.iter().map(|n| (*n, &self.dag[*n]))
    }

    pub fn rank_width(&self, value: ValueId) -> u32 {
        self.values[value].rank_width.expect("value widths are resolved by the sharding pass")
    }
}
