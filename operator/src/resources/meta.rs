//! Metadata shared by every builder: namespace, owner reference, labels, and the typed → dynamic conversion.

use std::collections::BTreeMap;

use baleen_api::crd::ModelDeployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::error::{Error, Result};

/// The ModelDeployment's namespace; every object made for it lives there.
pub(crate) fn namespace(md: &ModelDeployment) -> Result<String> {
    md.metadata
        .namespace
        .clone()
        .ok_or_else(|| Error::MissingField(format!("ModelDeployment {} has no metadata.namespace", md.name_any())))
}

/// `metadata` of an object named `name` made for `md`: its namespace, `labels`, and `md` as the controlling owner.
///
/// The owner reference needs the ModelDeployment's `uid`, which only the API server assigns: an object read from
/// the cluster has one, so everything the controller applies is owned (and garbage-collected with it). A manifest
/// rendered from a file (`baleen-operator render`) has none, so its objects carry no owner reference.
pub(crate) fn object_meta(md: &ModelDeployment, name: String, labels: BTreeMap<String, String>) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(md)?),
        labels: Some(labels),
        owner_references: md.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    })
}

/// A typed object (which serializes its own `apiVersion` and `kind`) as a [`DynamicObject`].
pub(crate) fn to_dynamic<K: Serialize + ResourceExt>(object: &K) -> Result<DynamicObject> {
    let what =
        || format!("{} {}", std::any::type_name::<K>().rsplit("::").next().unwrap_or("object"), object.name_any());
    let value = serde_json::to_value(object).map_err(|e| Error::Serialize { what: what(), reason: e.to_string() })?;
    serde_json::from_value(value).map_err(|e| Error::Serialize { what: what(), reason: e.to_string() })
}
