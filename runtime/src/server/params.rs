//! From an OpenAI request body to an engine [`GenerateRequest`]: the checks both generation endpoints share
//! (served model, `n`, sampling ranges, context length, the limits that bound a request's cost), the refusal of
//! every field the server does not implement, and the mapping of the parameters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use baleen_api::openai::{ChatCompletionRequest, CompletionRequest, GenerationOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::engine::sampler::{SamplingParams, ValidSampling};
use crate::engine::{GenerateRequest, Limits, RequestError};
use crate::grammar::{MAX_SCHEMA_BYTES, OutputFormat};

/// Most alternatives per token a request may ask for (`top_logprobs`, completions' `logprobs`), as in vLLM.
pub(crate) const MAX_LOGPROBS: u32 = 20;
/// Most `stop` strings a request may send (each is matched against the text after every token).
pub(crate) const MAX_STOP_STRINGS: usize = 16;
/// Longest `stop` string, in bytes.
pub(crate) const MAX_STOP_STRING_BYTES: usize = 256;
/// Most `stop_token_ids` a request may send.
pub(crate) const MAX_STOP_TOKEN_IDS: usize = 64;
/// Most `logit_bias` entries a request may send (OpenAI allows 300 too).
pub(crate) const MAX_LOGIT_BIAS: usize = 300;

/// The structured-output field.
pub(crate) const RESPONSE_FORMAT: &str = "response_format";

/// Top-level fields accepted and ignored because they cannot change the answer: metadata and routing hints of
/// the OpenAI API.
const IGNORED_FIELDS: [&str; 5] = ["metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"];

/// The fields the typed request leaves in `extra` that the server implements — `response_format` (structured
/// outputs) — and a refusal of every other one: a field either works or is a 400 naming it. A `null` value
/// counts as absent; a value that asks for the default behaviour (`response_format: {"type": "text"}`,
/// `functions: []`, `function_call: "none"`, `suffix: ""`) is accepted. Chat's `tools` are typed fields (see
/// `tools.rs`); OpenAI's deprecated `functions` are refused in their favour.
pub(crate) fn check_extra(extra: &BTreeMap<String, Value>) -> Result<Option<OutputFormat>, ApiError> {
    let mut format = None;
    for (name, value) in extra {
        if value.is_null() || IGNORED_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let message = match name.as_str() {
            RESPONSE_FORMAT => {
                format = output_format(value)?;
                continue;
            }
            "functions" if value.as_array().is_some_and(Vec::is_empty) => continue,
            "function_call" if value.as_str() == Some("none") => continue,
            "functions" | "function_call" => {
                format!("`{name}` is deprecated by OpenAI and not served: use `tools` and `tool_choice`")
            }
            "suffix" if value.as_str() == Some("") => continue,
            _ => format!("`{name}` is not supported by this server: it would be ignored, so it is refused"),
        };
        return Err(ApiError::unsupported_param(name, message));
    }
    Ok(format)
}

/// `response_format`: `text` (no constraint), `json_object`, or `json_schema` with its `schema` (at most
/// [`MAX_SCHEMA_BYTES`] as JSON).
fn output_format(value: &Value) -> Result<Option<OutputFormat>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param(RESPONSE_FORMAT, message);
    match value.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let schema = value.get("json_schema").and_then(|s| s.get("schema")).filter(|s| s.is_object());
            let Some(schema) = schema else {
                return Err(invalid(
                    "`response_format` of type `json_schema` needs `json_schema.schema`, a JSON Schema object".into(),
                ));
            };
            let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > MAX_SCHEMA_BYTES {
                return Err(invalid(format!(
                    "the `response_format` schema may be at most {MAX_SCHEMA_BYTES} bytes of JSON, got {size}"
                )));
            }
            Ok(Some(OutputFormat::JsonSchema(schema.clone())))
        }
        Some(kind) => Err(ApiError::unsupported_param(
            RESPONSE_FORMAT,
            format!("`response_format` of type `{kind}` is not supported (use text, json_object or json_schema)"),
        )),
        None => Err(invalid("`response_format` must be an object with a `type`".into())),
    }
}

