//! What `baleen up` prints once the runtime is ready (pure, so the exact text is tested), and [`say`], which
//! prints a line of progress.

use std::io::Write;
use std::net::SocketAddr;

use baleen_api::names::BUILTIN_TINY_MOE;
use serde_json::json;

/// The OpenAI base URL of a runtime reached at `addr`.
pub fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1")
}

/// A `curl` command that sends one chat completion for `model` to `base_url`.
pub fn curl_line(base_url: &str, model: &str) -> String {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": 32,
    });
    format!(
        "curl -sS {} -H 'Content-Type: application/json' -d {}",
        shell_quote(&format!("{base_url}/chat/completions")),
        shell_quote(&body.to_string())
    )
}

/// The lines printed when every replica is ready; `details` (`  name: value` lines) follow the model's.
pub fn ready_lines(addr: SocketAddr, model: &str, demo: bool, details: &[String]) -> Vec<String> {
    let base = base_url(addr);
    let mut lines =
        vec!["ready.".to_string(), format!("  OpenAI base URL: {base}"), format!("  model:           {model}")];
    lines.extend(details.iter().cloned());
    lines.extend(["  try it:".to_string(), format!("    {}", curl_line(&base, model))]);
    if demo {
        lines.push(format!(
            "  note: {BUILTIN_TINY_MOE} has random weights: it shows the serving stack working, and its replies are \
             noise. Pass a manifest with a real model (hf://org/name or file:///path/to/model) to serve one."
        ));
    }
    lines.push("Press Ctrl-C to stop.".to_string());
    lines
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Progress for the person at the terminal, on stdout (the runtime's logs go to stderr). A closed stdout
/// (`baleen up | head`) must not stop the server, so write errors are ignored.
pub(crate) fn say(line: impl AsRef<str>) {
    let _ = writeln!(std::io::stdout().lock(), "{}", line.as_ref());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// The JSON body of a curl line (key order depends on serde_json's features, so compare values).
    fn body_of(line: &str) -> serde_json::Value {
        let quoted = line.split(" -d ").nth(1).unwrap();
        let word = quoted.strip_prefix('\'').unwrap().strip_suffix('\'').unwrap().replace(r"'\''", "'");
        serde_json::from_str(&word).unwrap()
    }

    #[test]
    fn the_banner_has_the_url_the_model_and_a_curl_line() {
        let lines = ready_lines("127.0.0.1:8080".parse().unwrap(), "whale-demo", false, &[]);
        let text = lines.join("\n");
        assert!(text.contains("OpenAI base URL: http://127.0.0.1:8080/v1"), "{text}");
        assert!(text.contains("model:           whale-demo"), "{text}");
        let curl = lines.iter().find(|l| l.trim_start().starts_with("curl ")).unwrap();
        assert!(
            curl.contains(
                "curl -sS 'http://127.0.0.1:8080/v1/chat/completions' -H 'Content-Type: application/json' -d '"
            ),
            "{curl}"
        );
        assert_eq!(
            body_of(curl),
            json!({"model": "whale-demo", "messages": [{"role": "user", "content": "Hello! Who are you?"}], "max_tokens": 32})
        );
        assert!(!text.contains("random weights"));
        let demo = ready_lines("127.0.0.1:8080".parse().unwrap(), "tiny-moe", true, &[]).join("\n");
        assert!(demo.contains("builtin:tiny-moe has random weights"), "{demo}");
    }

    #[test]
    fn model_names_with_quotes_stay_one_shell_word() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(body_of(&curl_line("http://h:1/v1", "it's"))["model"], "it's");
    }
}
