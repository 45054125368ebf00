//! Tool calls: a chat request's `tools`, `tool_choice` and `parallel_tool_calls`, and the calls read out of the
//! generated text.
//!
//! How the model calls a function depends on `tool_choice`:
//! - `auto` (the default when `tools` are given): the tools reach the model through its chat template, and the
//!   model may answer with calls in DeepSeek's syntax — `<｜tool▁calls▁begin｜>`, one
//!   `<｜tool▁call▁begin｜>…<｜tool▁call▁end｜>` block per call (DeepSeek-V3's `function<｜tool▁sep｜>name`
//!   with the arguments in a fenced `json` block, or V3.1's `name<｜tool▁sep｜>arguments`), `<｜tool▁calls▁end｜>`.
//!   The calls are read out of the text; the text before them is the content.
//! - `required`: a grammar makes the output a JSON array of one or more `{"name": …, "arguments": {…}}`
//!   objects (one with `parallel_tool_calls: false`), each with arguments valid against its function's schema.
//! - a named function: a grammar makes the output that function's arguments, valid against its schema.
//! - `none`: the tools are not shown to the model and the output is text.
//!
//! One reader serves answers and streams: [`ToolMode::read`] splits the text so far into content and calls, and
//! both only grow as text arrives, so [`ToolStream`] sends the difference after each token.

use std::collections::BTreeSet;

use baleen_api::openai::{
    ChatCompletionRequest, ChatDelta, FinishReason as WireFinishReason, FunctionCall, FunctionCallDelta, Tool,
    ToolCall, ToolCallDelta, ToolChoice,
};
use serde_json::{Map, Value, json};

use super::ApiError;
use super::params::{CommonParams, RESPONSE_FORMAT, new_request_id};
use crate::grammar::{MAX_SCHEMA_BYTES, OutputFormat};

/// Most tools a request may send (OpenAI's limit).
pub(crate) const MAX_TOOLS: usize = 128;
/// Longest function name (OpenAI's limit); names are ASCII letters, digits, `_` and `-`.
pub(crate) const MAX_FUNCTION_NAME: usize = 64;

/// The `type` of a tool and of a tool call.
pub(crate) const TOOL_TYPE_FUNCTION: &str = "function";
const TOOLS: &str = "tools";
const TOOL_CHOICE: &str = "tool_choice";

/// DeepSeek's markers: before a group of calls, around one call, and between a call's head and its body (the
/// group's end marker, `<｜tool▁calls▁end｜>`, is not needed to read the calls).
pub(crate) const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub(crate) const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub(crate) const CALL_END: &str = "<｜tool▁call▁end｜>";
pub(crate) const CALL_SEP: &str = "<｜tool▁sep｜>";

/// The keys of one call in the `required` grammar's array, in the order the grammar writes them.
const KEY_NAME: &str = "name";
const KEY_ARGUMENTS: &str = "arguments";

/// How the answer's calls are produced and read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolMode {
    /// No tools, or `tool_choice: none`: the output is content.
    Off,
    /// The model decides; calls in DeepSeek's syntax are read out of the text.
    Auto { parallel: bool },
    /// The output is a JSON array of calls (a grammar).
    Required,
    /// The output is this function's arguments (a grammar).
    Named(String),
}

/// What a chat request's tool fields ask for.
#[derive(Debug, Clone)]
pub(crate) struct ToolPlan {
    pub mode: ToolMode,
    /// The `tools` handed to the chat template (none with `tool_choice: none`).
    pub template_tools: Option<Vec<Value>>,
    /// The grammar that forces a call (`required` or a named function).
    pub format: Option<OutputFormat>,
}

