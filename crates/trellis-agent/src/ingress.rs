//! The routes of the outpost's entry point (`--ingress-listen`), owned by
//! the agent.
//!
//! Each stage's plan says which host names and paths go to which of its
//! components ([`PlannedIngress`]); what runs says where those components'
//! replicas are (their addresses, from the runtimes' observation). The
//! deployer calls [`IngressRoutes::update`] whenever it has looked at a
//! stage — during a release's health window, after a rollback, on every
//! periodic observation — so the entry point only ever sends requests to
//! replicas that run. The proxy itself is `trellis-ingress`; this module
//! only decides its table.
//!
//! It is also the runtimes' [`Traffic`]: a release that replaces a
//! container component behind an ingress starts the new replicas beside
//! the old ones, and once they answer the runtime asks here to move the
//! component's requests over ([`Traffic::switch`]): the old replicas leave
//! the table (and stay out of it, whatever an observation says, until the
//! runtime has removed them), open requests to them finish within the
//! drain time, and only then are they stopped.
//!
//! A host belongs to one stage: a release whose host another stage already
//! serves on this outpost fails before anything changes, naming the owner
//! (the names are `<host>.<stage>.<project>.<domain>`, so only a stage that
//! outlived a rename of the domain or an older agent could collide).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use trellis_ingress::{Ingress, Route};

use crate::runtime::plan::{PlannedIngress, StagePlan};
use crate::runtime::{ComponentObservation, Traffic};
use crate::state::StageKey;

/// How clients reach the entry point, for the URLs the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicBase {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The port clients connect to; left out of URLs when it is the
    /// scheme's default.
    pub port: u16,
}

impl PublicBase {
    /// The URL of `host` and `path` through the entry point.
    pub fn url(&self, host: &str, path: &str) -> String {
        let default = matches!((self.scheme, self.port), ("http", 80) | ("https", 443));
        if default {
            format!("{}://{host}{path}", self.scheme)
        } else {
            format!("{}://{host}:{}{path}", self.scheme, self.port)
        }
    }
}

/// See the module docs.
pub struct IngressRoutes {
    ingress: Ingress,
    base: PublicBase,
    table: Mutex<Table>,
    /// The names an HTTPS certificate must cover for every host served
    /// (see [`IngressRoutes::certificate_names`]).
    names: tokio::sync::watch::Sender<BTreeSet<String>>,
}

#[derive(Default)]
struct Table {
    /// The routes of each stage, as last computed.
    stages: BTreeMap<StageKey, Vec<StageRoute>>,
    /// Replicas whose requests were moved to their successors
    /// ([`Traffic::switch`]): they get none, whatever an observation says,
    /// until they are gone.
    retiring: HashSet<IpAddr>,
}

/// One route, with what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StageRoute {
    component: String,
    port: u16,
    route: Route,
}

impl IngressRoutes {
    pub fn new(ingress: Ingress, base: PublicBase) -> Self {
        IngressRoutes {
            ingress,
            base,
            table: Mutex::new(Table::default()),
            names: tokio::sync::watch::Sender::new(BTreeSet::new()),
        }
    }

    /// The names a certificate must cover to serve every host routed now,
    /// one wildcard per stage and domain: `*.<stage>.<project>.<domain>`
    /// for hosts `<prefix>.<stage>.<project>.<domain>`. Changes whenever a
    /// stage's hosts do.
    pub fn certificate_names(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.names.subscribe()
    }

    pub fn ingress(&self) -> &Ingress {
        &self.ingress
    }

    /// Why `plan` cannot be served on this outpost: one of its hosts is
    /// another stage's. `None` when every host is free or already its own.
    pub fn host_taken(&self, stage: &StageKey, plan: &StagePlan) -> Option<String> {
        let table = self.lock();
        for ingress in &plan.ingresses {
            let owner = table
                .stages
                .iter()
                .filter(|(key, _)| *key != stage)
                .find_map(|(_, routes)| routes.iter().find(|r| r.route.host == ingress.host));
            if let Some(taken) = owner {
                return Some(format!(
                    "the ingress host {} of component {:?} is already in use on this outpost by {}; \
                     give the ingress another host, or remove it from that stage first",
                    ingress.host, ingress.component, taken.route.owner
                ));
            }
        }
        None
    }

