//! The inference engine. Sampling now; the continuous-batching scheduler arrives with the serving issue.

pub mod sampler;
