//! The agents' limits a batch works with: locked in its transaction, after its runs and
//! breakers, for every limited agent the batch's runs may call, so that dispatches and ends are
//! counted by one coordinator at a time.

use flotilla_core::Plan;
use flotilla_core::limits::{AgentLimits, Limits};
use flotilla_store::GenericClient;
use flotilla_store::limits as db;

/// Locks the slots of every limited agent (and fallback agent) of `plans`.
pub(crate) async fn lock<'a>(
    tx: &impl GenericClient,
    config: &AgentLimits,
    plans: impl Iterator<Item = &'a Plan>,
) -> Result<Limits, flotilla_store::Error> {
    let mut agents: Vec<String> = plans
        .flat_map(|plan| plan.agents())
        .filter(|agent| config.get(agent).is_some())
        .cloned()
        .collect();
    agents.sort_unstable();
    agents.dedup();
    let slots = if agents.is_empty() {
        Default::default()
    } else {
        db::lock(tx, &agents).await?
    };
    Ok(Limits::new(config.clone(), slots))
}