impl ToolPlan {
    /// Checks the tools and the choice; errors are 400s naming the field.
    pub fn new(req: &ChatCompletionRequest) -> Result<Self, ApiError> {
        let tools = req.tools.as_deref().unwrap_or(&[]);
        check_tools(tools)?;
        let parallel = req.parallel_tool_calls.unwrap_or(true);
        let invalid = |message: String| ApiError::invalid_param(TOOL_CHOICE, message);
        let (mode, format) = match &req.tool_choice {
            None if tools.is_empty() => (ToolMode::Off, None),
            None => (ToolMode::Auto { parallel }, None),
            Some(ToolChoice::Mode(mode)) => match mode.as_str() {
                "none" => (ToolMode::Off, None),
                "auto" if tools.is_empty() => (ToolMode::Off, None),
                "auto" => (ToolMode::Auto { parallel }, None),
                "required" if tools.is_empty() => {
                    return Err(invalid("`tool_choice: required` needs at least one tool in `tools`".into()));
                }
                "required" => (ToolMode::Required, Some(sized(required_schema(tools, parallel))?)),
                other => {
                    return Err(invalid(format!(
                        "`tool_choice` is `none`, `auto`, `required` or a named function, not `{other}`"
                    )));
                }
            },
            Some(ToolChoice::Named(named)) => {
                if named.kind != TOOL_TYPE_FUNCTION {
                    return Err(invalid(format!("`tool_choice.type` must be `function`, got `{}`", named.kind)));
                }
                let name = &named.function.name;
                let Some(tool) = tools.iter().find(|t| &t.function.name == name) else {
                    return Err(invalid(format!("`tool_choice` names the function `{name}`, which is not in `tools`")));
                };
                (ToolMode::Named(name.clone()), Some(sized(arguments_schema(tool))?))
            }
        };
        let template_tools = match mode {
            ToolMode::Off => None,
            _ => Some(tools.iter().map(tool_value).collect()),
        };
        Ok(Self { mode, template_tools, format })
    }

    /// Sets the request's output format: the forced call's grammar (its errors naming `tools`), or
    /// `response_format`'s. A `response_format` grammar cannot hold a call, so with tools the model may call it
    /// is a 400.
    pub fn apply(&self, params: &mut CommonParams) -> Result<(), ApiError> {
        match (&self.mode, &params.format) {
            (ToolMode::Off, _) => Ok(()),
            (_, None) => {
                params.format = self.format.clone();
                params.format_param = TOOLS;
                Ok(())
            }
            (_, Some(_)) => Err(ApiError::invalid_param(
                RESPONSE_FORMAT,
                "`response_format` cannot be combined with `tools` unless `tool_choice` is `none`",
            )),
        }
    }
}

fn check_tools(tools: &[Tool]) -> Result<(), ApiError> {
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            TOOLS,
            format!("at most {MAX_TOOLS} tools are allowed, got {}", tools.len()),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let param = |field: &str| format!("tools[{i}].{field}");
        if tool.kind != TOOL_TYPE_FUNCTION {
            return Err(ApiError::invalid_param(
                &param("type"),
                format!("only tools of type `function` are supported, got `{}`", tool.kind),
            ));
        }
        let name = &tool.function.name;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || name.len() > MAX_FUNCTION_NAME || !name.chars().all(valid) {
            return Err(ApiError::invalid_param(
                &param("function.name"),
                format!("a function name is 1 to {MAX_FUNCTION_NAME} ASCII letters, digits, `_` or `-`, got `{name}`"),
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(ApiError::invalid_param(
                &param("function.name"),
                format!("two tools are named `{name}`; function names must be unique"),
            ));
        }
        if let Some(parameters) = &tool.function.parameters {
            let kind = parameters.get("type");
            if !parameters.is_object() || kind.is_some_and(|k| k.as_str() != Some("object")) {
                return Err(ApiError::invalid_param(
                    &param("function.parameters"),
                    "a function's `parameters` must be a JSON Schema of an object (`\"type\": \"object\"`)",
                ));
            }
        }
    }
    Ok(())
}

/// A forced call's schema as an output format, within [`MAX_SCHEMA_BYTES`].
fn sized(schema: Value) -> Result<OutputFormat, ApiError> {
    let size = serde_json::to_vec(&schema).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_SCHEMA_BYTES {
        return Err(ApiError::invalid_param(
            TOOLS,
            format!("the tools' parameter schemas may be at most {MAX_SCHEMA_BYTES} bytes of JSON, got {size}"),
        ));
    }
    Ok(OutputFormat::JsonSchema(schema))
}

/// The tool as the chat template sees it: OpenAI's object.
fn tool_value(tool: &Tool) -> Value {
    let mut function = Map::new();
    function.insert("name".into(), json!(tool.function.name));
    if let Some(description) = &tool.function.description {
        function.insert("description".into(), json!(description));
    }
    if let Some(parameters) = &tool.function.parameters {
        function.insert("parameters".into(), parameters.clone());
    }
    json!({"type": tool.kind, "function": function})
}

/// A function's arguments schema, always of an object (`"type": "object"` added where the schema leaves the type
/// open); none given means an empty parameter list (OpenAI's meaning), `{}`.
fn arguments_schema(tool: &Tool) -> Value {
    let mut schema = tool
        .function
        .parameters
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}, "additionalProperties": false}));
    if let Value::Object(map) = &mut schema {
        map.entry("type").or_insert_with(|| json!("object"));
    }
    schema
}

