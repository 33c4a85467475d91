//! One policy for poisoned locks, in both binaries: recover and go on.
//!
//! Every critical section in Keyway is a short update that leaves its data
//! whole (an insert, a removal, a swap, a counter). A panic while one is held
//! is a bug elsewhere, which the panic itself reports; taking every later
//! user of the lock down with it would turn one failed task into a dead
//! agent or control plane. So locks are taken with [`Recover`], never with
//! `unwrap` or `expect`.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Taking a lock whether or not an earlier holder panicked.
pub trait Recover<T: ?Sized> {
    type Read<'a>
    where
        Self: 'a;
    type Write<'a>
    where
        Self: 'a;
    /// The shared (or, for a mutex, the only) guard.
    fn read_locked(&self) -> Self::Read<'_>;
    /// The exclusive guard.
    fn locked(&self) -> Self::Write<'_>;
}

impl<T: ?Sized> Recover<T> for Mutex<T> {
    type Read<'a>
        = MutexGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = MutexGuard<'a, T>
    where
        T: 'a;
    fn read_locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized> Recover<T> for RwLock<T> {
    type Read<'a>
        = RwLockReadGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = RwLockWriteGuard<'a, T>
    where
        T: 'a;
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panicking_holder_is_still_taken() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let r = std::sync::Arc::new(RwLock::new(1));
        let (m2, r2) = (m.clone(), r.clone());
        let _ = std::thread::spawn(move || {
            let _m = m2.lock().unwrap();
            let _r = r2.write().unwrap();
            panic!("a holder panics");
        })
        .join();
        assert!(m.is_poisoned() && r.is_poisoned());
        *m.locked() += 1;
        *r.locked() += 1;
        assert_eq!((*m.read_locked(), *r.read_locked()), (2, 2));
    }
}