    /// Routes `plan`'s ingresses of `stage` to the replicas in `observed`
    /// that run.
    pub fn update(
        &self,
        stage: &StageKey,
        plan: &StagePlan,
        observed: &HashMap<String, ComponentObservation>,
    ) {
        let mut table = self.lock();
        let routes: Vec<StageRoute> = plan
            .ingresses
            .iter()
            .map(|i| route(stage, i, observed.get(&i.component), &table.retiring))
            .collect();
        if table.stages.get(stage) == Some(&routes)
            || (routes.is_empty() && !table.stages.contains_key(stage))
        {
            return;
        }
        let previous = if routes.is_empty() {
            table.stages.remove(stage)
        } else {
            table.stages.insert(stage.clone(), routes)
        };
        if let Err(e) = self.publish(&table) {
            // Plans are checked before they run (one host per stage, one
            // path per host), so this is a bug; it must not take the other
            // stages' routes with it: this stage keeps its previous ones.
            tracing::error!(%stage, error = %e, "the entry point refused the stage's new routes; it keeps its previous ones");
            match previous {
                Some(previous) => table.stages.insert(stage.clone(), previous),
                None => table.stages.remove(stage),
            };
            let _ = self.publish(&table);
        }
    }

    /// The stage is gone: nothing routes to it any more.
    pub fn forget(&self, stage: &StageKey) {
        let mut table = self.lock();
        if table.stages.remove(stage).is_some()
            && let Err(e) = self.publish(&table)
        {
            tracing::error!(error = %e, "the entry point refused the routes left after removing a stage");
        }
    }

    /// The URLs of `component`'s ingresses in `plan`.
    pub fn urls(&self, plan: &StagePlan, component: &str) -> Vec<String> {
        plan.ingresses
            .iter()
            .filter(|i| i.component == component)
            .map(|i| self.base.url(&i.host, &i.path))
            .collect()
    }

