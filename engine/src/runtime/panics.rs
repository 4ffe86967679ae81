//! Operator panics become errors: a panicking source, map, stage or sink ends the job with a
//! message naming its node and worker, instead of aborting the process, hanging on a capability
//! its thread still held, or passing for the end of the data.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::OpError;

/// Runs `call`, turning a panic into [`OpError::Panicked`] with the panic's message.
///
/// Operators are not used again after an error, so state a panic left half-updated is never seen.
pub(crate) fn catch<T>(call: impl FnOnce() -> Result<T, OpError>) -> Result<T, OpError> {
    catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|payload| Err(OpError::Panicked(message(payload.as_ref()))))
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("row {}", 7)).unwrap_err();
/// assert_eq!(latentflow_engine::runtime::panic_message(payload.as_ref()), "row 7");
/// ```
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_with_their_message() {
        let divisor = std::hint::black_box(0usize);
        let err = catch(|| Ok(10 % divisor)).unwrap_err();
        assert_eq!(err.to_string(), "panicked: attempt to calculate the remainder with a divisor of zero");
        let err = catch::<()>(|| panic!("bad row {}", 3)).unwrap_err();
        assert!(matches!(&err, OpError::Panicked(m) if m == "bad row 3"), "{err}");
        assert_eq!(catch(|| Ok(1)).unwrap(), 1);
    }
}
