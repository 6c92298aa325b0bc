//! The tasks blocked on the netstack: one [`Waker`] per [`Waiter`], kept beside the core under
//! the netstack's lock.
//!
//! The core reports blocked operations as plain data ([`WouldBlock`](crate::core::WouldBlock)
//! out of an operation, waiters in its ready list); [`Shared`](crate::Shared) registers the
//! polling task's waker here under the same lock acquisition as the operation that blocked,
//! and wakes the waiters of the ready list before it releases the lock, so no wake-up is lost.

use std::collections::HashMap;
use std::task::Waker;

use crate::core::Waiter;

/// The registered wakers, by what their task waits for.
#[derive(Default)]
pub(crate) struct Wakers {
    wakers: HashMap<Waiter, Waker>,
}

impl Wakers {
    /// Registers `waker` for `waiter`, replacing the waker of another task (the most recent
    /// task to wait is the one woken).
    pub(crate) fn register(&mut self, waiter: Waiter, waker: &Waker) {
        match self.wakers.get_mut(&waiter) {
            // The same task again: keep its waker (cloning one may cost an atomic increment).
            Some(old) if old.will_wake(waker) => {}
            Some(old) => *old = waker.clone(),
            None => {
                self.wakers.insert(waiter, waker.clone());
            }
        }
    }

    /// Wakes the task waiting for `waiter`, if any; it registers again if it still has to wait.
    pub(crate) fn wake(&mut self, waiter: Waiter) {
        if let Some(waker) = self.wakers.remove(&waiter) {
            waker.wake();
        }
    }

    /// Drops the waker for `waiter` without waking it (its handle is gone).
    pub(crate) fn forget(&mut self, waiter: Waiter) {
        self.wakers.remove(&waiter);
    }
}