/// The generation parameters both endpoints share.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommonParams {
    pub max_tokens: Option<usize>,
    pub options: GenerationOptions,
    /// `Some(k)`: return logprobs with `k` alternatives per token.
    pub logprobs: Option<usize>,
    /// `response_format`: the grammar the output must follow.
    pub format: Option<OutputFormat>,
    /// The request field `format` came from, named in its errors (`response_format`, or `tools`).
    pub format_param: &'static str,
}

impl CommonParams {
    /// The chat request's parameters; `logprobs: true` with `top_logprobs: k` asks for `k` alternatives.
    pub fn from_chat(r: &ChatCompletionRequest) -> Result<Self, ApiError> {
        let format = check_extra(&r.extra)?;
        let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid_param("top_logprobs", "`top_logprobs` requires `logprobs: true`"));
            }
            (false, _) => None,
            (true, k) => Some(check_logprobs("top_logprobs", k.unwrap_or(0))?),
        };
        Ok(Self {
            max_tokens: r.max_completion_tokens.or(r.max_tokens),
            options: r.options.clone(),
            logprobs,
            format,
            format_param: RESPONSE_FORMAT,
        })
    }

    /// The completion request's parameters; `echo: true` and `best_of > 1` are refused.
    pub fn from_completion(r: &CompletionRequest) -> Result<Self, ApiError> {
        let format = check_extra(&r.extra)?;
        if r.echo.unwrap_or(false) {
            return Err(ApiError::invalid_param("echo", "echo: only false is supported"));
        }
        if r.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid_param("best_of", "best_of: only 1 is supported"));
        }
        Ok(Self {
            max_tokens: r.max_tokens,
            options: r.options.clone(),
            logprobs: r.logprobs.map(|k| check_logprobs("logprobs", k)).transpose()?,
            format,
            format_param: RESPONSE_FORMAT,
        })
    }

    /// Sampling parameters with OpenAI's defaults ([`SamplingParams::default`]), range-checked once by
    /// [`SamplingParams::validate`]; token ids (`stop_token_ids`, `logit_bias`) must be below `vocab_size`.
    pub fn sampling(&self, vocab_size: usize) -> Result<ValidSampling, ApiError> {
        // vLLM's convention: -1 and 0 turn top-k off; any other negative value is an error, never a silent default.
        let top_k = match self.options.top_k {
            None | Some(-1) => 0,
            Some(k) => usize::try_from(k).map_err(|_| {
                ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be -1 (disable), 0 (disable) or at least 1, got {k}"),
                )
            })?,
        };
        let defaults = SamplingParams::default();
        let o = &self.options;
        let params = SamplingParams {
            temperature: o.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: o.top_p.unwrap_or(defaults.top_p),
            seed: o.seed.map(|s| s as u64),
            repetition_penalty: o.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            frequency_penalty: o.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: o.presence_penalty.unwrap_or(defaults.presence_penalty),
            stop_token_ids: self.stop_token_ids(vocab_size)?,
            logit_bias: self.logit_bias(vocab_size)?,
        };
        Ok(params.validate()?)
    }

    fn stop_token_ids(&self, vocab_size: usize) -> Result<Vec<u32>, ApiError> {
        let ids = self.options.stop_token_ids.clone().unwrap_or_default();
        if ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {}", ids.len()),
            ));
        }
        check_in_vocab("stop_token_ids", &ids, vocab_size)?;
        Ok(ids)
    }

    /// `logit_bias` as (id, bias) pairs: keys are decimal token ids below `vocab_size`, at most
    /// [`MAX_LOGIT_BIAS`] of them (the biases' range is the sampler's check).
    fn logit_bias(&self, vocab_size: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(bias) = &self.options.logit_bias else { return Ok(Vec::new()) };
        let invalid = |message: String| ApiError::invalid_param("logit_bias", message);
        if bias.len() > MAX_LOGIT_BIAS {
            return Err(invalid(format!(
                "at most {MAX_LOGIT_BIAS} logit_bias entries are allowed, got {}",
                bias.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        bias.iter()
            .map(|(key, &value)| match key.parse::<u32>() {
                Ok(id) if (id as usize) < vocab_size && seen.insert(id) => Ok((id, value)),
                Ok(id) if (id as usize) < vocab_size => {
                    Err(invalid(format!("logit_bias: token id {id} appears twice (as `{key}` and another key)")))
                }
                _ => Err(invalid(format!(
                    "logit_bias: the key `{key}` is not a token id of this model (an integer below {vocab_size})"
                ))),
            })
            .collect()
    }

    /// The `stop` strings, within [`MAX_STOP_STRINGS`] and [`MAX_STOP_STRING_BYTES`].
    fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let stop = self.options.stop.as_ref().map(|s| s.to_vec()).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", stop.len()),
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(ApiError::invalid_param(
                "stop",
                format!("stop strings may be at most {MAX_STOP_STRING_BYTES} bytes long, got one of {}", long.len()),
            ));
        }
        Ok(stop)
    }

    /// [`CommonParams::into_request`] with the model's limits, and the grammar of `response_format` (or of a
    /// forced tool call) compiled into the request's constraint: what both generation endpoints submit.
    pub async fn into_engine_request(
        mut self,
        state: &AppState,
        request_id: String,
        prompt: Vec<u32>,
        prompt_param: &str,
    ) -> Result<GenerateRequest, ApiError> {
        let (format, param) = (self.format.take(), self.format_param);
        let mut request = self.into_request(request_id, prompt, prompt_param, state.engine.info().limits())?;
        request.constraint = state.constraint(format, param).await?;
        Ok(request)
    }

    /// The engine request for `prompt` (sent as `prompt_param`: `messages` or `prompt`). Without `max_tokens`
    /// the completion may fill the rest of the context.
    pub fn into_request(
        self,
        request_id: String,
        prompt: Vec<u32>,
        prompt_param: &str,
        limits: Limits,
    ) -> Result<GenerateRequest, ApiError> {
        if self.options.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid_param("n", "n: only 1 is supported"));
        }
        let sampling = self.sampling(limits.vocab_size)?;
        let stop = self.stop_strings()?;
        // Without `max_tokens` the completion may fill the rest of the context.
        let max_tokens = self.max_tokens.unwrap_or_else(|| limits.room_after(prompt.len()));
        limits.check(&prompt, max_tokens).map_err(|e| request_error(&e, prompt_param))?;
        Ok(GenerateRequest {
            request_id,
            prompt,
            sampling,
            max_tokens,
            stop,
            ignore_eos: self.options.ignore_eos.unwrap_or(false),
            logprobs: self.logprobs,
            cancel: CancellationToken::new(),
            stream: self.options.stream.unwrap_or(false),
            constraint: None,
        })
    }
}

