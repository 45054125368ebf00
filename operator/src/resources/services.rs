//! Services: one headless Service per group (the ranks' DNS names) and one Service over the heads of every group.

use std::collections::BTreeMap;

use baleen_api::crd::ModelDeployment;
use baleen_api::names::{
    LABEL_GROUP, LABEL_MODEL_DEPLOYMENT, LABEL_POD_INDEX, PORT_NAME_GRPC, PORT_NAME_HTTP, RUNTIME_GRPC_PORT,
    RUNTIME_HTTP_PORT,
};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::meta::object_meta;
use super::{GroupRef, common_labels, group_labels};
use crate::error::Result;

fn port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// The headless Service of `group` (same name as its StatefulSet): rank `r` resolves as `<group>-<r>.<group>`.
/// It publishes addresses of pods that are not ready, because a head is only ready once all its peers answer on
/// gRPC — peers must resolve before any of them is ready.
pub fn group_service(md: &ModelDeployment, group: &GroupRef) -> Result<Service> {
    let name = group.name(&md.name_any());
    let selector =
        BTreeMap::from([(LABEL_MODEL_DEPLOYMENT.to_string(), md.name_any()), (LABEL_GROUP.to_string(), name.clone())]);
    Ok(Service {
        metadata: object_meta(md, name, group_labels(md, group))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector),
            ports: Some(vec![port(PORT_NAME_GRPC, RUNTIME_GRPC_PORT), port(PORT_NAME_HTTP, RUNTIME_HTTP_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Labels of the head pods of every group of `md`: rank 0 of each group (the StatefulSet controller's
/// [`LABEL_POD_INDEX`]), or every rank with data-parallel attention (each rank is then a head).
pub fn heads_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(LABEL_MODEL_DEPLOYMENT.to_string(), md.name_any())]);
    if !md.spec.data_parallel_attention() {
        labels.insert(LABEL_POD_INDEX.to_string(), "0".into());
    }
    labels
}

/// [`heads_labels`] as a label selector string, `k=v,k=v` sorted by key: `status.selector`, which the `scale`
/// subresource reports to autoscalers.
pub fn heads_selector(md: &ModelDeployment) -> String {
    heads_labels(md).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The Service clients (and the gateway) use: named like the ModelDeployment, ClusterIP, port 8000 `http`, over the
/// ready heads of every group whatever their revision, so it keeps serving through rollouts.
pub fn heads_service(md: &ModelDeployment) -> Result<Service> {
    Ok(Service {
        metadata: object_meta(md, md.name_any(), common_labels(md))?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(heads_labels(md)),
            ports: Some(vec![port(PORT_NAME_HTTP, RUNTIME_HTTP_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}
