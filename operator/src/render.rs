//! `baleen-operator crd` and `render`: the CRD and every object for a file of ModelDeployments, as YAML.

use crate::config::OperatorConfig;
use crate::error::{Error, Result};

/// The ModelDeployment CRD as YAML.
pub fn crd_yaml() -> Result<String> {
    Err(Error::Runtime("crd: being written".into()))
}

/// Every object the operator would create for the ModelDeployment documents in `text`, as a YAML stream.
pub fn render_yaml(_text: &str, _config: &OperatorConfig) -> Result<String> {
    Err(Error::Runtime("render: being written".into()))
}
