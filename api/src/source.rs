//! [`ModelSource`]: where a `ModelDeployment`'s weights come from, parsed from `spec.model.source`.
//!
//! | form | meaning |
//! |---|---|
//! | `hf://org/name[@revision]` | a Hugging Face Hub repository, at `revision` (branch, tag or commit) or the default branch |
//! | `pvc://claim/path` | the directory `path` inside the PersistentVolumeClaim `claim` (`pvc://claim` = its root) |
//! | `file:///path` | a model directory on the local filesystem (absolute path) |
//! | `builtin:NAME` | a model built into the runtime, e.g. `builtin:tiny-moe` (random weights, a demo) |

use std::fmt;
use std::str::FromStr;

use crate::names::{BUILTIN_SCHEME, FILE_SCHEME, HF_SCHEME, MODELS_DIR, PVC_SCHEME};

/// Where the weights come from; see the module documentation for the string forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `hf://org/name[@revision]`.
    HuggingFace {
        /// `org/name`.
        repo: String,
        /// Branch, tag or commit; `None` is the repository's default branch.
        revision: Option<String>,
    },
    /// `pvc://claim/path`.
    Pvc {
        /// Name of the PersistentVolumeClaim.
        claim: String,
        /// Directory inside the claim, without a leading `/`; empty for the claim's root.
        path: String,
    },
    /// `file:///path`.
    File {
        /// Absolute path of the model directory.
        path: String,
    },
    /// `builtin:NAME`.
    Builtin {
        /// The built-in model's name (`tiny-moe`).
        name: String,
    },
}

/// Why a `source` string is not a [`ModelSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The string is empty (or only whitespace).
    #[error("is empty; expected hf://org/name[@revision], pvc://claim/path, file:///path or builtin:NAME")]
    Empty,
    /// The string starts with no scheme this version knows.
    #[error(
        "`{0}` has no known scheme; expected hf://org/name[@revision], pvc://claim/path, file:///path or builtin:NAME"
    )]
    UnknownScheme(String),
    /// The scheme is known but the rest of the string is not of its form.
    #[error("`{given}`: {reason}")]
    Malformed {
        /// The whole source string.
        given: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ModelSource {
    /// The runtime's `--model` in a rank pod: `builtin:NAME` and `hf://org/name[@revision]` as they are (the
    /// runtime reads a Hub model from the pod's Hub cache, `/models/hf`), the `file://` path, or the claim's mount
    /// (`/models/<claim>[/<path>]`).
    pub fn pod_model_arg(&self) -> String {
        match self {
            Self::Builtin { .. } | Self::HuggingFace { .. } => self.to_string(),
            Self::File { path } => path.clone(),
            Self::Pvc { claim, path } if path.is_empty() => format!("{MODELS_DIR}/{claim}"),
            Self::Pvc { claim, path } => format!("{MODELS_DIR}/{claim}/{path}"),
        }
    }

    /// True for sources whose weights live on this machine or in the runtime (`file://`, `builtin:`); false for
    /// those that need a cluster or a download (`hf://`, `pvc://`).
    pub fn is_local(&self) -> bool {
        matches!(self, Self::File { .. } | Self::Builtin { .. })
    }
}

impl FromStr for ModelSource {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, SourceError> {
        let malformed = |reason| SourceError::Malformed { given: s.to_string(), reason };
        if s.trim().is_empty() {
            return Err(SourceError::Empty);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(malformed("must not contain whitespace"));
        }
        if let Some(rest) = s.strip_prefix(HF_SCHEME) {
            let (repo, revision) = match rest.split_once('@') {
                Some((_, rev)) if rev.is_empty() || rev.contains('@') => {
                    return Err(malformed("the revision after `@` must be one non-empty name"));
                }
                Some((repo, rev)) => (repo, Some(rev.to_string())),
                None => (rest, None),
            };
            match repo.split_once('/') {
                Some((org, name)) if !org.is_empty() && !name.is_empty() && !name.contains('/') => {}
                _ => return Err(malformed("expected hf://org/name or hf://org/name@revision")),
            }
            return Ok(Self::HuggingFace { repo: repo.to_string(), revision });
        }
        if let Some(rest) = s.strip_prefix(PVC_SCHEME) {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !is_dns_label(claim) {
                return Err(malformed(
                    "expected pvc://claim/path, where claim is a PersistentVolumeClaim name (lowercase letters, digits, `-`)",
                ));
            }
            let path = path.trim_end_matches('/');
            if path.split('/').any(|segment| segment == "..") {
                return Err(malformed("the path inside the claim must not contain `..`"));
            }
            return Ok(Self::Pvc { claim: claim.to_string(), path: path.to_string() });
        }
        if let Some(rest) = s.strip_prefix(FILE_SCHEME) {
            if !rest.starts_with('/') || rest.len() < 2 {
                return Err(malformed("expected an absolute path, file:///path/to/model (three slashes)"));
            }
            return Ok(Self::File { path: rest.to_string() });
        }
        if let Some(name) = s.strip_prefix(BUILTIN_SCHEME) {
            if name.is_empty() {
                return Err(malformed("expected builtin:NAME, e.g. builtin:tiny-moe"));
            }
            return Ok(Self::Builtin { name: name.to_string() });
        }
        Err(SourceError::UnknownScheme(s.to_string()))
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HuggingFace { repo, revision: Some(rev) } => write!(f, "{HF_SCHEME}{repo}@{rev}"),
            Self::HuggingFace { repo, revision: None } => write!(f, "{HF_SCHEME}{repo}"),
            Self::Pvc { claim, path } if path.is_empty() => write!(f, "{PVC_SCHEME}{claim}"),
            Self::Pvc { claim, path } => write!(f, "{PVC_SCHEME}{claim}/{path}"),
            Self::File { path } => write!(f, "{FILE_SCHEME}{path}"),
            Self::Builtin { name } => write!(f, "{BUILTIN_SCHEME}{name}"),
        }
    }
}

