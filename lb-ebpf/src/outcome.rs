//! Plain-integer results for functions that are not inlined.
//!
//! A BPF-to-BPF call's signature is described in the object's BTF, and the kernel rejects
//! BTF for Rust's data-carrying enums (`Result<T, Reason>` becomes a union with offset
//! members). So functions kept out of line (to give them their own stack frame) return an
//! [`Outcome`] and write any other result through a `&mut` argument.

use lb_common::{Action, Reason};

/// An action (on success) or a reason (on failure), packed in one `u32`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Outcome {
    code: u32,
}

/// Codes at or above this are reasons; below are actions.
const REASON_BASE: u32 = 0x100;

impl Outcome {
    /// Success with no action of its own (for helpers whose caller decides the verdict).
    pub const DONE: Self = Self { code: Action::Pass as u32 };

    #[inline(always)]
    pub const fn ok(action: Action) -> Self {
        Self { code: action as u32 }
    }

    #[inline(always)]
    pub const fn err(reason: Reason) -> Self {
        Self { code: REASON_BASE + reason as u32 }
    }

    #[inline(always)]
    pub const fn from_result(result: Result<Action, Reason>) -> Self {
        match result {
            Ok(action) => Self::ok(action),
            Err(reason) => Self::err(reason),
        }
    }

    /// Back to a `Result`; an unknown code (never produced) reads as a malformed packet.
    #[inline(always)]
    pub const fn into_result(self) -> Result<Action, Reason> {
        if self.code < REASON_BASE {
            match Action::from_u32(self.code) {
                Some(action) => Ok(action),
                None => Err(Reason::Truncated),
            }
        } else {
            match Reason::from_u32(self.code - REASON_BASE) {
                Some(reason) => Err(reason),
                None => Err(Reason::Truncated),
            }
        }
    }

    /// `Ok(())` for success, the reason otherwise.
    #[inline(always)]
    pub const fn into_status(self) -> Result<(), Reason> {
        match self.into_result() {
            Ok(_) => Ok(()),
            Err(reason) => Err(reason),
        }
    }
}