fn check_logprobs(param: &str, k: u32) -> Result<usize, ApiError> {
    if k > MAX_LOGPROBS {
        return Err(ApiError::invalid_param(param, format!("{param} must be at most {MAX_LOGPROBS}, got {k}")));
    }
    Ok(k as usize)
}

/// A 400 naming `param` when one of `ids` is not a token id of the model.
fn check_in_vocab(param: &str, ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(ApiError::invalid_param(
            param,
            format!("{param}: {id} is not a token id of this model (vocabulary of {vocab_size})"),
        )),
        None => Ok(()),
    }
}

/// A 400 for a request the model can never serve, naming `prompt_param` (`messages` or `prompt`) or `max_tokens`.
pub(crate) fn request_error(e: &RequestError, prompt_param: &str) -> ApiError {
    ApiError::invalid_param(if e.is_prompt() { prompt_param } else { "max_tokens" }, e.to_string())
}

/// `model` must be absent or the served name.
pub(crate) fn check_model(model: Option<&str>, served: &str) -> Result<(), ApiError> {
    match model {
        Some(m) if m != served => Err(ApiError::model_not_found(m, &format!("`{served}`"))),
        _ => Ok(()),
    }
}

/// A fresh request id: `prefix` and 32 hex digits, unique within the process and unpredictable across runs.
pub(crate) fn new_request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u64(n);
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u64(!n);
    format!("{prefix}-{:016x}{:016x}", a.finish(), b.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use axum::http::StatusCode;
    use serde_json::json;

    use super::*;

    fn chat(body: serde_json::Value) -> Result<CommonParams, ApiError> {
        CommonParams::from_chat(&serde_json::from_value(body).unwrap())
    }

    fn lim(max_model_len: usize) -> Limits {
        Limits { max_model_len, vocab_size: 100 }
    }

    fn base() -> serde_json::Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(extra: serde_json::Value) -> serde_json::Value {
        let mut v = base();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn defaults_follow_openai_and_fill_the_context() {
        let req = chat(base()).unwrap().into_request("id".into(), vec![1, 2, 3], "messages", lim(10)).unwrap();
        assert_eq!(req.sampling.temperature, 1.0);
        assert_eq!(req.sampling.top_p, 1.0);
        assert_eq!(req.max_tokens, 7);
        assert_eq!(req.logprobs, None);
        assert!(!req.ignore_eos && req.stop.is_empty());
    }

    #[test]
    fn parameters_map_onto_the_engine_request() {
        let p = chat(with(json!({
            "max_tokens": 3, "max_completion_tokens": 5, "temperature": 0, "top_k": -1, "seed": 9,
            "stop": ["\n", ""], "stop_token_ids": [7], "logprobs": true, "top_logprobs": 2, "ignore_eos": true
        })))
        .unwrap();
        let req = p.into_request("id".into(), vec![1], "messages", lim(100)).unwrap();
        assert_eq!(req.max_tokens, 5);
        assert_eq!(req.sampling.temperature, 0.0);
        assert_eq!(req.sampling.top_k, 0);
        assert_eq!(req.sampling.seed, Some(9));
        assert_eq!(req.sampling.stop_token_ids, vec![7]);
        assert_eq!(req.stop, vec!["\n"]);
        assert_eq!(req.logprobs, Some(2));
        assert!(req.ignore_eos);
    }

    #[test]
    fn out_of_range_parameters_are_400_naming_the_parameter() {
        for (body, param) in [
            (json!({"temperature": -1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"n": 2}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"top_k": -5}), "top_k"),
        ] {
            let e =
                chat(with(body.clone())).unwrap().into_request("id".into(), vec![1], "messages", lim(100)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
        assert_eq!(chat(with(json!({"top_logprobs": 2}))).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert!(chat(with(json!({"logprobs": true, "top_logprobs": 21}))).is_err());
    }

    #[test]
    fn fields_that_would_be_ignored_are_refused_naming_them() {
        for (extra, param) in [
            (json!({"response_format": {"type": "grammar", "grammar": "x"}}), "response_format"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"suffix": "end"}), "suffix"),
            (json!({"min_p": 0.1}), "min_p"),
        ] {
            let e = chat(with(extra.clone())).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref(), e.code),
                (StatusCode::BAD_REQUEST, Some(param), Some("unsupported_parameter")),
                "{extra}"
            );
        }
        for extra in [
            json!({"response_format": {"type": "text"}, "functions": [], "function_call": "none", "suffix": ""}),
            json!({"metadata": {"a": "b"}, "store": false, "user": "u", "functions": null}),
        ] {
            assert!(chat(with(extra.clone())).is_ok(), "{extra}");
        }
    }

    #[test]
    fn response_formats_become_output_formats() {
        let format = |f: serde_json::Value| chat(with(json!({"response_format": f})));
        assert_eq!(format(json!({"type": "text"})).unwrap().format, None);
        assert_eq!(format(json!({"type": "json_object"})).unwrap().format, Some(OutputFormat::JsonObject));
        let schema = json!({"type": "object"});
        let with_schema = format(json!({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}));
        assert_eq!(with_schema.unwrap().format, Some(OutputFormat::JsonSchema(schema)));
        for bad in [
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            json!({"type": "json_schema", "json_schema": {"schema": {"enum": ["x".repeat(MAX_SCHEMA_BYTES)]}}}),
            json!({"json_schema": {}}),
        ] {
            let e = format(bad.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("response_format")), "{bad}");
        }
    }

    #[test]
    fn limits_bound_stop_strings_stop_ids_and_logit_bias() {
        let request = |extra: serde_json::Value| {
            chat(with(extra)).unwrap().into_request("id".into(), vec![1], "messages", lim(50))
        };
        let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| format!("s{i}")).collect();
        assert_eq!(request(json!({"stop": many})).unwrap_err().param.as_deref(), Some("stop"));
        assert_eq!(
            request(json!({"stop": "x".repeat(MAX_STOP_STRING_BYTES + 1)})).unwrap_err().param.as_deref(),
            Some("stop")
        );
        assert_eq!(request(json!({"stop_token_ids": [100]})).unwrap_err().param.as_deref(), Some("stop_token_ids"));
        let ids: Vec<u32> = vec![1; MAX_STOP_TOKEN_IDS + 1];
        assert_eq!(request(json!({"stop_token_ids": ids})).unwrap_err().param.as_deref(), Some("stop_token_ids"));
        for bias in [json!({"abc": 1}), json!({"100": 1}), json!({"5": 101}), json!({"-1": 1})] {
            let e = request(json!({"logit_bias": bias})).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logit_bias"), "{bias}: {e}");
        }
        let req = request(json!({"logit_bias": {"5": -100, "7": 2.5}, "stop": ["a", "b"]})).unwrap();
        assert_eq!(req.sampling.logit_bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!(req.stop, vec!["a", "b"]);
    }

    #[test]
    fn prompts_that_fill_the_context_are_400() {
        let e = chat(base()).unwrap().into_request("id".into(), vec![1; 10], "messages", lim(10)).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("maximum context length"), "{e}");
        assert_eq!(e.param.as_deref(), Some("messages"));
        let mut p = chat(base()).unwrap();
        p.max_tokens = Some(8);
        let e = p.into_request("id".into(), vec![1; 5], "messages", lim(10)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e}");
        assert!(e.message.contains("asks for 8 completion tokens"), "{e}");
        let e = chat(base()).unwrap().into_request("id".into(), vec![], "messages", lim(10)).unwrap_err();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("messages"), "the prompt is empty"));
    }

    #[test]
    fn completions_refuse_echo_and_best_of() {
        let parse = |v: serde_json::Value| CommonParams::from_completion(&serde_json::from_value(v).unwrap());
        assert_eq!(parse(json!({"prompt": "x", "echo": true})).unwrap_err().param.as_deref(), Some("echo"));
        assert_eq!(parse(json!({"prompt": "x", "best_of": 2})).unwrap_err().param.as_deref(), Some("best_of"));
        assert_eq!(parse(json!({"prompt": "x", "logprobs": 3})).unwrap().logprobs, Some(3));
    }

    #[test]
    fn model_must_be_absent_or_the_served_name() {
        assert!(check_model(None, "m").is_ok());
        assert!(check_model(Some("m"), "m").is_ok());
        assert_eq!(check_model(Some("x"), "m").unwrap_err().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn request_ids_are_prefixed_and_unique() {
        let (a, b) = (new_request_id("chatcmpl"), new_request_id("chatcmpl"));
        assert!(a.starts_with("chatcmpl-") && a.len() == "chatcmpl-".len() + 32);
        assert_ne!(a, b);
    }
}
