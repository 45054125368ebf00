#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use baleen_api::names::OPERATOR_LEASE_NAME;
use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, status_error};

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/baleen-system/leases/baleen-operator";
const COLLECTION: &str = "/apis/coordination.k8s.io/v1/namespaces/baleen-system/leases";

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn lease(holder: Option<&str>, renewed: &str, seconds: i32) -> Lease {
    serde_json::from_value(lease_json(holder, renewed, seconds)).unwrap()
}

fn lease_json(holder: Option<&str>, renewed: &str, seconds: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "baleen-operator", "namespace": "baleen-system", "resourceVersion": "42"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds, "renewTime": renewed,
                 "acquireTime": "2026-01-01T11:00:00.000000Z", "leaseTransitions": 3},
    })
}

#[test]
fn no_lease_is_created() {
    assert_eq!(decide(None, "a", at("2026-01-01T12:00:00Z")), Decision::Create);
}

#[test]
fn the_holder_renews_even_late() {
    let l = lease(Some("a"), "2026-01-01T11:00:00.000000Z", 15);
    assert_eq!(decide(Some(&l), "a", at("2026-01-01T12:00:00Z")), Decision::Renew);
}

#[test]
fn a_live_lease_of_another_holder_is_followed_until_it_expires() {
    let l = lease(Some("b"), "2026-01-01T12:00:00.000000Z", 15);
    let d = decide(Some(&l), "a", at("2026-01-01T12:00:10Z"));
    assert_eq!(d, Decision::Follow { holder: "b".into(), expires_in: Duration::from_secs(5) });
    assert_eq!(decide(Some(&l), "a", at("2026-01-01T12:00:15Z")), Decision::Acquire, "expired at 15 s");
    assert_eq!(decide(Some(&l), "a", at("2026-01-01T12:05:00Z")), Decision::Acquire);
}

#[test]
fn a_released_or_empty_lease_is_acquired() {
    let l = lease(None, "2026-01-01T12:00:00.000000Z", 15);
    assert_eq!(decide(Some(&l), "a", at("2026-01-01T12:00:01Z")), Decision::Acquire);
    let l = Lease { metadata: ObjectMeta::default(), spec: None };
    assert_eq!(decide(Some(&l), "a", at("2026-01-01T12:00:01Z")), Decision::Acquire);
}

fn elector() -> (LeaderElector, mock::ApiServer) {
    let (client, server) = mock::pair();
    (LeaderElector::new(client, "baleen-system", OPERATOR_LEASE_NAME, "pod-a"), server)
}

#[tokio::test]
async fn a_missing_lease_is_created_with_this_replica_as_holder() {
    let (elector, mut server) = elector();
    let task = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    server.expect(Method::GET, PATH, StatusCode::NOT_FOUND, status_error(404, "NotFound")).await;
    let post = server.expect_echo(Method::POST, COLLECTION).await;
    assert_eq!(post.body["metadata"]["name"], "baleen-operator");
    assert_eq!(post.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(post.body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(post.body["spec"]["leaseTransitions"], 0);
    assert!(post.body["spec"]["renewTime"].is_string());
    assert_eq!(server.finish(task).await.unwrap().unwrap(), None, "leader");
}

#[tokio::test]
async fn the_holder_renews_with_the_resource_version_it_read() {
    let (elector, mut server) = elector();
    let task = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let current = lease_json(Some("pod-a"), "2026-01-01T11:59:58.000000Z", 15);
    server.expect(Method::GET, PATH, StatusCode::OK, current).await;
    let put = server.expect_echo(Method::PUT, PATH).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "42", "optimistic concurrency");
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(put.body["spec"]["leaseTransitions"], 3, "a renewal is no transition");
    assert_ne!(put.body["spec"]["renewTime"], "2026-01-01T11:59:58.000000Z");
    assert_eq!(put.body["spec"]["acquireTime"], "2026-01-01T11:00:00.000000Z");
    assert_eq!(server.finish(task).await.unwrap().unwrap(), None);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_a_conflict_means_another_replica_won() {
    let (elector, mut server) = elector();
    let task = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let expired = lease_json(Some("pod-b"), "2020-01-01T00:00:00.000000Z", 15);
    server.expect(Method::GET, PATH, StatusCode::OK, expired).await;
    let put = server.expect(Method::PUT, PATH, StatusCode::CONFLICT, status_error(409, "Conflict")).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "42");
    assert_eq!(put.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Some(String::new()), "lost the race");
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_only_read() {
    let (elector, mut server) = elector();
    let task = tokio::spawn(async move { elector.try_acquire_or_renew().await });
    let live = lease_json(Some("pod-b"), &Timestamp::now().to_string(), 15);
    server.expect(Method::GET, PATH, StatusCode::OK, live).await;
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Some("pod-b".into()));
}

#[tokio::test]
async fn release_clears_the_holder() {
    let (elector, mut server) = elector();
    let task = tokio::spawn(async move { elector.release().await });
    let held = lease_json(Some("pod-a"), &Timestamp::now().to_string(), 15);
    server.expect(Method::GET, PATH, StatusCode::OK, held).await;
    let put = server.expect_echo(Method::PUT, PATH).await;
    assert!(put.body["spec"].get("holderIdentity").is_none_or(Value::is_null), "{}", put.body);
    server.finish(task).await.unwrap().unwrap();
}
