//! What travels between the API layer and the engine: a request carrying its own event sender and cancellation
//! token, and the events streamed back for it.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sampler::ValidSampling;

/// One generation request, as the engine sees it (already tokenized and validated by the API layer).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Caller-chosen id, echoed in logs and used as the OpenAI response id.
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: ValidSampling,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Keep generating past the model's EOS tokens.
    pub ignore_eos: bool,
    /// `Some(n)`: return the chosen token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Cancelled by the API layer when the client goes away; the engine frees the sequence within one step.
    pub cancel: CancellationToken,
    /// Send each token as it is generated (streamed responses). When false the tokens are held and sent together
    /// with the finish: a non-streamed response needs them only then, and the engine saves waking the
    /// receiving task once per token.
    pub stream: bool,
    /// Structured output: the grammar every sampled token must follow; its completion ends the sequence.
    pub constraint: Option<crate::grammar::Constraint>,
}

/// Why a sequence finished (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's length limit.
    Length,
    /// Cancelled by the client or aborted by shutdown.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling, also the `finished_reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// The chosen token's log-probability and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(u32, String, f32)>,
}

/// Streamed to the request's receiver, in order: any number of `Token`s, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token. `text` is the newly decodable text (may be empty while a multi-byte character or a
    /// possible stop string is held back).
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
    /// The sequence ended. `text` is any held-back text released at the end.
    Finished { reason: FinishReason, usage: Usage, text: String },
    /// The request failed inside the engine.
    Error(super::errors::EngineError),
}

/// The receiving end of a request's events.
pub type EventStream = mpsc::UnboundedReceiver<Event>;
