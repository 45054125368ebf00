//! The controller (being written).

/// Settings of `baleen-operator run`.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Defaults for the objects created.
    pub config: crate::OperatorConfig,
    /// Namespace to watch; empty = all.
    pub namespace: String,
    /// Namespace of the leader Lease.
    pub lease_namespace: Option<String>,
    /// Identity in the Lease.
    pub identity: Option<String>,
    /// Admin server address.
    pub admin_addr: std::net::SocketAddr,
}

/// Runs the controller until SIGTERM.
pub async fn run(_settings: RunSettings) -> crate::Result<()> {
    Err(crate::Error::Runtime("run: being written".into()))
}
