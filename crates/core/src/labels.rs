//! Labels: what a step asks of the worker that runs it (`labels: {gpu: "true"}`), and what a
//! worker says it offers. A step goes only to workers whose labels include all of the step's.
//! Both name the task queues a step is routed through, so keys and values are kept to
//! characters a queue name can carry unambiguously.

use std::collections::BTreeMap;

/// Labels by key.
pub type Labels = BTreeMap<String, String>;

/// The most labels a step may ask for, or a worker route by: a worker consumes one queue per
/// subset of its labels (16 for 4).
pub const MAX_LABELS: usize = 4;

/// The longest key or value.
const MAX_LEN: usize = 63;

/// Checks keys and values (1 to 63 letters, digits, `_`, `-` or `.`) and their number; answers
/// what is wrong.
pub fn check(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels: at most {MAX_LABELS} route a step",
            labels.len()
        ));
    }
    for (key, value) in labels {
        for (what, text) in [("key", key), ("value", value)] {
            let fine = !text.is_empty()
                && text.len() <= MAX_LEN
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !fine {
                return Err(format!(
                    "label {what} `{text}` must be 1 to {MAX_LEN} letters, digits, `_`, `-` or `.`"
                ));
            }
        }
    }
    Ok(())
}

/// Whether a worker with `offered` labels may run a step that asks for `asked`.
pub fn satisfies(offered: &Labels, asked: &Labels) -> bool {
    asked.iter().all(|(k, v)| offered.get(k) == Some(v))
}

/// `key=value,…`, for messages.
pub fn describe(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn faults_are_named() {
        assert_eq!(
            check(&labels(&[("gpu", "true"), ("region", "eu-1")])),
            Ok(())
        );
        for (bad, says) in [
            (labels(&[("gpu", "")]), "label value ``"),
            (labels(&[("g pu", "x")]), "label key `g pu`"),
            (labels(&[("a", "x=y")]), "label value `x=y`"),
            (
                labels(&[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1")]),
                "5 labels: at most 4",
            ),
        ] {
            let err = check(&bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_worker_satisfies_a_step_whose_labels_it_has_all_of() {
        let worker = labels(&[("gpu", "true"), ("region", "eu")]);
        assert!(satisfies(&worker, &labels(&[])));
        assert!(satisfies(&worker, &labels(&[("gpu", "true")])));
        assert!(!satisfies(&worker, &labels(&[("gpu", "false")])));
        assert!(!satisfies(&worker, &labels(&[("zone", "a")])));
        assert_eq!(describe(&worker), "gpu=true,region=eu");
    }
}
