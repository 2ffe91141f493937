//! State that outlives config changes: a compiled snapshot asks for its limiters, breakers
//! and concurrency limits by scope and settings, and gets the live one back while any
//! snapshot still holds it. A change to the settings starts afresh; a change elsewhere in the
//! YAML keeps the tokens, counts and learned limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Live values by key, held weakly: the snapshots own them.
#[derive(Debug)]
pub struct Kept<T> {
    map: Mutex<HashMap<String, Weak<T>>>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Kept<T> {
    /// The live value for `key`, or a new one from `make`.
    pub fn get_or(&self, key: String, make: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let value = Arc::new(make());
        map.insert(key, Arc::downgrade(&value));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_kept_while_held_and_made_again_after() {
        let kept = Kept::<u32>::default();
        let a = kept.get_or("k".into(), || 1);
        assert_eq!(*kept.get_or("k".into(), || 2), 1);
        drop(a);
        assert_eq!(*kept.get_or("k".into(), || 3), 3);
    }
}
