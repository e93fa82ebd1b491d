//! A least-recently-used queue of block ids: a doubly linked list threaded through one array
//! of (previous, next) links, so that pushing, popping the oldest and unlinking from the
//! middle are all O(1), each touching one entry per block involved.

/// No block: the end of the list.
const NIL: u32 = u32::MAX;
/// The `prev` link of a block not in the queue (block ids stay below `i32::MAX`).
const UNLINKED: u32 = u32::MAX - 1;

/// Blocks `0..num_blocks`, each in the queue at most once, oldest at the front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lru {
    /// [num_blocks]: (previous, next) of each block in the queue; `prev` is UNLINKED for the
    /// others.
    links: Vec<[u32; 2]>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Lru {
    /// An empty queue for blocks `0..num_blocks` (`num_blocks <= i32::MAX`).
    pub(crate) fn new(num_blocks: usize) -> Self {
        Self {
            links: vec![[UNLINKED, NIL]; num_blocks],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// Blocks in the queue.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether `block` is in the queue.
    pub(crate) fn contains(&self, block: u32) -> bool {
        self.links[block as usize][0] != UNLINKED
    }

    /// Appends `block` (not in the queue) as the most recently used.
    pub(crate) fn push_back(&mut self, block: u32) {
        debug_assert!(!self.contains(block), "block {block} queued twice");
        self.links[block as usize] = [self.tail, NIL];
        if self.tail == NIL {
            self.head = block;
        } else {
            self.links[self.tail as usize][1] = block;
        }
        self.tail = block;
        self.len += 1;
    }

    /// Removes `block` (in the queue) wherever it is.
    pub(crate) fn remove(&mut self, block: u32) {
        debug_assert!(self.contains(block), "block {block} is not queued");
        let [prev, next] = std::mem::replace(&mut self.links[block as usize], [UNLINKED, NIL]);
        // The head's own `prev` may be stale: pop_front leaves it (see there).
        let prev = if block == self.head { NIL } else { prev };
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize][1] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize][0] = prev;
        }
        self.len -= 1;
    }

    /// Removes and returns the least recently used block. Touches only that block's links:
    /// the new head keeps its stale `prev` (evicting a cold block costs one cache miss here,
    /// not two), which [`remove`](Lru::remove) ignores for the head.
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let head = self.head;
        if head == NIL {
            return None;
        }
        let [_, next] = std::mem::replace(&mut self.links[head as usize], [UNLINKED, NIL]);
        self.head = next;
        if next == NIL {
            self.tail = NIL;
        }
        self.len -= 1;
        Some(head)
    }

    /// The blocks, least recently used first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), |&b| {
            let next = self.links[b as usize][1];
            (next != NIL).then_some(next)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_pops_and_unlinks_in_order() {
        let mut lru = Lru::new(6);
        for b in [3, 1, 4, 0, 5] {
            lru.push_back(b);
        }
        lru.remove(4); // middle
        lru.remove(3); // head
        lru.remove(5); // tail
        assert_eq!(lru.iter().collect::<Vec<_>>(), [1, 0]);
        lru.push_back(3);
        assert_eq!(lru.pop_front(), Some(1));
        // 0 is the head now, with a stale prev: removing it, then the tail, still works.
        lru.push_back(2);
        lru.remove(0);
        assert_eq!(lru.iter().collect::<Vec<_>>(), [3, 2]);
        assert_eq!(lru.pop_front(), Some(3));
        lru.remove(2);
        assert_eq!(lru.pop_front(), None);
        assert_eq!(lru.len(), 0);
        assert!(!lru.contains(3) && !lru.contains(2));
        lru.push_back(4);
        assert_eq!(lru.iter().collect::<Vec<_>>(), [4]);
    }
}
