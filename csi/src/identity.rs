//! The CSI Identity service: plugin name and version, capabilities, and a
//! readiness probe backed by a [`Readiness`] check.

use std::{sync::Arc, time::Duration};

use cairn_proto::csi::v1 as csi;
use csi::plugin_capability::{service::Type as Svc, volume_expansion::Type as Expansion};
use tonic::{Request, Response, Status};

use crate::DRIVER_NAME;

/// Answers whether the services behind this plugin are up.
#[tonic::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `true` when the plugin can serve calls now.
    async fn ready(&self) -> bool;
}

/// Always ready (a node plugin whose host check passed at start-up).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysReady;

#[tonic::async_trait]
impl Readiness for AlwaysReady {
    async fn ready(&self) -> bool {
        true
    }
}

/// Ready when a gRPC endpoint (e.g. the agent) accepts a connection within
/// `timeout`.
#[derive(Debug, Clone)]
pub struct EndpointReadiness {
    /// `http://host:port` of the service.
    pub uri: String,
    /// Connect timeout.
    pub timeout: Duration,
}

#[tonic::async_trait]
impl Readiness for EndpointReadiness {
    async fn ready(&self) -> bool {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(self.uri.clone()) else {
            return false;
        };
        let ep = ep.connect_timeout(self.timeout);
        tokio::time::timeout(self.timeout, ep.connect())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The Identity service.
#[derive(Clone)]
pub struct IdentityService {
    readiness: Arc<dyn Readiness>,
}

impl IdentityService {
    /// An identity service whose Probe asks `readiness`.
    pub fn new(readiness: Arc<dyn Readiness>) -> Self {
        IdentityService { readiness }
    }

    /// The tonic server for this service.
    pub fn server(self) -> csi::identity_server::IdentityServer<Self> {
        csi::identity_server::IdentityServer::new(self)
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{Service, Type, VolumeExpansion};
        let service = |t: Svc| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Svc::ControllerService),
                service(Svc::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: Expansion::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse {
            ready: Some(self.readiness.ready().await),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::identity_server::Identity;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flag(Arc<AtomicBool>);

    #[tonic::async_trait]
    impl Readiness for Flag {
        async fn ready(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn plugin_info_names_the_driver_and_version() {
        let svc = IdentityService::new(Arc::new(AlwaysReady));
        let info = svc
            .get_plugin_info(Request::new(csi::GetPluginInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.cairn.dev");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        assert!(!info.vendor_version.is_empty());
    }

    #[tokio::test]
    async fn capabilities_are_controller_topology_and_online_expansion() {
        use csi::plugin_capability::Type;
        let svc = IdentityService::new(Arc::new(AlwaysReady));
        let caps = svc
            .get_plugin_capabilities(Request::new(csi::GetPluginCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        let mut services = Vec::new();
        let mut expansion = Vec::new();
        for c in caps {
            match c.r#type {
                Some(Type::Service(s)) => services.push(s.r#type),
                Some(Type::VolumeExpansion(e)) => expansion.push(e.r#type),
                None => panic!("capability without a type"),
            }
        }
        assert_eq!(
            services,
            [
                Svc::ControllerService as i32,
                Svc::VolumeAccessibilityConstraints as i32
            ]
        );
        assert_eq!(expansion, [Expansion::Online as i32]);
    }

    #[tokio::test]
    async fn probe_follows_the_readiness_check() {
        let flag = Arc::new(AtomicBool::new(false));
        let svc = IdentityService::new(Arc::new(Flag(flag.clone())));
        let probe = |svc: IdentityService| async move {
            svc.probe(Request::new(csi::ProbeRequest {}))
                .await
                .unwrap()
                .into_inner()
                .ready
        };
        assert_eq!(probe(svc.clone()).await, Some(false));
        flag.store(true, Ordering::SeqCst);
        assert_eq!(probe(svc).await, Some(true));
    }

    #[tokio::test]
    async fn endpoint_readiness_needs_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = EndpointReadiness {
            uri: format!("http://{addr}"),
            timeout: Duration::from_secs(2),
        };
        let accept = tokio::spawn(async move {
            let _conn = listener.accept().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        assert!(up.ready().await);
        accept.await.unwrap();
        // Same port, nobody listening any more.
        assert!(!up.ready().await);
        let bad = EndpointReadiness {
            uri: "not a uri".into(),
            timeout: Duration::from_millis(100),
        };
        assert!(!bad.ready().await);
    }
}
