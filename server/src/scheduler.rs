//! The scheduler: one dedicated thread owns the engine and runs continuous batching.
//!
//! Every iteration it takes new commands (requests, adapter loads and unloads), drops
//! requests whose client went away, admits waiting requests while the plan's limits allow
//! (`max_seqs` running sequences, KV pages, an adapter slot for the request's adapter), then
//! runs one engine step that mixes every running request: decode rows (one token each) first,
//! then prefill chunks in admission order until `max_batch_tokens` is used (a prompt longer
//! than the budget is prefilled over several steps). Requests leave the batch the step they
//! finish; their sequence, KV pages and adapter lease are returned at once.
//!
//! KV pages are taken as sequences grow (the engine's own rule: a page per `page_size`
//! tokens), mirrored here so every step is known to fit before it runs. A request is admitted
//! when the pages its prompt still needs are free, keeping one spare page per running request
//! for decode growth. When a step would still need more pages than are free, the most
//! recently admitted request is preempted: its sequence and pages are released and it goes
//! back to the head of the queue with its progress (tokens so far, text, sampler state);
//! re-admitted, it recomputes its cache from those tokens and carries on (vLLM's recompute
//! preemption). Output does not depend on it, beyond float rounding between a recomputed
//! prefill and the decode steps it replaces.
//!
//! Adapters: the registry ([`crate::adapter_registry`]) maps names to pool slots. An adapter
//! can be registered without a slot (the pool was full of busy adapters, or it was evicted):
//! the first request that needs it loads it into a free slot, or evicts the least recently
//! used adapter that no running or queued request uses. Adapters given at start-up, or
//! loaded with `pin`, are never evicted. An unload removes the name at once; the slot is
//! freed when the last request using it ends (a running request never loses its weights).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lorac_adapters::LoadedAdapter;
use lorac_runtime::executor::{LogitsMode, SeqId, SeqInput};
use serde::Serialize;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::adapter_registry::{AdapterEntry, AdapterId, AdapterRegistry};
use crate::backend::Backend;
use crate::error::{ApiError, ServerError};
use crate::metrics::{Metrics, Outcome, Rejection};
use crate::sampling::{Rng, SamplingParams, sample};
use crate::text::{TextCodec, TextStream};

/// A generation request, tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    /// The served base-model name or an adapter name.
    pub model: String,
    pub prompt: Vec<u32>,
    /// `max_tokens` may be left at 0 here: [`SchedulerHandle::submit`] fills the context's rest.
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// What a request's receiver gets, in order: deltas, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it released (possibly empty: a partial character,
    /// or text that may start a stop string); at the end, held-back text with no token.
    Delta {
        text: String,
        token_id: Option<u32>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(ApiError),
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelEntry {
    pub name: String,
    /// The adapter directory; none for the base model.
    pub path: Option<PathBuf>,
    /// Holds a pool slot now.
    pub resident: bool,
    pub pinned: bool,
}

/// Fixed facts about the engine, for validating requests before they queue.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub served_model_name: String,
    pub max_seq_len: u32,
    pub page_size: u32,
    pub kv_pages: u32,
    pub max_batch_tokens: u32,
    pub max_seqs: u32,
    pub adapter_slots: u32,
    pub vocab_size: u32,
    pub eos_ids: Vec<u32>,
}

pub struct SchedulerConfig {
    pub served_model_name: String,
    /// Waiting requests beyond which new ones get 429.
    pub max_queue: usize,
    /// Loaded at start-up, pinned.
    pub adapters: Vec<(String, PathBuf)>,
}

/// State the HTTP side reads without asking the scheduler thread.
pub struct Shared {
    pub metrics: Metrics,
    models: RwLock<Vec<ModelEntry>>,
    /// Requests submitted and not yet running (the bounded queue).
    waiting: AtomicUsize,
    shutting_down: AtomicBool,
    max_queue: usize,
}

