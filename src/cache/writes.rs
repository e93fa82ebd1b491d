//! Which layers of the current plan were written: a plan's K/V are complete, and its full
//! blocks may become findable, once every layer was.

use crate::cache::PlanStamp;

/// The layers written under one plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerWrites {
    /// The plan the marks belong to.
    stamp: Option<PlanStamp>,
    /// [num_layers]
    written: Vec<bool>,
    /// Layers marked.
    count: usize,
}

impl LayerWrites {
    /// No layer written, for a model of `num_layers`.
    pub(crate) fn new(num_layers: usize) -> Self {
        Self {
            stamp: None,
            written: vec![false; num_layers],
            count: 0,
        }
    }

    /// Marks `layer` (in range) written under the plan `stamp` (forgetting the marks of any
    /// other plan); true when this completes the plan's last unwritten layer.
    pub(crate) fn mark(&mut self, layer: usize, stamp: PlanStamp) -> bool {
        if self.stamp != Some(stamp) {
            self.stamp = Some(stamp);
            self.written.fill(false);
            self.count = 0;
        }
        if std::mem::replace(&mut self.written[layer], true) {
            return false;
        }
        self.count += 1;
        self.count == self.written.len()
    }
}