/// The `required` grammar: a JSON array of one or more calls (at most one unless `parallel`), each
/// `{"name": <a tool's name>, "arguments": <that tool's arguments>}`. Each tool's schema moves under the
/// top-level `$defs` as `tool<i>` (its `$defs` / `definitions` entries as `tool<i>.$defs.<name>` /
/// `tool<i>.definitions.<name>`), its local `$ref`s rewritten to match and its `$id` / `$schema` dropped (they
/// would change how the references resolve).
fn required_schema(tools: &[Tool], parallel: bool) -> Value {
    let mut defs = Map::new();
    let mut calls = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let key = format!("tool{i}");
        let mut schema = arguments_schema(tool);
        if let Value::Object(map) = &mut schema {
            map.remove("$id");
            map.remove("$schema");
            for defs_key in DEFS_KEYWORDS {
                if let Some(Value::Object(inner)) = map.remove(defs_key) {
                    for (name, mut def) in inner {
                        rebase_refs(&mut def, &key);
                        defs.insert(format!("{key}.{defs_key}.{name}"), def);
                    }
                }
            }
        }
        rebase_refs(&mut schema, &key);
        defs.insert(key.clone(), schema);
        let mut properties = Map::new();
        properties.insert(KEY_NAME.into(), json!({"const": tool.function.name}));
        properties.insert(KEY_ARGUMENTS.into(), json!({"$ref": format!("#/$defs/{key}")}));
        calls.push(json!({
            "type": "object", "properties": properties, "required": [KEY_NAME, KEY_ARGUMENTS],
            "additionalProperties": false
        }));
    }
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}, "$defs": defs});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    schema
}

/// The keywords holding a schema's named subschemas.
const DEFS_KEYWORDS: [&str; 2] = ["$defs", "definitions"];
/// Keywords whose values are data, not schemas: a `"$ref"` key inside them is not a reference.
const DATA_KEYWORDS: [&str; 4] = ["const", "enum", "default", "examples"];

/// Rewrites the local `$ref`s of a schema that moves to `#/$defs/<key>`: `#` → `#/$defs/<key>`,
/// `#/$defs/x…` → `#/$defs/<key>.$defs.x…` (`definitions` alike), any other `#/…` → `#/$defs/<key>/…`.
fn rebase_refs(schema: &mut Value, key: &str) {
    match schema {
        Value::Object(map) => {
            for (name, value) in map.iter_mut() {
                match value {
                    Value::String(r) if name == "$ref" => {
                        if let Some(rebased) = rebased_ref(r, key) {
                            *r = rebased;
                        }
                    }
                    _ if DATA_KEYWORDS.contains(&name.as_str()) => {}
                    other => rebase_refs(other, key),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rebase_refs(v, key)),
        _ => {}
    }
}

fn rebased_ref(r: &str, key: &str) -> Option<String> {
    if r == "#" {
        return Some(format!("#/$defs/{key}"));
    }
    let pointer = r.strip_prefix("#/")?;
    for defs_key in DEFS_KEYWORDS {
        if let Some(rest) = pointer.strip_prefix(defs_key).and_then(|p| p.strip_prefix('/')) {
            return Some(format!("#/$defs/{key}.{defs_key}.{rest}"));
        }
    }
    Some(format!("#/$defs/{key}/{pointer}"))
}

/// The text so far, split: the content, and each call's name and arguments (possibly still growing).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Reading<'a> {
    pub content: &'a str,
    pub calls: Vec<(&'a str, &'a str)>,
}

impl ToolMode {
    /// Reads `text`. Before the end (`finished` false) a possible start of DeepSeek's marker is held back from
    /// the content, and `auto` reports only complete calls; at the end, an `auto` text whose calls cannot be
    /// read is all content.
    pub fn read<'a>(&'a self, text: &'a str, finished: bool) -> Reading<'a> {
        match self {
            Self::Off => Reading { content: text, calls: Vec::new() },
            Self::Named(name) => Reading { content: "", calls: vec![(name.as_str(), text)] },
            Self::Required => {
                let calls = read_json_calls(text);
                // Cut before a first name was complete (a stop string, max_tokens): the text is not lost.
                let content = if finished && calls.is_empty() { text } else { "" };
                Reading { content, calls }
            }
            Self::Auto { parallel } => {
                let mut reading = read_deepseek_calls(text, finished);
                if !parallel {
                    reading.calls.truncate(1);
                }
                reading
            }
        }
    }
}

/// Calls in DeepSeek's syntax after the content.
fn read_deepseek_calls(text: &str, finished: bool) -> Reading<'_> {
    let Some(start) = text.find(CALLS_BEGIN) else {
        let keep = if finished { text.len() } else { text.len() - partial_suffix(text, CALLS_BEGIN) };
        return Reading { content: &text[..keep], calls: Vec::new() };
    };
    let mut calls = Vec::new();
    let mut rest = &text[start + CALLS_BEGIN.len()..];
    while let Some(block) = rest.trim_start().strip_prefix(CALL_BEGIN) {
        let Some(end) = block.find(CALL_END) else { break };
        let Some(call) = deepseek_call(&block[..end]) else { break };
        calls.push(call);
        rest = &block[end + CALL_END.len()..];
    }
    if finished && calls.is_empty() {
        return Reading { content: text, calls };
    }
    Reading { content: &text[..start], calls }
}