enum Command {
    Submit(Box<Submission>),
    LoadAdapter { name: String, path: PathBuf, pin: bool, reply: oneshot::Sender<Result<(), ApiError>> },
    UnloadAdapter { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
    Shutdown { grace: Duration },
}

struct Submission {
    request: Request,
    events: tmpsc::UnboundedSender<Event>,
    queued_at: Instant,
}

/// The HTTP side's handle on the scheduler thread (cheap to clone).
#[derive(Clone)]
pub struct SchedulerHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl SchedulerHandle {
    /// Starts the scheduler thread: builds the engine there with `make_backend` (the engine
    /// never leaves that thread), loads and pins the start-up adapters, and returns once it
    /// serves.
    pub fn start(
        make_backend: impl FnOnce() -> Result<Box<dyn Backend>, ServerError> + Send + 'static,
        codec: Arc<TextCodec>,
        config: SchedulerConfig,
    ) -> Result<SchedulerHandle, ServerError> {
        let shared = Arc::new(Shared {
            metrics: Metrics::default(),
            models: RwLock::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            max_queue: config.max_queue,
        });
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<EngineInfo, ServerError>>();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lorac-scheduler".into())
            .spawn(move || {
                let backend = match make_backend() {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut scheduler = Scheduler::new(backend, codec, thread_shared, inbox, config.served_model_name);
                for (name, path) in config.adapters {
                    if let Err(e) = scheduler.load_adapter(&name, path, true) {
                        let _ = ready_tx.send(Err(ServerError::Adapter { name, message: e.message }));
                        return;
                    }
                }
                scheduler.publish();
                let _ = ready_tx.send(Ok(scheduler.info.clone()));
                scheduler.run();
            })
            .map_err(|e| ServerError::Scheduler(format!("cannot spawn the scheduler thread: {e}")))?;
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let detail = thread.join().err().and_then(|p| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                return Err(ServerError::Scheduler(format!("it panicked during start-up {detail}")));
            }
        };
        Ok(SchedulerHandle { commands, shared, info: Arc::new(info), thread: Arc::new(Mutex::new(Some(thread))) })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn models(&self) -> Vec<ModelEntry> {
        self.shared.models.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    fn reject(&self, why: Rejection, error: ApiError) -> ApiError {
        self.shared.metrics.rejected(why);
        error
    }

    /// Validates and queues a request; its events arrive on the returned receiver. Dropping
    /// the receiver cancels the request.
    pub fn submit(&self, mut request: Request) -> Result<tmpsc::UnboundedReceiver<Event>, ApiError> {
        if self.is_shutting_down() {
            return Err(self.reject(Rejection::Unavailable, ApiError::shutting_down()));
        }
        if !self.models().iter().any(|m| m.name == request.model) {
            return Err(self.reject(Rejection::NotFound, ApiError::not_found(format!("The model `{}` does not exist.", request.model))));
        }
        let info = &self.info;
        let prompt_len = request.prompt.len() as u64;
        if prompt_len == 0 {
            return Err(self.reject(Rejection::Invalid, ApiError::invalid_param("prompt", "the prompt is empty")));
        }
        if let Some(&t) = request.prompt.iter().find(|&&t| t >= info.vocab_size) {
            return Err(self.reject(
                Rejection::Invalid,
                ApiError::invalid_param("prompt", format!("token id {t} is outside the vocabulary of {}", info.vocab_size)),
            ));
        }
        let max_len = u64::from(info.max_seq_len);
        if prompt_len >= max_len {
            return Err(self.reject(
                Rejection::Invalid,
                ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid_param(
                        "prompt",
                        format!(
                            "This model's maximum context length is {max_len} tokens; the prompt has {prompt_len} tokens, leaving no room to generate."
                        ),
                    )
                },
            ));
        }
        if request.params.max_tokens == 0 {
            request.params.max_tokens = (max_len - prompt_len) as u32;
        }
        let total = prompt_len + u64::from(request.params.max_tokens);
        if total > max_len {
            return Err(self.reject(
                Rejection::Invalid,
                ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid_param(
                        "max_tokens",
                        format!(
                            "This model's maximum context length is {max_len} tokens. However, you requested {total} tokens ({prompt_len} in the prompt, {} for the completion). Please reduce the prompt or max_tokens.",
                            request.params.max_tokens
                        ),
                    )
                },
            ));
        }
        if pages_for(total, info.page_size) > u64::from(info.kv_pages) {
            return Err(self.reject(
                Rejection::Unavailable,
                ApiError::unavailable(format!(
                    "{total} tokens can never fit the KV cache ({} pages of {} tokens)",
                    info.kv_pages, info.page_size
                )),
            ));
        }
        // The queue bound: count first, back out when over.
        let before = self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.shared.max_queue {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(self.reject(Rejection::QueueFull, ApiError::queue_full(self.shared.max_queue)));
        }
        let (events, receiver) = tmpsc::unbounded_channel();
        let submission = Submission { request, events, queued_at: Instant::now() };
        if self.commands.send(Command::Submit(Box::new(submission))).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(self.reject(Rejection::Unavailable, ApiError::unavailable("the scheduler has stopped")));
        }
        Ok(receiver)
    }

