//! A fixed upstream (`upstream = "host:port"`): always ready, proxied and counted, never
//! started, stopped or scaled.

use std::sync::Arc;

use http::uri::Authority;
use tokio_util::sync::CancellationToken;

use super::{Managed, Provider, Scale};
use crate::target::{Endpoint, Phase, Target};

#[derive(Debug, Default)]
pub struct FixedProvider;

impl Provider for FixedProvider {
    type Backend = Authority;

    fn manage(
        &self,
        target: Arc<Target>,
        upstream: &Authority,
        stop: CancellationToken,
    ) -> Managed {
        target.publish(vec![Endpoint::new(upstream.clone())], Phase::Ready);
        // Asks are ignored: there is nothing to start or stop.
        let (scale, _) = Scale::channel();
        let task = tokio::spawn(async move {
            stop.cancelled().await;
            target.publish(Vec::new(), Phase::Cold);
        });
        Managed {
            scale,
            task,
            remote: None,
        }
    }
}
