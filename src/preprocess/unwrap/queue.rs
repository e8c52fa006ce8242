//! A bucket priority queue over a small number of integer priorities (bins).
//!
//! Region growing pops tens of millions of edges whose quality has been quantised into a few
//! hundred bins; a bucket per bin makes push and pop O(1) (amortised), where a binary heap
//! would pay O(log n) comparisons per operation.

/// Items kept in bins `0..n_bins`; lower bins pop first, last in first out within a bin.
#[derive(Clone, Debug)]
pub struct BucketQueue<T> {
    bins: Vec<Vec<T>>,
    /// No bin below this one holds an item (== `bins.len()` when empty).
    lowest: usize,
    len: usize,
}

impl<T: Copy> BucketQueue<T> {
    /// An empty queue with priorities `0..n_bins`.
    pub fn new(n_bins: usize) -> Self {
        BucketQueue {
            bins: vec![Vec::new(); n_bins],
            lowest: n_bins,
            len: 0,
        }
    }

    /// Number of items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` with priority `bin` (< `n_bins`; lower pops first).
    pub fn push(&mut self, item: T, bin: usize) {
        self.bins[bin].push(item);
        self.lowest = self.lowest.min(bin);
        self.len += 1;
    }

    /// The lowest occupied bin, if any.
    pub fn lowest_bin(&self) -> Option<usize> {
        (self.len > 0).then_some(self.lowest)
    }

    /// Up to `k` of the items that [`pop`](Self::pop) would return next from the lowest
    /// occupied bin (in reverse order).
    pub fn peek(&self, k: usize) -> &[T] {
        self.bins
            .get(self.lowest)
            .map_or(&[], |b| &b[b.len().saturating_sub(k)..])
    }

    /// Removes and returns an item of the lowest occupied bin, with that bin.
    pub fn pop(&mut self) -> Option<(T, usize)> {
        if self.len == 0 {
            return None;
        }
        let bin = self.lowest;
        let item = self.bins[bin].pop()?;
        self.len -= 1;
        while self.lowest < self.bins.len() && self.bins[self.lowest].is_empty() {
            self.lowest += 1;
        }
        Some((item, bin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::rng::Rng;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    #[test]
    fn pops_in_the_same_priority_order_as_a_binary_heap() {
        // Interleaved pushes and pops: the sequence of popped priorities must equal a
        // min-heap's (items within a bin may come out in any order).
        let mut rng = Rng::new(5);
        let mut q = BucketQueue::new(256);
        let mut heap = BinaryHeap::new();
        let mut item = 0u32;
        let (mut got, mut want) = (vec![], vec![]);
        for round in 0..2000 {
            for _ in 0..(round % 4) {
                let bin = (rng.uniform() * 256.0) as usize % 256;
                q.push(item, bin);
                heap.push(Reverse((bin, item)));
                item += 1;
            }
            if round % 3 != 0 {
                assert_eq!(q.lowest_bin(), heap.peek().map(|r| r.0 .0));
                if let Some((_, bin)) = q.pop() {
                    got.push(bin);
                    want.push(heap.pop().unwrap().0 .0);
                }
            }
            assert_eq!(q.len(), heap.len());
        }
        while let Some((_, bin)) = q.pop() {
            got.push(bin);
            want.push(heap.pop().unwrap().0 .0);
        }
        assert!(heap.is_empty() && q.is_empty() && q.lowest_bin().is_none());
        assert!(got.len() > 1000);
        assert_eq!(got, want);
    }
}
