//! Scaling: a pure policy that turns what was observed into a desired instance count, and the
//! loop that owns the clock, feeds the policy and executes its decisions through a provider.

pub mod autoscaler;
pub mod policy;
pub mod prometheus;
pub mod simulate;