/// A DNS-1123 label: 1–63 lowercase letters, digits and `-`, starting and ending with a letter or digit.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || c == '-')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(s: &str) -> Result<ModelSource, SourceError> {
        s.parse()
    }

    #[test]
    fn every_scheme_parses_and_round_trips() {
        let cases = [
            (
                "hf://deepseek-ai/DeepSeek-V3",
                ModelSource::HuggingFace { repo: "deepseek-ai/DeepSeek-V3".into(), revision: None },
            ),
            (
                "hf://deepseek-ai/DeepSeek-V2-Lite@v1.0",
                ModelSource::HuggingFace { repo: "deepseek-ai/DeepSeek-V2-Lite".into(), revision: Some("v1.0".into()) },
            ),
            ("pvc://models/deepseek/v3", ModelSource::Pvc { claim: "models".into(), path: "deepseek/v3".into() }),
            ("pvc://models", ModelSource::Pvc { claim: "models".into(), path: String::new() }),
            ("file:///srv/models/v3", ModelSource::File { path: "/srv/models/v3".into() }),
            ("builtin:tiny-moe", ModelSource::Builtin { name: "tiny-moe".into() }),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn trailing_slash_of_a_pvc_path_is_dropped() {
        assert_eq!(parse("pvc://models/v3/").unwrap(), ModelSource::Pvc { claim: "models".into(), path: "v3".into() });
    }

    #[test]
    fn only_file_and_builtin_are_local() {
        assert!(parse("builtin:tiny-moe").unwrap().is_local());
        assert!(parse("file:///m").unwrap().is_local());
        assert!(!parse("hf://a/b").unwrap().is_local());
        assert!(!parse("pvc://c/p").unwrap().is_local());
    }

    #[test]
    fn empty_and_unknown_schemes_are_refused() {
        assert_eq!(parse(""), Err(SourceError::Empty));
        assert_eq!(parse("  "), Err(SourceError::Empty));
        for s in ["s3://bucket/model", "/models/v3", "deepseek-ai/DeepSeek-V3", "HF://a/b"] {
            assert_eq!(parse(s), Err(SourceError::UnknownScheme(s.into())), "{s}");
        }
    }

    #[test]
    fn malformed_sources_say_what_form_is_expected() {
        for s in [
            "hf://",
            "hf://only-name",
            "hf://org/",
            "hf:///name",
            "hf://a/b/c",
            "hf://a/b@",
            "hf://a/b@x@y",
            "pvc://",
            "pvc:///path",
            "pvc://Upper/path",
            "pvc://claim/../etc",
            "file://relative/path",
            "file://",
            "file:///",
            "builtin:",
            "builtin:tiny moe",
        ] {
            match parse(s) {
                Err(SourceError::Malformed { given, reason }) => {
                    assert_eq!(given, s);
                    assert!(!reason.is_empty());
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("models-1"));
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
