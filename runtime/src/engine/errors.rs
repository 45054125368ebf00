//! Why the engine refuses a request (the model's limits, a full queue, draining) or fails one it accepted. A leaf
//! module: the runtime's [`crate::Error`] wraps these without importing the rest of the engine.

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too many requests already waiting (HTTP 429).
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull { waiting: usize },
    /// The server is shutting down (HTTP 503).
    #[error("the server is draining and accepts no new requests")]
    Draining,
    /// The request can never be served by this model (HTTP 400).
    #[error(transparent)]
    Invalid(#[from] RequestError),
}

/// Why a request can never be served by this model, whatever the load: what [`Limits::check`] finds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of this model ({vocab_size} tokens)")]
    OutsideVocabulary { id: u32, vocab_size: usize },
    #[error("this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_tokens} tokens")]
    PromptTooLong { prompt_tokens: usize, max_model_len: usize },
    #[error("max_tokens must be at least 1")]
    NoCompletionTokens,
    #[error(
        "this model's maximum context length is {max_model_len} tokens; the request has {prompt_tokens} prompt \
         tokens and asks for {max_tokens} completion tokens"
    )]
    ContextExceeded { prompt_tokens: usize, max_tokens: usize, max_model_len: usize },
}

impl RequestError {
    /// Whether the prompt is at fault (reported against `messages` or `prompt`) rather than `max_tokens`.
    pub fn is_prompt(&self) -> bool {
        matches!(self, Self::EmptyPrompt | Self::OutsideVocabulary { .. } | Self::PromptTooLong { .. })
    }
}

/// The model's sizes every request is checked against, in one place: the API layer checks before costly work
/// (compiling a schema), `submit` as the engine's own guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Prompt plus generated tokens of one sequence at most.
    pub max_model_len: usize,
    pub vocab_size: usize,
}

impl Limits {
    /// The prompt is non-empty, in the vocabulary and leaves room for a token; `max_tokens` is at least 1 and
    /// fits the context with the prompt.
    pub fn check(&self, prompt: &[u32], max_tokens: usize) -> std::result::Result<(), RequestError> {
        let (limit, vocab_size) = (self.max_model_len, self.vocab_size);
        if prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(RequestError::OutsideVocabulary { id, vocab_size });
        }
        if prompt.len() >= limit {
            return Err(RequestError::PromptTooLong { prompt_tokens: prompt.len(), max_model_len: limit });
        }
        if max_tokens == 0 {
            return Err(RequestError::NoCompletionTokens);
        }
        if prompt.len() + max_tokens > limit {
            return Err(RequestError::ContextExceeded {
                prompt_tokens: prompt.len(),
                max_tokens,
                max_model_len: limit,
            });
        }
        Ok(())
    }

    /// The most completion tokens a prompt of `prompt_tokens` leaves room for.
    pub fn room_after(&self, prompt_tokens: usize) -> usize {
        self.max_model_len.saturating_sub(prompt_tokens)
    }
}

/// Why the engine failed a request it had accepted. Every case is the server's fault, not the request's (a
/// request that can never fit is refused at submit with a [`super::RequestError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Even an empty cache cannot hold the request's prompt (the cache is smaller than one sequence's blocks).
    #[error("the request needs {needed} KV-cache blocks and the cache has {total}")]
    DoesNotFit { needed: usize, total: usize },
    /// The model's forward pass failed for the batch the request was in (the error, as logged).
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// Sampling the request's next token failed: no allowed token had a finite logit, or its grammar refused the
    /// token it had allowed.
    #[error("sampling failed: {0}")]
    Sampling(String),
    /// The engine thread stopped (shut down or failed) before the request finished.
    #[error("the engine stopped before the request finished")]
    Stopped,
}