/// One call block: DeepSeek-V3's `function<｜tool▁sep｜>name\n```json\n{…}\n```` (the fence optional) or
/// V3.1's `name<｜tool▁sep｜>{…}`.
fn deepseek_call(block: &str) -> Option<(&str, &str)> {
    let (head, body) = block.split_once(CALL_SEP)?;
    let (name, arguments) = if head == TOOL_TYPE_FUNCTION {
        let (name, arguments) = body.split_once('\n')?;
        let arguments = arguments.trim();
        let unfenced = arguments.strip_prefix("```json").and_then(|a| a.strip_suffix("```"));
        (name.trim(), unfenced.unwrap_or(arguments).trim())
    } else {
        (head.trim(), body.trim())
    };
    (!name.is_empty()).then_some((name, arguments))
}

/// The length of the longest proper prefix of `marker` that `text` ends with.
fn partial_suffix(text: &str, marker: &str) -> usize {
    marker.char_indices().map(|(i, _)| i).skip(1).filter(|&k| text.ends_with(&marker[..k])).max().unwrap_or(0)
}

/// The calls of the `required` grammar's compact array so far: `[{"name":"f","arguments":{…}},…]`. A call
/// appears once its name is complete; its arguments are the text of their value so far.
fn read_json_calls(text: &str) -> Vec<(&str, &str)> {
    let name_key = format!("{{\"{KEY_NAME}\":\"");
    let arguments_key = format!(",\"{KEY_ARGUMENTS}\":");
    let mut calls = Vec::new();
    let Some(mut rest) = text.strip_prefix('[') else { return calls };
    // Function names hold no quote or backslash (checked), so a name ends at the next quote.
    while let Some((name, after)) = rest.strip_prefix(name_key.as_str()).and_then(|r| r.split_once('"')) {
        let Some(value) = after.strip_prefix(arguments_key.as_str()) else {
            if arguments_key.starts_with(after) {
                calls.push((name, ""));
            }
            break;
        };
        let Some(end) = json_value_end(value) else {
            calls.push((name, value));
            break;
        };
        calls.push((name, &value[..end]));
        match value[end..].strip_prefix("},") {
            Some(next) => rest = next,
            None => break,
        }
    }
    calls
}

