//! A fixed upstream (`upstream = "host:port"`): always ready, proxied and counted, never
//! started, stopped or scaled.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Provider;
use crate::target::{Endpoint, Phase, Target};

#[derive(Debug, Default)]
pub struct FixedProvider;

impl Provider for FixedProvider {
    fn manage(&self, target: Arc<Target>, stop: CancellationToken) -> JoinHandle<()> {
        let authority = target
            .config
            .upstream
            .as_deref()
            .and_then(|u| u.parse().ok())
            .expect("validated: upstream is host:port");
        target.publish(vec![Endpoint::new(authority)], Phase::Ready);
        tokio::spawn(async move {
            stop.cancelled().await;
            target.publish(Vec::new(), Phase::Cold);
        })
    }

    fn scale(&self, _target: &Target, _replicas: u32) {}
}
