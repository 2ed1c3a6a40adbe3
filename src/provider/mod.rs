//! Providers run what serves a target and execute scale decisions: `local` starts and stops
//! processes, `fixed` fronts an always-on upstream. The data plane never calls them; it only
//! reads the endpoints they publish on the [`Target`].

pub mod fixed;
pub mod kubernetes;
pub mod local;

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::target::Target;

pub trait Provider: Send + Sync + 'static {
    /// Starts looking after `target`. The returned task ends once `stop` is cancelled and
    /// everything the target ran has stopped.
    fn manage(&self, target: Arc<Target>, stop: CancellationToken) -> JoinHandle<()>;

    /// Asks for `replicas` ready instances of `target`; 0 stops them all. Asking again for
    /// the same number after a failed start makes the provider try again.
    fn scale(&self, target: &Target, replicas: u32);
}
