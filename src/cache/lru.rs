//! A least-recently-used queue of block ids: a doubly linked list threaded through two arrays,
//! so that pushing, popping the oldest and unlinking from the middle are all O(1).

/// No block: the end of the list, or a block not in it.
const NIL: u32 = u32::MAX;

/// Blocks `0..num_blocks`, each in the queue at most once, oldest at the front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Whether each block is in the queue (a lone block has NIL neighbours too).
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Lru {
    /// An empty queue for blocks `0..num_blocks` (`num_blocks <= i32::MAX`).
    pub(crate) fn new(num_blocks: usize) -> Self {
        Self {
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            linked: vec![false; num_blocks],
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
        self.linked[block as usize]
    }

    /// Appends `block` (not in the queue) as the most recently used.
    pub(crate) fn push_back(&mut self, block: u32) {
        debug_assert!(!self.contains(block), "block {block} queued twice");
        let b = block as usize;
        self.linked[b] = true;
        self.prev[b] = self.tail;
        self.next[b] = NIL;
        if self.tail == NIL {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.len += 1;
    }

    /// Removes `block` (in the queue) wherever it is.
    pub(crate) fn remove(&mut self, block: u32) {
        debug_assert!(self.contains(block), "block {block} is not queued");
        let b = block as usize;
        let (prev, next) = (self.prev[b], self.next[b]);
        if prev == NIL {
            self.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.prev[b] = NIL;
        self.next[b] = NIL;
        self.linked[b] = false;
        self.len -= 1;
    }

    /// Removes and returns the least recently used block.
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let head = self.head;
        (head != NIL).then(|| {
            self.remove(head);
            head
        })
    }

    /// The blocks, least recently used first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), |&b| {
            let next = self.next[b as usize];
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
        assert_eq!(lru.pop_front(), Some(0));
        assert_eq!(lru.pop_front(), Some(3));
        assert_eq!(lru.pop_front(), None);
        assert_eq!(lru.len(), 0);
        assert!(!lru.contains(3));
    }
}
