//! A child's stale map: one bit per segment that may lack acknowledged
//! writes. Grows on demand (the volume can grow while a child is away).

/// A growable bitmap of segments.
#[derive(Debug, Default, Clone)]
pub(crate) struct SegmentMap {
    words: Vec<u64>,
    count: u64,
}

impl SegmentMap {
    /// Every one of `segments` segments marked.
    pub(crate) fn full(segments: u64) -> Self {
        let mut m = SegmentMap::default();
        if segments > 0 {
            m.set_range(0, segments - 1);
        }
        m
    }

    /// Segments marked.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Marks segments `first..=last`.
    pub(crate) fn set_range(&mut self, first: u64, last: u64) {
        let need = (last / 64 + 1) as usize;
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
        for seg in first..=last {
            let (w, b) = ((seg / 64) as usize, seg % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Unmarks one segment.
    pub(crate) fn clear(&mut self, seg: u64) {
        let (w, b) = ((seg / 64) as usize, seg % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) != 0 {
                *word &= !(1 << b);
                self.count -= 1;
            }
        }
    }

    /// The first marked segment at or after `from`.
    pub(crate) fn next_from(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < self.words.len() {
            let bits = self.words[w] & mask;
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            mask = !0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_counts_clears_and_finds() {
        let mut m = SegmentMap::default();
        assert_eq!(m.next_from(0), None);
        m.set_range(3, 5);
        m.set_range(5, 6);
        m.set_range(130, 130);
        assert_eq!(m.count(), 5);
        assert_eq!(m.next_from(0), Some(3));
        assert_eq!(m.next_from(4), Some(4));
        assert_eq!(m.next_from(7), Some(130));
        m.clear(4);
        m.clear(4);
        m.clear(9999);
        assert_eq!(m.count(), 4);
        assert_eq!(m.next_from(4), Some(5));
        assert_eq!(SegmentMap::full(70).count(), 70);
        assert_eq!(SegmentMap::full(70).next_from(69), Some(69));
        assert_eq!(SegmentMap::full(70).next_from(70), None);
        assert_eq!(SegmentMap::full(0).count(), 0);
    }
}
