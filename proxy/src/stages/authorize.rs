//! Inbound authorization: the local service's policy, if it has one, decides; without one any
//! caller is allowed. Callers without an identity (plaintext) match no policy.

use sidemesh_config::{Authorization, ServiceId};

use crate::respond::ProxyError;

/// The stage: `policy` of the local service `service` on a caller with `identity`.
pub fn check(
    policy: &Authorization,
    service: &ServiceId,
    identity: Option<&str>,
) -> Result<(), ProxyError> {
    if policy.allows(identity) {
        return Ok(());
    }
    Err(ProxyError::Forbidden {
        identity: identity.map_or_else(
            || "an unauthenticated (plaintext) caller".to_string(),
            str::to_string,
        ),
        // `name.namespace`, as the policy and the mesh YAML name it.
        service: service.to_string(),
    })
}