    /// Hands the whole table to the proxy, which swaps it at once.
    fn publish(&self, table: &Table) -> Result<(), trellis_ingress::RouteError> {
        let all: Vec<Route> = table
            .stages
            .values()
            .flatten()
            .map(|r| r.route.clone())
            .collect();
        let names: BTreeSet<String> = all.iter().map(|r| wildcard_of(&r.host)).collect();
        self.ingress.set_routes(all)?;
        self.names.send_if_modified(|current| {
            let changed = *current != names;
            *current = names;
            changed
        });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Traffic for IngressRoutes {
    fn serves(&self, stage: &StageKey, component: &str) -> bool {
        self.lock()
            .stages
            .get(stage)
            .is_some_and(|routes| routes.iter().any(|r| r.component == component))
    }

    async fn switch(
        &self,
        stage: &StageKey,
        component: &str,
        from: &[IpAddr],
        to: &[IpAddr],
        drain: Duration,
    ) {
        let mut draining = Vec::new();
        {
            let mut table = self.lock();
            table.retiring.extend(from.iter().copied());
            if let Some(routes) = table.stages.get_mut(stage) {
                for r in routes.iter_mut().filter(|r| r.component == component) {
                    draining.extend(from.iter().map(|ip| SocketAddr::new(*ip, r.port)));
                    let mut endpoints: Vec<SocketAddr> = r
                        .route
                        .endpoints
                        .iter()
                        .copied()
                        .filter(|e| !from.contains(&e.ip()))
                        .chain(to.iter().map(|ip| SocketAddr::new(*ip, r.port)))
                        .collect();
                    endpoints.sort();
                    endpoints.dedup();
                    r.route.endpoints = endpoints;
                }
            }
            if let Err(e) = self.publish(&table) {
                tracing::error!(%stage, error = %e, "the entry point refused the switched routes");
            }
        }
        if !self.ingress.drain(&draining, drain).await {
            tracing::warn!(%stage, component, bound = ?drain, "requests to the old replicas were still open when the drain time ran out; they are cut off");
        }
    }

    fn retired(&self, addresses: &[IpAddr]) {
        let mut table = self.lock();
        for ip in addresses {
            table.retiring.remove(ip);
        }
    }
}

/// The wildcard name that covers `host`: its first label replaced by `*`.
fn wildcard_of(host: &str) -> String {
    match host.split_once('.') {
        Some((_, parent)) => format!("*.{parent}"),
        None => host.to_owned(),
    }
}

/// The route of one ingress to the running replicas of its component,
/// leaving out those being retired.
fn route(
    stage: &StageKey,
    ingress: &PlannedIngress,
    observed: Option<&ComponentObservation>,
    retiring: &HashSet<IpAddr>,
) -> StageRoute {
    let mut endpoints: Vec<SocketAddr> = observed
        .map(|o| {
            o.addresses
                .iter()
                .filter(|ip| !retiring.contains(ip))
                .map(|ip| SocketAddr::new(*ip, ingress.port))
                .collect()
        })
        .unwrap_or_default();
    endpoints.sort();
    endpoints.dedup();
    StageRoute {
        component: ingress.component.clone(),
        port: ingress.port,
        route: Route {
            host: ingress.host.clone(),
            path: ingress.path.clone(),
            sticky: ingress.sticky,
            endpoints,
            owner: format!(
                "component {} of stage {} (project {})",
                ingress.component, stage.stage, stage.project
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::runtime::ComponentState;

    fn plan(ingresses: &[(&str, &str, &str)]) -> StagePlan {
        StagePlan {
            ingresses: ingresses
                .iter()
                .map(|(component, host, path)| PlannedIngress {
                    component: (*component).into(),
                    host: (*host).into(),
                    path: (*path).into(),
                    port: 8080,
                    sticky: false,
                })
                .collect(),
            ..StagePlan::empty(1)
        }
    }

    fn running(component: &str, last_octets: &[u8]) -> HashMap<String, ComponentObservation> {
        let mut o = ComponentObservation::missing(component);
        o.state = ComponentState::Running;
        o.addresses = last_octets
            .iter()
            .map(|n| IpAddr::V4(Ipv4Addr::new(10, 89, 0, *n)))
            .collect();
        HashMap::from([(component.to_owned(), o)])
    }

    fn routes() -> IngressRoutes {
        IngressRoutes::new(
            Ingress::new("plant7"),
            PublicBase {
                scheme: "http",
                port: 7480,
            },
        )
    }

    #[test]
    fn a_stage_routes_to_the_running_replicas_of_its_components() {
        let routes = routes();
        let prod = StageKey::new("shop", "prod");
        let plan = plan(&[("front", "shop.prod.shop.localhost", "/")]);
        routes.update(&prod, &plan, &running("front", &[3, 2]));
        let table = routes.ingress().routes();
        assert_eq!(table.len(), 1);
        assert_eq!(
            table[0].endpoints,
            [
                "10.89.0.2:8080".parse().unwrap(),
                "10.89.0.3:8080".parse().unwrap()
            ]
        );
        assert_eq!(
            table[0].owner,
            "component front of stage prod (project shop)"
        );
        // Nothing runs: the route stays, without endpoints (503, not 404).
        routes.update(&prod, &plan, &HashMap::new());
        assert!(routes.ingress().routes()[0].endpoints.is_empty());
        routes.forget(&prod);
        assert!(routes.ingress().routes().is_empty());
    }

    #[test]
    fn certificate_names_cover_each_stage_with_ingresses_once() {
        let routes = routes();
        let names = routes.certificate_names();
        assert!(names.borrow().is_empty());
        let prod = StageKey::new("shop", "prod");
        let plan_prod = plan(&[
            ("front", "shop.prod.shop.localhost", "/"),
            ("api", "api.prod.shop.localhost", "/"),
        ]);
        routes.update(&prod, &plan_prod, &running("front", &[2]));
        let dev = StageKey::new("shop", "dev");
        routes.update(
            &dev,
            &plan(&[("front", "shop.dev.shop.localhost", "/")]),
            &HashMap::new(),
        );
        assert_eq!(
            names.borrow().iter().collect::<Vec<_>>(),
            ["*.dev.shop.localhost", "*.prod.shop.localhost"]
        );
        routes.forget(&dev);
        assert_eq!(
            names.borrow().iter().collect::<Vec<_>>(),
            ["*.prod.shop.localhost"]
        );
    }

    #[test]
    fn a_host_another_stage_serves_is_refused_naming_the_owner() {
        let routes = routes();
        let prod = StageKey::new("shop", "prod");
        let plan_prod = plan(&[("front", "shop.example.net", "/")]);
        routes.update(&prod, &plan_prod, &running("front", &[2]));
        let other = StageKey::new("kasse", "dev");
        let claim = plan(&[("web", "shop.example.net", "/api")]);
        let why = routes.host_taken(&other, &claim).expect("refused");
        assert!(
            why.contains("shop.example.net")
                && why.contains("component front of stage prod (project shop)"),
            "{why}"
        );
        // Its own hosts are not taken from itself.
        assert_eq!(routes.host_taken(&prod, &plan_prod), None);
        assert_eq!(
            routes.urls(&plan_prod, "front"),
            ["http://shop.example.net:7480/"]
        );
    }
}