    /// vLLM's `load_lora_adapter`: validates the adapter and registers it under `name`.
    pub async fn load_adapter(&self, name: String, path: PathBuf, pin: bool) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::LoadAdapter { name, path, pin, reply })?;
        answer.await.map_err(|_| ApiError::unavailable("the scheduler has stopped"))?
    }

    pub async fn unload_adapter(&self, name: String) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::UnloadAdapter { name, reply })?;
        answer.await.map_err(|_| ApiError::unavailable("the scheduler has stopped"))?
    }

    fn command(&self, command: Command) -> Result<(), ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        self.commands.send(command).map_err(|_| ApiError::unavailable("the scheduler has stopped"))
    }

    /// Stops taking requests: queued ones get a 503 at once, running ones may finish for
    /// `grace`, then get a final error event. Returns at once; see [`SchedulerHandle::join`].
    pub fn shutdown(&self, grace: Duration) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown { grace });
    }

    /// Waits for the scheduler thread to end (after [`SchedulerHandle::shutdown`]); the
    /// engine and its device memory are dropped there.
    pub fn join(&self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

fn pages_for(tokens: u64, page_size: u32) -> u64 {
    tokens.div_ceil(u64::from(page_size.max(1)))
}

enum Waiting {
    Fresh {
        id: u64,
        request: Request,
        adapter: Option<AdapterId>,
        events: tmpsc::UnboundedSender<Event>,
        queued_at: Instant,
    },
    /// Preempted for KV pages: resumes from its tokens so far on a new sequence.
    Preempted(Box<Running>),
}

impl Waiting {
    fn id(&self) -> u64 {
        match self {
            Waiting::Fresh { id, .. } => *id,
            Waiting::Preempted(r) => r.id,
        }
    }
    fn adapter(&self) -> Option<AdapterId> {
        match self {
            Waiting::Fresh { adapter, .. } => *adapter,
            Waiting::Preempted(r) => r.adapter,
        }
    }
    fn events(&self) -> &tmpsc::UnboundedSender<Event> {
        match self {
            Waiting::Fresh { events, .. } => events,
            Waiting::Preempted(r) => &r.events,
        }
    }
    /// Tokens to put in the cache before the next token can be drawn.
    fn input_len(&self) -> usize {
        match self {
            Waiting::Fresh { request, .. } => request.prompt.len(),
            Waiting::Preempted(r) => r.tokens.len(),
        }
    }
}

struct Running {
    id: u64,
    model: String,
    adapter: Option<AdapterId>,
    seq: SeqId,
    /// Prompt, then every generated token fed back.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens of `tokens` already in the KV cache.
    fed: usize,
    generated: u32,
    params: SamplingParams,
    rng: Rng,
    text: TextStream,
    events: tmpsc::UnboundedSender<Event>,
    /// KV pages the engine holds for this sequence (`fed` tokens, rounded up to pages).
    pages: u32,
    /// Admission order: the latest admitted is preempted first.
    admitted: u64,
    queued_at: Instant,
}

impl Running {
    /// Pages still to take before the pending input is cached.
    fn outstanding_pages(&self, page_size: u32) -> u32 {
        (pages_for(self.tokens.len() as u64, page_size) as u32).saturating_sub(self.pages)
    }
}

enum Ending {
    Finished(FinishReason),
    Cancelled,
    Failed(ApiError),
}

struct Scheduler {
    backend: Box<dyn Backend>,
    codec: Arc<TextCodec>,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<Command>,
    info: EngineInfo,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    adapters: AdapterRegistry,
    free_pages: u32,
    admissions: u64,
    next_id: u64,
    /// Set by a shutdown: running requests end by this time.
    deadline: Option<Instant>,
}

impl Scheduler {
    fn new(
        backend: Box<dyn Backend>,
        codec: Arc<TextCodec>,
        shared: Arc<Shared>,
        inbox: mpsc::Receiver<Command>,
        served_model_name: String,
    ) -> Self {
        let plan = backend.plan();
        let page_size = backend.page_size();
        let kv_pages = (plan.limits.kv_cache_tokens / u64::from(page_size.max(1))).min(u64::from(u32::MAX)) as u32;
        let info = EngineInfo {
            served_model_name,
            max_seq_len: backend.max_seq_len(),
            page_size,
            kv_pages,
            max_batch_tokens: plan.limits.max_batch_tokens,
            max_seqs: plan.limits.max_seqs,
            adapter_slots: plan.lora.max_loras,
            vocab_size: plan.model.vocab_size,
            eos_ids: codec.eos_ids().to_vec(),
        };
        shared.metrics.kv_pages_total.store(u64::from(kv_pages), Ordering::Relaxed);
        shared.metrics.adapter_slots_total.store(u64::from(info.adapter_slots), Ordering::Relaxed);
        let slots = info.adapter_slots;
        Scheduler {
            backend,
            codec,
            shared,
            inbox,
            info,
            waiting: VecDeque::new(),
            running: Vec::new(),
            adapters: AdapterRegistry::new(slots),
            free_pages: kv_pages,
            admissions: 0,
            next_id: 0,
            deadline: None,
        }
    }

    fn run(mut self) {
        tracing::info!(
            max_seqs = self.info.max_seqs,
            max_batch_tokens = self.info.max_batch_tokens,
            kv_pages = self.info.kv_pages,
            page_size = self.info.page_size,
            adapter_slots = self.info.adapter_slots,
            "scheduler running"
        );
        loop {
            let busy = !self.running.is_empty() || !self.waiting.is_empty();
            if !busy && self.deadline.is_some() {
                break;
            }
            // Idle: wait for work. Busy: take what arrived without blocking.
            let first = if busy {
                self.inbox.try_recv().map_err(|e| e == TryRecvError::Disconnected)
            } else {
                self.inbox.recv_timeout(Duration::from_millis(200)).map_err(|e| e == RecvTimeoutError::Disconnected)
            };
            let mut next = first;
            loop {
                match next {
                    Ok(command) => self.handle(command),
                    Err(true) => {
                        // Every handle is gone: nobody can read results any more.
                        self.begin_shutdown(Duration::ZERO);
                        break;
                    }
                    Err(false) => break,
                }
                next = self.inbox.try_recv().map_err(|e| e == TryRecvError::Disconnected);
            }
            self.drop_cancelled();
            if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                for i in (0..self.running.len()).rev() {
                    self.end(i, Ending::Failed(ApiError::shutting_down()));
                }
            }
            self.admit();
            self.update_gauges();
            if !self.running.is_empty() {
                self.step();
                self.update_gauges();
            } else if !self.waiting.is_empty() {
                // Nothing could be admitted (adapter slots busy): do not spin.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        tracing::info!("scheduler stopped");
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(submission) => self.enqueue(*submission),
            Command::LoadAdapter { name, path, pin, reply } => {
                let result = self.load_adapter(&name, path, pin);
                match &result {
                    Ok(()) => tracing::info!(adapter = %name, pin, "adapter loaded"),
                    Err(e) => tracing::warn!(adapter = %name, error = %e, "adapter refused"),
                }
                self.publish();
                let _ = reply.send(result);
            }
            Command::UnloadAdapter { name, reply } => {
                let result = self.unload_adapter(&name);
                if result.is_ok() {
                    tracing::info!(adapter = %name, "adapter unloaded");
                }
                self.publish();
                let _ = reply.send(result);
            }
            Command::Shutdown { grace } => self.begin_shutdown(grace),
        }
    }

    fn begin_shutdown(&mut self, grace: Duration) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        if self.deadline.is_none() {
            tracing::info!(running = self.running.len(), queued = self.waiting.len(), "shutting down");
        }
        let deadline = Instant::now() + grace;
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        while let Some(w) = self.waiting.pop_front() {
            self.leave_queue(&w);
            let _ = w.events().send(Event::Error(ApiError::shutting_down()));
            self.shared.metrics.finished(Outcome::Cancelled);
        }
    }

    fn enqueue(&mut self, submission: Submission) {
        let Submission { request, events, queued_at } = submission;
        let refuse = |this: &mut Self, error: ApiError| {
            this.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = events.send(Event::Error(error));
        };
        if self.deadline.is_some() {
            return refuse(self, ApiError::shutting_down());
        }
        let adapter = if request.model == self.info.served_model_name {
            None
        } else {
            match self.adapters.acquire(&request.model) {
                Some(id) => Some(id),
                // Unloaded between the handler's check and now.
                None => return refuse(self, ApiError::not_found(format!("The model `{}` does not exist.", request.model))),
            }
        };
        if let Some(id) = adapter.filter(|&id| !self.adapters.can_ever_be_resident(id)) {
            self.release_adapter(Some(id));
            return refuse(
                self,
                ApiError::unavailable(format!(
                    "adapter `{}` has no slot: all {} adapter slots hold pinned adapters",
                    request.model, self.info.adapter_slots
                )),
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        tracing::debug!(request = id, model = %request.model, prompt_tokens = request.prompt.len(), "queued");
        self.waiting.push_back(Waiting::Fresh { id, request, adapter, events, queued_at });
    }

    /// Requests whose client disconnected leave the queue or the batch now.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].events().is_closed() {
                let w = self.waiting.remove(i).expect("index checked");
                self.leave_queue(&w);
                self.shared.metrics.finished(Outcome::Cancelled);
                tracing::info!(request = w.id(), "cancelled while queued (client gone)");
            } else {
                i += 1;
            }
        }
        for i in (0..self.running.len()).rev() {
            if self.running[i].events.is_closed() {
                self.end(i, Ending::Cancelled);
            }
        }
    }

    /// A request leaves the queue: its place in the bounded queue (fresh requests only) and
    /// its adapter lease go back.
    fn leave_queue(&mut self, w: &Waiting) {
        if matches!(w, Waiting::Fresh { .. }) {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.release_adapter(w.adapter());
    }

    /// Moves waiting requests into the batch, in order (preempted ones first), while
    /// sequences and KV pages last. A request whose adapter cannot get a slot yet is passed
    /// over (later requests may run); one that does not fit the free KV pages stops
    /// admission, so it is not starved.
    fn admit(&mut self) {
        let page_size = self.info.page_size;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.info.max_seqs as usize {
            let w = &self.waiting[i];
            // Pages free once running requests have cached their pending input, less one spare
            // page per running request for decode growth.
            let committed: u32 = self.running.iter().map(|r| r.outstanding_pages(page_size)).sum();
            let spare = self.running.len() as u32;
            let available = self.free_pages.saturating_sub(committed + spare);
            let needed = pages_for(w.input_len() as u64, page_size) as u32;
            if needed > available {
                break;
            }
            if let Some(id) = w.adapter() {
                match self.make_resident(id) {
                    Ok(true) => {}
                    Ok(false) => {
                        i += 1;
                        continue;
                    }
                    Err(e) => {
                        let w = self.waiting.remove(i).expect("index checked");
                        self.leave_queue(&w);
                        let _ = w.events().send(Event::Error(e));
                        self.shared.metrics.finished(Outcome::Error);
                        continue;
                    }
                }
            }
            let w = self.waiting.remove(i).expect("index checked");
            if let Some(id) = w.adapter() {
                self.adapters.touch(id);
            }
            self.admissions += 1;
            let seq = self.backend.add_sequence();
            let running = match w {
                Waiting::Fresh { id, request, adapter, events, queued_at } => {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.shared.metrics.prompt_tokens.fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
                    tracing::debug!(request = id, "admitted");
                    Running {
                        id,
                        model: request.model,
                        adapter,
                        seq,
                        prompt_len: request.prompt.len(),
                        tokens: request.prompt,
                        fed: 0,
                        generated: 0,
                        text: TextStream::new(request.params.stop.clone()),
                        rng: request.params.seed.map_or_else(Rng::from_entropy, Rng::seeded),
                        params: request.params,
                        events,
                        pages: 0,
                        admitted: self.admissions,
                        queued_at,
                    }
                }
                Waiting::Preempted(r) => {
                    tracing::debug!(request = r.id, tokens = r.tokens.len(), "resumed after preemption");
                    Running { seq, fed: 0, pages: 0, admitted: self.admissions, ..*r }
                }
            };
            self.running.push(running);
        }
    }

    /// The rows of the next step: (running index, tokens fed). Decode rows first (one token
    /// each), then prefill chunks in admission order until the token budget is spent.
    fn plan_rows(&self) -> Vec<(usize, usize)> {
        let mut budget = self.info.max_batch_tokens as usize;
        let mut rows: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter().enumerate() {
            if r.fed >= r.prompt_len && budget > 0 {
                let n = (r.tokens.len() - r.fed).min(budget);
                rows.push((i, n));
                budget -= n;
            }
        }
        let mut prefill: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].fed < self.running[i].prompt_len).collect();
        prefill.sort_by_key(|&i| self.running[i].admitted);
        for i in prefill {
            if budget == 0 {
                break;
            }
            let r = &self.running[i];
            let n = (r.tokens.len() - r.fed).min(budget);
            rows.push((i, n));
            budget -= n;
        }
        rows
    }

    /// New KV pages `rows` take.
    fn pages_needed(&self, rows: &[(usize, usize)]) -> u32 {
        let page_size = self.info.page_size;
        rows.iter()
            .map(|&(i, n)| {
                let r = &self.running[i];
                (pages_for((r.fed + n) as u64, page_size) as u32).saturating_sub(r.pages)
            })
            .sum()
    }

    /// Sends the most recently admitted request back to the head of the queue, releasing its
    /// sequence and pages; it keeps its tokens, text and sampler.
    fn preempt_latest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted) else { return };
        let mut r = self.running.swap_remove(i);
        if let Err(e) = self.backend.release_sequence(r.seq) {
            tracing::error!(request = r.id, error = %e, "releasing the sequence failed");
        }
        self.free_pages += r.pages;
        r.pages = 0;
        r.fed = 0;
        self.shared.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(request = r.id, tokens = r.tokens.len(), free_pages = self.free_pages, "preempted (KV cache full); will recompute");
        self.waiting.push_front(Waiting::Preempted(Box::new(r)));
    }

    /// One engine step over every running request (as far as the token budget reaches).
    fn step(&mut self) {
        let mut rows = self.plan_rows();
        while self.pages_needed(&rows) > self.free_pages && self.running.len() > 1 {
            self.preempt_latest();
            rows = self.plan_rows();
        }
        if rows.is_empty() {
            return;
        }
        // Take the pages now, as the engine will; `end` returns them whatever happens.
        for &(i, n) in &rows {
            let r = &mut self.running[i];
            let pages = (pages_for((r.fed + n) as u64, self.info.page_size) as u32).saturating_sub(r.pages);
            r.pages += pages;
            self.free_pages = self.free_pages.saturating_sub(pages);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for &(i, n) in &rows {
            let r = &self.running[i];
            let adapter = r.adapter.and_then(|id| self.adapters.slot_of(id));
            batch.push(SeqInput { seq: r.seq, position: r.fed as u32, tokens: r.tokens[r.fed..r.fed + n].to_vec(), adapter });
        }
        let tokens: usize = rows.iter().map(|r| r.1).sum();
        let started = Instant::now();
        // Logits come back to the host only when a row samples from them (a 128k-vocab read-back
        // per row is a real cost at decode); greedy rows use the engine's argmax.
        let samples = rows.iter().any(|&(i, n)| {
            let r = &self.running[i];
            r.fed + n >= r.tokens.len() && !r.params.is_greedy()
        });
        let mode = if samples { LogitsMode::Last } else { LogitsMode::NextTokens };
        let result = self.backend.step(&batch, mode);
        let elapsed = started.elapsed().as_secs_f64();
        let metrics = &self.shared.metrics;
        metrics.step_seconds.observe(elapsed);
        metrics.batch_rows.observe(rows.len() as f64);
        metrics.batch_tokens.observe(tokens as f64);
        tracing::trace!(rows = rows.len(), tokens, seconds = elapsed, "step");

        let output = match result {
            Ok(output) => output,
            Err(e) => {
                tracing::error!(error = %e, rows = rows.len(), tokens, "engine step failed; ending the requests of the batch");
                let mut failed: Vec<usize> = rows.iter().map(|r| r.0).collect();
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    self.end(i, Ending::Failed(ApiError::internal(format!("engine step failed: {e}"))));
                }
                return;
            }
        };

        let mut endings: Vec<(usize, Ending)> = Vec::new();
        for (k, &(i, n)) in rows.iter().enumerate() {
            let r = &mut self.running[i];
            r.fed += n;
            if r.fed < r.tokens.len() {
                continue; // A prefill chunk: more prompt to go.
            }
            let token = if r.params.is_greedy() {
                output.next_tokens[k]
            } else {
                match output.logits.get(k) {
                    Some(row) if !row.is_empty() => sample(row, &r.params, &mut r.rng),
                    _ => output.next_tokens[k],
                }
            };
            r.generated += 1;
            self.shared.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
            if !r.params.ignore_eos && self.info.eos_ids.contains(&token) {
                let _ = r.events.send(Event::Delta { text: String::new(), token_id: Some(token) });
                endings.push((i, Ending::Finished(FinishReason::Stop)));
                continue;
            }
            let delta = match r.text.push(&self.codec, token) {
                Ok(delta) => delta,
                Err(e) => {
                    endings.push((i, Ending::Failed(ApiError::internal(e))));
                    continue;
                }
            };
            let _ = r.events.send(Event::Delta { text: delta.text, token_id: Some(token) });
            if delta.stopped {
                endings.push((i, Ending::Finished(FinishReason::Stop)));
            } else if r.generated >= r.params.max_tokens {
                endings.push((i, Ending::Finished(FinishReason::Length)));
            } else {
                r.tokens.push(token);
            }
        }
        endings.sort_unstable_by_key(|e| e.0);
        for (i, ending) in endings.into_iter().rev() {
            self.end(i, ending);
        }
    }

    /// Ends running request `i`: final event, sequence and pages back, adapter lease released.
    fn end(&mut self, i: usize, ending: Ending) {
        let mut r = self.running.swap_remove(i);
        if let Err(e) = self.backend.release_sequence(r.seq) {
            tracing::error!(request = r.id, error = %e, "releasing the sequence failed");
        }
        self.free_pages += r.pages;
        self.release_adapter(r.adapter);
        // Gauges first: a client that saw its final event also sees the freed batch place.
        self.update_gauges();
        let usage =
            Usage { prompt_tokens: r.prompt_len as u32, completion_tokens: r.generated, total_tokens: r.prompt_len as u32 + r.generated };
        let seconds = r.queued_at.elapsed().as_secs_f64();
        let metrics = &self.shared.metrics;
        match ending {
            Ending::Finished(reason) => {
                // Text held back (a partial character, a possible stop-string start) is final now.
                let tail = r.text.finish(&self.codec).unwrap_or_default();
                if !tail.is_empty() {
                    let _ = r.events.send(Event::Delta { text: tail, token_id: None });
                }
                let _ = r.events.send(Event::Done { finish_reason: reason, usage });
                metrics.finished(if reason == FinishReason::Stop { Outcome::Stop } else { Outcome::Length });
                metrics.request_seconds.observe(seconds);
                tracing::info!(
                    request = r.id,
                    model = %r.model,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    finish_reason = reason.as_str(),
                    seconds,
                    "request finished"
                );
            }
            Ending::Cancelled => {
                metrics.finished(Outcome::Cancelled);
                tracing::info!(request = r.id, completion_tokens = r.generated, "cancelled (client gone)");
            }
            Ending::Failed(error) => {
                tracing::warn!(request = r.id, error = %error, "request ended with an error");
                let _ = r.events.send(Event::Error(error));
                metrics.finished(Outcome::Error);
            }
        }
    }

    fn update_gauges(&self) {
        let m = &self.shared.metrics;
        m.queue_depth.store(self.waiting.len() as u64, Ordering::Relaxed);
        m.running.store(self.running.len() as u64, Ordering::Relaxed);
        m.kv_pages_used.store(u64::from(self.info.kv_pages - self.free_pages), Ordering::Relaxed);
        m.adapter_slots_used.store(self.adapters.slots_used() as u64, Ordering::Relaxed);
        m.adapters_registered.store(self.adapters.active().count() as u64, Ordering::Relaxed);
    }

    /// Publishes the model list the HTTP side serves.
    fn publish(&self) {
        let mut models = vec![ModelEntry { name: self.info.served_model_name.clone(), path: None, resident: true, pinned: true }];
        models.extend(self.adapters.active().map(|a| ModelEntry {
            name: a.name.clone(),
            path: Some(a.path.clone()),
            resident: a.slot.is_some(),
            pinned: a.pinned,
        }));
        if let Ok(mut published) = self.shared.models.write() {
            *published = models;
        }
        self.update_gauges();
    }

    // ---- adapters: the registry's decisions, carried out on the engine ----

    /// Frees adapter `id`'s slot (it stays registered and reloads on demand).
    fn evict(&mut self, id: AdapterId) -> Result<u32, ApiError> {
        let entry = self.adapters.get(id).ok_or_else(|| ApiError::internal("evicting an unknown adapter"))?;
        let slot = entry.slot.ok_or_else(|| ApiError::internal("evicting an adapter without a slot"))?;
        self.backend.unload_adapter(slot).map_err(|e| ApiError::internal(format!("evicting adapter `{}`: {e}", entry.name)))?;
        tracing::info!(adapter = %entry.name, slot, "adapter evicted (least recently used)");
        self.adapters.set_slot(id, None);
        Ok(slot)
    }

    /// Gives adapter `id` a slot if it has none: a free one, or an evicted one. `false` when
    /// every slot is busy now.
    fn make_resident(&mut self, id: AdapterId) -> Result<bool, ApiError> {
        let entry = self.adapters.get(id).ok_or_else(|| ApiError::internal("unknown adapter id"))?;
        if entry.slot.is_some() {
            return Ok(true);
        }
        // An unloaded adapter of the same name still serving its last requests: the pool
        // holds one adapter per name, so wait for it to leave.
        if self.adapters.retired_holds_slot(&entry.name) {
            return Ok(false);
        }
        let slot = match self.adapters.free_slot() {
            Some(slot) => slot,
            None => match self.adapters.eviction_victim(Some(id)) {
                Some(victim) => self.evict(victim)?,
                None => return Ok(false),
            },
        };
        let entry = self.adapters.get(id).ok_or_else(|| ApiError::internal("unknown adapter id"))?;
        self.backend
            .load_adapter(slot, &entry.path, &entry.name)
            .map_err(|e| ApiError::internal(format!("reloading adapter `{}` from {}: {e}", entry.name, entry.path.display())))?;
        tracing::info!(adapter = %entry.name, slot, "adapter swapped in");
        self.adapters.set_slot(id, Some(slot));
        self.publish();
        Ok(true)
    }

    fn load_adapter(&mut self, name: &str, path: PathBuf, pin: bool) -> Result<(), ApiError> {
        if name.is_empty() {
            return Err(ApiError::invalid_param("lora_name", "the adapter name is empty"));
        }
        if name == self.info.served_model_name || self.adapters.is_registered(name) {
            return Err(ApiError::invalid_param("lora_name", format!("The lora adapter `{name}` has already been loaded.")));
        }
        if self.adapters.pinned_slots() >= self.adapters.slots() {
            return Err(ApiError::bad_request(format!(
                "all {} adapter slots hold pinned adapters; unload one before loading `{name}`",
                self.adapters.slots()
            )));
        }
        // A retired entry of the same name may still hold its slot for running requests: the
        // pool refuses a second adapter of one name, so the new one waits for a slot of its own.
        let clashes = self.adapters.retired_holds_slot(name);
        let slot = if clashes { None } else { self.adapters.free_slot() };
        let slot = match slot {
            // A free slot: the engine validates while loading and leaves the pool as it was
            // on a refusal.
            Some(slot) => {
                self.backend.load_adapter(slot, &path, name).map_err(|e| ApiError::invalid_param("lora_path", e.to_string()))?;
                Some(slot)
            }
            None => {
                // Validate before evicting anyone, so a refusal changes nothing.
                LoadedAdapter::load(&path, self.backend.plan()).map_err(|e| ApiError::invalid_param("lora_path", e.to_string()))?;
                match (clashes, self.adapters.eviction_victim(None)) {
                    (false, Some(victim)) => {
                        let slot = self.evict(victim)?;
                        self.backend.load_adapter(slot, &path, name).map_err(|e| ApiError::invalid_param("lora_path", e.to_string()))?;
                        Some(slot)
                    }
                    _ if pin => {
                        return Err(ApiError::unavailable(format!(
                            "no adapter slot can be freed to pin `{name}` now (all are in use by requests or pinned); retry later"
                        )));
                    }
                    // Registered without a slot; the first request for it swaps it in.
                    _ => None,
                }
            }
        };
        self.adapters.register(name, path, slot, pin);
        Ok(())
    }

    fn unload_adapter(&mut self, name: &str) -> Result<(), ApiError> {
        let dropped = self.adapters.retire(name).map_err(|_| ApiError::not_found(format!("The lora adapter `{name}` cannot be found.")))?;
        self.free_dropped(dropped);
        Ok(())
    }

    /// A request's lease on its adapter ends (queued or running, finished or not).
    fn release_adapter(&mut self, id: Option<AdapterId>) {
        if let Some(dropped) = id.and_then(|id| self.adapters.release(id)) {
            self.free_dropped(Some(dropped));
        }
    }

    /// Frees the slot of an unloaded adapter whose last request ended.
    fn free_dropped(&mut self, dropped: Option<AdapterEntry>) {
        let Some(entry) = dropped else { return };
        if let Some((slot, Err(e))) = entry.slot.map(|slot| (slot, self.backend.unload_adapter(slot))) {
            tracing::error!(adapter = %entry.name, slot, error = %e, "freeing the adapter slot failed");
        }
        self.publish();
    }
}
