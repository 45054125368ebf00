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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_yaml::Value;

    use super::*;

    const TINY: &str = "apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: tiny\nspec:\n  model:\n    source: builtin:tiny-moe\n";

    fn documents(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml).map(|d| Value::deserialize(d).unwrap()).collect()
    }

    fn kind_and_name(doc: &Value) -> (String, String) {
        (doc["kind"].as_str().unwrap().to_string(), doc["metadata"]["name"].as_str().unwrap().to_string())
    }

    fn render_error(text: &str) -> String {
        render_yaml(text, &OperatorConfig::default()).unwrap_err().to_string()
    }

    #[test]
    fn the_crd_yaml_is_the_model_deployment_crd() {
        let crd = documents(&crd_yaml().unwrap());
        assert_eq!(crd.len(), 1);
        assert_eq!(crd[0]["kind"], "CustomResourceDefinition");
        assert_eq!(crd[0]["metadata"]["name"], "modeldeployments.baleen.dev");
        assert_eq!(crd[0]["spec"]["names"]["kind"], CRD_KIND);
    }

    #[test]
    fn every_document_renders_its_groups_in_order_in_the_default_namespace_without_owners() {
        let text = format!(
            "{TINY}  replicas: 2\n---\n---\n{}  replicas: 0\n",
            TINY.replace("name: tiny", "name: other\n  namespace: prod")
        );
        let rendered = render_yaml(&text, &OperatorConfig::default()).unwrap();
        assert!(rendered.starts_with("---\n"));
        let docs = documents(&rendered);
        let names: Vec<(String, String)> = docs.iter().map(kind_and_name).collect();
        let md = parse_deployments(&text).unwrap();
        let rev = revision(&md[0].1, &OperatorConfig::default()).unwrap();
        let pair = |k: &str, n: String| (k.to_string(), n);
        assert_eq!(
            names,
            [
                pair("Service", "tiny".into()),
                pair("PodDisruptionBudget", "tiny".into()),
                pair("Service", format!("tiny-{rev}-0")),
                pair("StatefulSet", format!("tiny-{rev}-0")),
                pair("Service", format!("tiny-{rev}-1")),
                pair("StatefulSet", format!("tiny-{rev}-1")),
                // replicas 0: the shared objects only.
                pair("Service", "other".into()),
                pair("PodDisruptionBudget", "other".into()),
            ]
        );
        assert!(docs[..6].iter().all(|d| d["metadata"]["namespace"] == DEFAULT_NAMESPACE));
        assert!(docs[6..].iter().all(|d| d["metadata"]["namespace"] == "prod"));
        assert!(docs.iter().all(|d| d["metadata"].get("ownerReferences").is_none()));
        // Same input, same bytes.
        assert_eq!(render_yaml(&text, &OperatorConfig::default()).unwrap(), rendered);
        // The PodMonitor only when asked for.
        let with_monitor = render_yaml(TINY, &OperatorConfig { pod_monitor: true, ..OperatorConfig::default() });
        assert!(documents(&with_monitor.unwrap()).iter().any(|d| d["kind"] == "PodMonitor"));
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        let e = render_error(&format!("{TINY}---\n{config_map}"));
        assert!(e.contains("document 2") && e.contains("ConfigMap") && e.contains("kind"), "{e}");

        let e = render_error(&format!("{TINY}  replicas: two\n"));
        assert!(e.contains("document 1") && e.contains("spec.replicas"), "{e}");

        let e = render_error(&TINY.replace("source: builtin:tiny-moe", "source: builtin:tiny-moe\n    colour: red"));
        assert!(e.contains("spec.model") && e.contains("colour"), "{e}");

        let e = render_error(&format!("{TINY}  parallelism:\n    expert: 3\n"));
        assert!(e.contains("document 1") && e.contains("spec.parallelism.expert"), "{e}");

        let e = render_error(&TINY.replace("name: tiny", "name: Not_A_Name"));
        assert!(e.contains("metadata.name"), "{e}");

        let e = render_error(&format!("{TINY}  runtime:\n    args: [--dtype, bf16]\n"));
        assert!(e.contains("document 1") && e.contains("spec.runtime.args"), "{e}");

        let e = render_error(&format!("{TINY}---\n{TINY}"));
        assert!(e.contains("document 2") && e.contains("document 1") && e.contains("metadata.name"), "{e}");

        let e = render_error("# nothing here\n");
        assert!(e.contains("no ModelDeployment"), "{e}");
    }
}