/// Where the compact JSON value at the start of `s` ends, if it is complete.
fn json_value_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    match bytes.first()? {
        b'{' | b'[' => {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            for (i, &b) in bytes.iter().enumerate() {
                if in_string {
                    match b {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        b'"' => {
            let mut escaped = false;
            for (i, &b) in bytes.iter().enumerate().skip(1) {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => return Some(i + 1),
                    _ => {}
                }
            }
            None
        }
        _ => bytes.iter().position(|b| matches!(b, b',' | b'}' | b']')),
    }
}

/// A fresh tool call id, `call_` and 32 hex digits.
fn new_call_id() -> String {
    new_request_id("call").replacen('-', "_", 1)
}

/// The calls of a finished answer, with fresh ids.
pub(crate) fn tool_calls(reading: &Reading<'_>) -> Vec<ToolCall> {
    reading
        .calls
        .iter()
        .map(|(name, arguments)| ToolCall {
            id: new_call_id(),
            kind: TOOL_TYPE_FUNCTION.to_string(),
            function: FunctionCall { name: name.to_string(), arguments: arguments.to_string() },
        })
        .collect()
}

impl ToolMode {
    /// The answer's finish reason, given the engine's and the answer's `text`: `tool_calls` when it called and
    /// stopped naturally with every call complete (an answer cut by a stop string inside the `required` array
    /// keeps `stop`, `length` and `abort` stay). A named function's call finishes with `stop`, as OpenAI's and
    /// vLLM's do.
    pub fn finish_reason(&self, reason: WireFinishReason, text: &str) -> WireFinishReason {
        let called = match self {
            Self::Off | Self::Named(_) => false,
            Self::Auto { .. } => !self.read(text, true).calls.is_empty(),
            Self::Required => serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok(),
        };
        match reason {
            WireFinishReason::Stop if called => WireFinishReason::ToolCalls,
            other => other,
        }
    }
}

/// Turns a stream's text into content and tool-call deltas: after each piece it reads the text again and sends
/// what grew (new content; a new call's id, name and arguments so far; more arguments of a call).
#[derive(Debug)]
pub(crate) struct ToolStream {
    mode: ToolMode,
    text: String,
    /// Bytes of `text` sent as content; the rest is read again after each piece.
    content_sent: usize,
    /// Per call sent: the bytes of its arguments sent.
    arguments_sent: Vec<usize>,
}

impl ToolStream {
    pub fn new(mode: ToolMode) -> Self {
        Self { mode, text: String::new(), content_sent: 0, arguments_sent: Vec::new() }
    }

    /// The stream's finish reason ([`ToolMode::finish_reason`] of the whole text).
    pub fn finish_reason(&self, reason: WireFinishReason) -> WireFinishReason {
        self.mode.finish_reason(reason, &self.text)
    }

    /// The delta `piece` adds (`finished`: it is the last), empty when nothing is ready to send.
    pub fn push(&mut self, piece: &str, finished: bool) -> ChatDelta {
        self.text.push_str(piece);
        let unsent = self.text.get(self.content_sent..).unwrap_or_default();
        let reading = self.mode.read(unsent, finished);
        let content = (!reading.content.is_empty()).then(|| reading.content.to_string());
        let mut deltas = Vec::new();
        for (index, (name, arguments)) in reading.calls.iter().enumerate() {
            match self.arguments_sent.get_mut(index) {
                None => {
                    deltas.push(ToolCallDelta {
                        index: index as u32,
                        id: Some(new_call_id()),
                        kind: Some(TOOL_TYPE_FUNCTION.to_string()),
                        function: FunctionCallDelta {
                            name: Some(name.to_string()),
                            arguments: Some(arguments.to_string()),
                        },
                    });
                    self.arguments_sent.push(arguments.len());
                }
                Some(sent) if arguments.len() > *sent => {
                    let more = arguments.get(*sent..).unwrap_or_default();
                    deltas.push(ToolCallDelta {
                        index: index as u32,
                        id: None,
                        kind: None,
                        function: FunctionCallDelta { name: None, arguments: Some(more.to_string()) },
                    });
                    *sent = arguments.len();
                }
                Some(_) => {}
            }
        }
        self.content_sent += reading.content.len();
        ChatDelta { role: None, content, tool_calls: deltas }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use axum::http::StatusCode;

    use super::*;

    const CALLS_END: &str = "<｜tool▁calls▁end｜>";

    fn request(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn plan(extra: Value) -> Result<ToolPlan, ApiError> {
        ToolPlan::new(&request(extra))
    }

    #[test]
    fn tool_choice_picks_the_mode_and_the_grammar() {
        assert_eq!(plan(json!({})).unwrap().mode, ToolMode::Off);
        let auto = plan(json!({"tools": [weather()]})).unwrap();
        assert_eq!(auto.mode, ToolMode::Auto { parallel: true });
        assert!(auto.format.is_none());
        assert_eq!(auto.template_tools.unwrap()[0]["function"]["name"], "get_weather");
        let none = plan(json!({"tools": [weather()], "tool_choice": "none"})).unwrap();
        assert_eq!((none.mode, none.template_tools), (ToolMode::Off, None));
        let named = plan(json!({"tools": [weather()], "tool_choice":
                               {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap();
        assert_eq!(named.mode, ToolMode::Named("get_weather".into()));
        assert_eq!(named.format, Some(OutputFormat::JsonSchema(weather()["function"]["parameters"].clone())));
        let required =
            plan(json!({"tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false})).unwrap();
        let Some(OutputFormat::JsonSchema(schema)) = required.format else { panic!() };
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(schema["items"]["anyOf"][0]["properties"]["name"], json!({"const": "get_weather"}));
        assert_eq!(schema["$defs"]["tool0"]["required"], json!(["city"]));
    }

    #[test]
    fn bad_tools_and_choices_are_400_naming_the_field() {
        let mut many = Vec::new();
        for i in 0..=MAX_TOOLS {
            let mut t = weather();
            t["function"]["name"] = json!(format!("f{i}"));
            many.push(t);
        }
        let named = |name: &str| json!({"type": "function", "function": {"name": name}});
        for (extra, param) in [
            (json!({"tools": many}), "tools"),
            (json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}), "tools[0].type"),
            (json!({"tools": [named("bad name")]}), "tools[0].function.name"),
            (json!({"tools": [named(&"x".repeat(65))]}), "tools[0].function.name"),
            (json!({"tools": [weather(), weather()]}), "tools[1].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
                "tools[0].function.parameters",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": [weather()], "tool_choice": "sometimes"}), "tool_choice"),
            (json!({"tools": [weather()], "tool_choice": named("other")}), "tool_choice"),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "x", "function": {"name": "get_weather"}}}),
                "tool_choice",
            ),
        ] {
            let e = plan(extra.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(param)), "{extra}: {e}");
        }
        let json_object = || CommonParams {
            format: Some(OutputFormat::JsonObject),
            format_param: RESPONSE_FORMAT,
            ..CommonParams::default()
        };
        let auto = plan(json!({"tools": [weather()]})).unwrap();
        let e = auto.apply(&mut json_object()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(RESPONSE_FORMAT));
        let off = plan(json!({"tools": [weather()], "tool_choice": "none"})).unwrap();
        let mut params = json_object();
        off.apply(&mut params).unwrap();
        assert_eq!((params.format, params.format_param), (Some(OutputFormat::JsonObject), RESPONSE_FORMAT));
        let required = plan(json!({"tools": [weather()], "tool_choice": "required"})).unwrap();
        let mut params = CommonParams::default();
        required.apply(&mut params).unwrap();
        assert!(matches!(params.format, Some(OutputFormat::JsonSchema(_))));
        assert_eq!(params.format_param, TOOLS);
    }

    #[test]
    fn required_schemas_move_each_tools_defs_and_refs() {
        let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {"name": "plan_trip",
            "parameters": {"type": "object", "properties": {"stop": {"$ref": "#/$defs/Stop"},
                                                            "again": {"$ref": "#"}},
                           "$defs": {"Stop": {"type": "object", "properties": {
                               "next": {"$ref": "#/$defs/Stop"}, "city": {"$ref": "#/properties/stop"}}}}}}}))
        .unwrap();
        let schema = required_schema(&[tool], true);
        let defs = &schema["$defs"];
        assert_eq!(defs["tool0"]["properties"]["stop"]["$ref"], "#/$defs/tool0.$defs.Stop");
        assert_eq!(defs["tool0"]["properties"]["again"]["$ref"], "#/$defs/tool0");
        assert_eq!(defs["tool0.$defs.Stop"]["properties"]["next"]["$ref"], "#/$defs/tool0.$defs.Stop");
        assert_eq!(defs["tool0.$defs.Stop"]["properties"]["city"]["$ref"], "#/$defs/tool0/properties/stop");
        assert!(defs["tool0"].get("$defs").is_none());
        assert!(schema.get("maxItems").is_none());
    }

    #[test]
    fn deepseek_calls_are_read_in_both_syntaxes() {
        let v3 = format!(
            "Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{CALL_SEP}get_weather\n```json\n{{\"city\": \"Oslo\"}}\n```\
             {CALL_END}\n{CALL_BEGIN}function{CALL_SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}"
        );
        let auto = ToolMode::Auto { parallel: true };
        let r = auto.read(&v3, true);
        assert_eq!(r.content, "Let me check.");
        assert_eq!(r.calls, vec![("get_weather", "{\"city\": \"Oslo\"}"), ("get_time", "{}")]);
        let single = ToolMode::Auto { parallel: false };
        assert_eq!(single.read(&v3, true).calls.len(), 1);
        let v31 = format!("{CALLS_BEGIN}{CALL_BEGIN}get_weather{CALL_SEP}{{\"city\":\"Oslo\"}}{CALL_END}{CALLS_END}");
        assert_eq!(auto.read(&v31, true), Reading { content: "", calls: vec![("get_weather", "{\"city\":\"Oslo\"}")] });
        let broken = format!("Hi{CALLS_BEGIN}nonsense");
        assert_eq!(auto.read(&broken, true), Reading { content: &broken, calls: vec![] });
        assert_eq!(auto.read(&broken, false), Reading { content: "Hi", calls: vec![] });
        assert_eq!(auto.read("a <｜tool", false).content, "a ");
        assert_eq!(auto.read("a <｜tool", true).content, "a <｜tool");
        assert_eq!(auto.read("1 < 2", false).content, "1 < 2");
    }

    #[test]
    fn json_calls_are_read_while_they_grow() {
        let text =
            r#"[{"name":"get_weather","arguments":{"city":"O\"}slo","n":[1,{"a":2}]}},{"name":"f","arguments":{}}]"#;
        let all = read_json_calls(text);
        assert_eq!(all, vec![("get_weather", r#"{"city":"O\"}slo","n":[1,{"a":2}]}"#), ("f", "{}")]);
        for cut in 0..text.len() {
            let calls = read_json_calls(&text[..cut]);
            for (i, (name, arguments)) in calls.iter().enumerate() {
                assert_eq!(*name, all[i].0, "cut at {cut}");
                assert!(all[i].1.starts_with(arguments), "cut at {cut}: {arguments}");
            }
        }
        assert_eq!(read_json_calls(r#"[{"name":"get_wea"#), vec![]);
        assert_eq!(read_json_calls(r#"[{"name":"get_weather","#), vec![("get_weather", "")]);
    }

    #[test]
    fn streams_send_what_grew_and_end_with_the_same_calls_as_answers() {
        let text =
            format!("Sure.{CALLS_BEGIN}{CALL_BEGIN}get_weather{CALL_SEP}{{\"city\":\"Oslo\"}}{CALL_END}{CALLS_END}");
        let mode = ToolMode::Auto { parallel: true };
        let mut stream = ToolStream::new(mode.clone());
        let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
        let chars: Vec<char> = text.chars().collect();
        for (i, c) in chars.iter().enumerate() {
            let delta = stream.push(&c.to_string(), i + 1 == chars.len());
            content.push_str(delta.content.as_deref().unwrap_or_default());
            for d in delta.tool_calls {
                if let Some(name) = d.function.name {
                    assert!(d.id.is_some());
                    calls.push((name, String::new()));
                }
                calls[d.index as usize].1.push_str(&d.function.arguments.unwrap_or_default());
            }
        }
        let answer = mode.read(&text, true);
        assert_eq!(content, answer.content);
        let answer_calls: Vec<(String, String)> =
            answer.calls.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
        assert_eq!(calls, answer_calls);
        assert_eq!(stream.finish_reason(WireFinishReason::Stop), WireFinishReason::ToolCalls);

        let mut named = ToolStream::new(ToolMode::Named("f".into()));
        let first = named.push("{\"a\"", false);
        assert_eq!(first.tool_calls[0].function.name.as_deref(), Some("f"));
        assert_eq!(first.tool_calls[0].function.arguments.as_deref(), Some("{\"a\""));
        let more = named.push(":1}", true);
        assert_eq!(
            (more.tool_calls[0].id.as_ref(), more.tool_calls[0].function.arguments.as_deref()),
            (None, Some(":1}"))
        );
        assert_eq!(more.content, None);
    }

    #[test]
    fn the_builtin_template_writes_calls_the_reader_reads_back() {
        use crate::tokenizer::{ByteTokenizer, ChatMessage};
        let call = json!({"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}});
        let turn = ChatMessage { tool_calls: Some(vec![call]), content: None, ..ChatMessage::new("assistant", "") };
        let tools = [tool_value(&serde_json::from_value(weather()).unwrap())];
        let text = ByteTokenizer::new().apply_chat_template(&[turn], Some(&tools), false).unwrap();
        let (system, answer) = text.split_once("<|assistant|>").unwrap();
        assert!(system.starts_with("<|bos|><|system|>") && system.contains(r#"{"name": "get_weather""#), "{text}");
        assert!(system.contains(CALLS_BEGIN) && system.contains(CALL_SEP), "the syntax is explained: {text}");
        let answer = answer.strip_suffix("<|eos|>").unwrap();
        let reading = ToolMode::Auto { parallel: true }.read(answer, true);
        assert_eq!(reading, Reading { content: "", calls: vec![("get_weather", r#"{"city":"Oslo"}"#)] });
        assert!(answer.ends_with(CALLS_END));
    }

    #[test]
    fn finish_reasons_say_tool_calls_only_for_complete_calls() {
        use WireFinishReason::{Length, Stop, ToolCalls};
        let required = ToolMode::Required;
        let done = r#"[{"name":"f","arguments":{}}]"#;
        assert_eq!(required.finish_reason(Stop, done), ToolCalls);
        assert_eq!(required.finish_reason(Length, &done[..10]), Length);
        assert_eq!(required.finish_reason(Stop, &done[..20]), Stop, "a stop string cut the array");
        assert_eq!(ToolMode::Named("f".into()).finish_reason(Stop, "{}"), Stop, "as OpenAI for a named function");
        let auto = ToolMode::Auto { parallel: true };
        let call = format!("{CALLS_BEGIN}{CALL_BEGIN}f{CALL_SEP}{{}}{CALL_END}");
        assert_eq!(auto.finish_reason(Stop, &call), ToolCalls);
        assert_eq!(auto.finish_reason(Stop, "hello"), Stop);
        assert_eq!(ToolMode::Off.finish_reason(Length, "x"), Length);
    }

    #[test]
    fn required_streams_equal_answers_token_by_token_and_cut_answers_keep_their_text() {
        let text =
            r#"[{"name":"get_weather","arguments":{"city":"Oslo","n":[1,2]}},{"name":"get_time","arguments":{}}]"#;
        let mut stream = ToolStream::new(ToolMode::Required);
        let mut calls: Vec<(String, String)> = Vec::new();
        for (i, c) in text.char_indices() {
            let delta = stream.push(&c.to_string(), i + 1 == text.len());
            assert_eq!(delta.content, None);
            for d in delta.tool_calls {
                if let Some(name) = d.function.name {
                    calls.push((name, String::new()));
                }
                calls[d.index as usize].1.push_str(&d.function.arguments.unwrap_or_default());
            }
        }
        let answer: Vec<(String, String)> =
            read_json_calls(text).iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
        assert_eq!(calls, answer);
        assert_eq!(answer[0].1, r#"{"city":"Oslo","n":[1,2]}"#);
        let cut = r#"[{"name":"get_w"#;
        assert_eq!(ToolMode::Required.read(cut, true), Reading { content: cut, calls: vec![] });
        assert_eq!(ToolMode::Required.read(cut, false), Reading { content: "", calls: vec![] });
    }

    #[test]
    fn parameters_must_describe_an_object_and_get_the_type_when_it_is_open() {
        let open = json!({"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {}}}}});
        let named = json!({"type": "function", "function": {"name": "f"}});
        let p = plan(json!({"tools": [open], "tool_choice": named})).unwrap();
        let Some(OutputFormat::JsonSchema(schema)) = p.format else { panic!() };
        assert_eq!(schema["type"], "object");
        assert_eq!(p.template_tools.unwrap()[0]["function"]["parameters"], json!({"properties": {"a": {}}}));
        let string = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}});
        let e = plan(json!({"tools": [string]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.parameters"));
    }

    #[test]
    fn rebased_required_schemas_compile_and_accept_their_calls() {
        use crate::grammar::Grammars;
        use crate::tokenizer::Tokenizer;
        let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {"name": "plan",
            "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                           "properties": {"stop": {"$ref": "#/definitions/Stop"},
                                          "tag": {"const": {"$ref": "#/x"}}},
                           "required": ["stop", "tag"], "additionalProperties": false,
                           "definitions": {"Stop": {"type": "object", "properties": {"city": {"enum": ["Oslo"]}},
                                                    "required": ["city"], "additionalProperties": false}},
                           "$defs": {"Stop": {"type": "string"}}}}}))
        .unwrap();
        let schema = required_schema(&[tool], true);
        assert_eq!(schema["$defs"]["tool0"]["properties"]["tag"]["const"], json!({"$ref": "#/x"}), "data untouched");
        let grammars = Grammars::new(std::sync::Arc::new(Tokenizer::byte_level()), 264).unwrap();
        let mut constraint = grammars.compile(&OutputFormat::JsonSchema(schema)).unwrap();
        let call = r##"[{"name":"plan","arguments":{"stop":{"city":"Oslo"},"tag":{"$ref":"#/x"}}}]"##;
        for &b in call.as_bytes() {
            let mut logits = vec![0.0f32; 264];
            constraint.mask(&mut logits).unwrap();
            assert!(logits[usize::from(b)] > f32::NEG_INFINITY, "refused {:?} in {call}", b as char);
            constraint.consume(u32::from(b)).unwrap();
        }
        assert!(constraint.is_finished());
    }

    #[test]
    fn a_v3_call_without_its_fence_still_reads_and_a_bad_head_is_no_call() {
        let auto = ToolMode::Auto { parallel: true };
        let unfenced = format!("{CALLS_BEGIN}{CALL_BEGIN}function{CALL_SEP}f\n{{\"a\":1}}{CALL_END}");
        assert_eq!(auto.read(&unfenced, true).calls, vec![("f", "{\"a\":1}")]);
        let headless = format!("{CALLS_BEGIN}{CALL_BEGIN}function{CALL_SEP}{{}}{CALL_END}");
        assert_eq!(auto.read(&headless, true).content, headless);
    }
}
