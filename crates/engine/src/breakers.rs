//! The circuit breakers a batch works with: locked in its transaction, after its runs, for every
//! agent the batch's runs may call, so that holds, probes and the outcomes that open and close a
//! breaker are decided by one coordinator at a time.

use flotilla_core::Plan;
use flotilla_core::breaker::{BreakerConfig, Breakers};
use flotilla_store::GenericClient;
use flotilla_store::breakers as db;

/// Locks the breakers of every agent (and fallback agent) of `plans`; none when the breaker is
/// off (`config` is `None`), which admits every dispatch.
pub(crate) async fn lock<'a>(
    tx: &impl GenericClient,
    config: Option<&BreakerConfig>,
    plans: impl Iterator<Item = &'a Plan>,
) -> Result<Breakers, flotilla_store::Error> {
    let Some(config) = config else {
        return Ok(Breakers::default());
    };
    let mut agents: Vec<String> = plans.flat_map(|plan| plan.agents()).cloned().collect();
    agents.sort_unstable();
    agents.dedup();
    if agents.is_empty() {
        return Ok(Breakers::new(*config, Default::default()));
    }
    Ok(Breakers::new(*config, db::lock(tx, &agents).await?))
}

/// Writes the breakers the batch changed.
pub(crate) async fn write(
    tx: &impl GenericClient,
    breakers: &Breakers,
) -> Result<(), flotilla_store::Error> {
    db::write(tx, &breakers.config, breakers.changed()).await
}
