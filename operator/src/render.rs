//! `baleen-operator crd` and `render`: the CRD and every object for a file of ModelDeployments, as YAML.
//!
//! `render` is to the operator what `helm template` is to a chart: it runs the same builders the controller
//! applies ([`crate::resources::desired_objects`]) on ModelDeployments read from a file instead of the cluster.
//! Differences from a live reconcile: the groups are `0..replicas` of the current revision (a cluster in the middle
//! of a rollout has others too), objects carry no owner reference (a file has no `uid`), and a document without a
//! namespace is placed in `default`.

use baleen_api::crd::{ModelDeployment, validate_name};
use baleen_api::names::{CRD_API_VERSION, CRD_KIND};
use kube::{CustomResourceExt, ResourceExt};
use serde::Deserialize;

use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::resources::{GroupRef, desired_objects, revision};

/// Namespace of a rendered ModelDeployment that names none (what `kubectl apply` would pick without a context
/// namespace).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Separator between the documents of a YAML stream.
const DOCUMENT_SEPARATOR: &str = "---\n";

/// The ModelDeployment CRD as YAML.
pub fn crd_yaml() -> Result<String> {
    serde_yaml::to_string(&ModelDeployment::crd())
        .map_err(|e| Error::Serialize { what: "the ModelDeployment CRD".into(), reason: e.to_string() })
}

/// Every object the operator would create for the ModelDeployment documents in `text`, as a YAML stream: for each
/// document in order, [`desired_objects`] for groups `0..replicas` of its revision. Empty documents are skipped;
/// anything that is not a valid ModelDeployment is refused with the document's number (from 1) and the field.
pub fn render_yaml(text: &str, config: &OperatorConfig) -> Result<String> {
    let deployments = parse_deployments(text)?;
    let mut out = String::new();
    for (number, md) in &deployments {
        let doc_error = |e: Error| document_error(*number, e.to_string());
        let revision = revision(md, config).map_err(doc_error)?;
        let groups: Vec<GroupRef> =
            (0..md.spec.replicas()).map(|index| GroupRef { revision: revision.clone(), index }).collect();
        for object in desired_objects(md, &groups, config).map_err(doc_error)? {
            let yaml = serde_yaml::to_string(&object).map_err(|e| Error::Serialize {
                what: format!("{} {}", object.types.as_ref().map_or("object", |t| t.kind.as_str()), object.name_any()),
                reason: e.to_string(),
            })?;
            out.push_str(DOCUMENT_SEPARATOR);
            out.push_str(&yaml);
        }
    }
    Ok(out)
}

fn document_error(number: usize, reason: String) -> Error {
    Error::Input { path: format!("document {number}"), reason }
}

/// The ModelDeployments of a YAML stream with their document numbers (from 1), validated, namespaced.
pub fn parse_deployments(text: &str) -> Result<Vec<(usize, ModelDeployment)>> {
    let mut deployments: Vec<(usize, ModelDeployment)> = Vec::new();
    // Each document is read twice: as a plain value to check its type first (so a manifest of another kind is
    // refused for its kind, not for whichever field ModelDeployment does not know), then from the text itself, so
    // serde_yaml's errors give the field's path and the line in the file.
    let typed = serde_yaml::Deserializer::from_str(text);
    for (i, (document, again)) in serde_yaml::Deserializer::from_str(text).zip(typed).enumerate() {
        let number = i + 1;
        let error = |reason: String| document_error(number, reason);
        let value = serde_yaml::Value::deserialize(document).map_err(|e| error(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str).map(str::to_string);
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if api_version.as_deref() != Some(CRD_API_VERSION) || kind.as_deref() != Some(CRD_KIND) {
            return Err(error(format!(
                "`apiVersion`/`kind`: expected {CRD_API_VERSION} {CRD_KIND}, found {} {}",
                api_version.as_deref().unwrap_or("(none)"),
                kind.as_deref().unwrap_or("(none)"),
            )));
        }
        let mut md = ModelDeployment::deserialize(again).map_err(|e| error(e.to_string()))?;
        let name = md.metadata.name.clone().unwrap_or_default();
        validate_name(&name).map_err(|e| error(e.to_string()))?;
        md.spec.validate().map_err(|e| error(e.to_string()))?;
        md.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
        if let Some((first, _)) =
            deployments.iter().find(|(_, other)| other.name_any() == name && other.namespace() == md.namespace())
        {
            return Err(error(format!(
                "`metadata.name`: `{name}` is also the name of document {first} in the same namespace"
            )));
        }
        deployments.push((number, md));
    }
    if deployments.is_empty() {
        return Err(Error::Input { path: "input".into(), reason: format!("no {CRD_KIND} documents") });
    }
    Ok(deployments)
}
