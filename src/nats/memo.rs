//! [`Memo`]: the few most recent values of something an alert determines
//! (its subject, its rule's headers), the oldest replaced first. Alerts
//! repeat a few rules, so a short linear search finds most of them.

/// Entries kept at most.
pub const ENTRIES: usize = 64;

/// Recent entries, found by a predicate, made when missing.
pub struct Memo<E> {
    entries: Vec<E>,
    next: usize,
}

impl<E> Default for Memo<E> {
    fn default() -> Self {
        Memo {
            entries: Vec::new(),
            next: 0,
        }
    }
}

impl<E> Memo<E> {
    /// The entry `matches` finds, or the one `make` makes, remembered in
    /// place of the oldest when [`ENTRIES`] are kept.
    pub fn get_or_make(&mut self, matches: impl Fn(&E) -> bool, make: impl FnOnce() -> E) -> &E {
        if let Some(i) = self.entries.iter().position(matches) {
            return &self.entries[i];
        }
        let i = if self.entries.len() < ENTRIES {
            self.entries.push(make());
            self.entries.len() - 1
        } else {
            let i = self.next;
            self.entries[i] = make();
            self.next = (i + 1) % ENTRIES;
            i
        };
        &self.entries[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_makes_and_replaces_the_oldest() {
        let mut memo = Memo::default();
        let mut made = 0;
        for round in 0..2 {
            for n in 0..ENTRIES + 10 {
                let got = *memo.get_or_make(
                    |e| *e == n,
                    || {
                        made += 1;
                        n
                    },
                );
                assert_eq!(got, n, "round {round}");
            }
        }
        assert!(memo.entries.len() == ENTRIES);
        assert!(made > ENTRIES + 10, "more keys than room: some made again");
        let before = made;
        memo.get_or_make(|e| *e == ENTRIES + 9, || unreachable!("just made"));
        assert_eq!(made, before);
    }
}
