//! `NTSTATUS` values: the status codes the model returns and stores.
//!
//! # Invariants
//!
//! 1. An [`NtStatus`] is exactly the 32-bit Windows value (stored as `i32`, as `NTSTATUS` is a
//!    `LONG`), so values can be compared with, and printed like, the ones in `ntstatus.h`.
//! 2. Severity is read from the top two bits, as `NT_SUCCESS`, `NT_INFORMATION`, `NT_WARNING`
//!    and `NT_ERROR` do: success is `>= 0`, error is severity 3.
//! 3. Every named constant has its `ntstatus.h` value, and [`NtStatus::name`] knows each one.

use core::fmt;

/// A Windows `NTSTATUS` code.
///
/// ```
/// use rdbss::NtStatus;
/// assert!(NtStatus::SUCCESS.is_success());
/// assert!(NtStatus::CANCELLED.is_error());
/// assert_eq!(NtStatus::CANCELLED.to_string(), "STATUS_CANCELLED");
/// assert_eq!(NtStatus::CANCELLED.code(), 0xC000_0120);
/// assert_eq!(NtStatus::from_code(0xC000_0120), NtStatus::CANCELLED);
/// ```
#[doc(alias = "NTSTATUS")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct NtStatus(pub i32);

macro_rules! statuses {
    ($( $(#[$doc:meta])* $name:ident ($wname:literal) = $value:literal, )*) => {
        impl NtStatus {
            $(
                $(#[$doc])*
                #[doc(alias = $wname)]
                pub const $name: NtStatus = NtStatus::from_code($value);
            )*

            /// The `STATUS_*` name of a known code, or `None`.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 as u32 {
                    $( $value => Some($wname), )*
                    _ => None,
                }
            }
        }
    };
}

statuses! {
    /// The operation completed successfully.
    SUCCESS ("STATUS_SUCCESS") = 0x0000_0000,
    /// The wait timed out (a success code).
    TIMEOUT ("STATUS_TIMEOUT") = 0x0000_0102,
    /// The operation is in progress and will complete later.
    PENDING ("STATUS_PENDING") = 0x0000_0103,
    /// The data was too large to fit the buffer (a warning).
    BUFFER_OVERFLOW ("STATUS_BUFFER_OVERFLOW") = 0x8000_0005,
    /// No more files match (a warning).
    NO_MORE_FILES ("STATUS_NO_MORE_FILES") = 0x8000_0006,
    /// The requested operation was unsuccessful.
    UNSUCCESSFUL ("STATUS_UNSUCCESSFUL") = 0xC000_0001,
    /// The requested operation is not implemented.
    NOT_IMPLEMENTED ("STATUS_NOT_IMPLEMENTED") = 0xC000_0002,
    /// An invalid handle was given.
    INVALID_HANDLE ("STATUS_INVALID_HANDLE") = 0xC000_0008,
    /// An invalid parameter was passed.
    INVALID_PARAMETER ("STATUS_INVALID_PARAMETER") = 0xC000_000D,
    /// The end of the file was reached.
    END_OF_FILE ("STATUS_END_OF_FILE") = 0xC000_0011,
    /// Access was denied.
    ACCESS_DENIED ("STATUS_ACCESS_DENIED") = 0xC000_0022,
    /// The object name was not found.
    OBJECT_NAME_NOT_FOUND ("STATUS_OBJECT_NAME_NOT_FOUND") = 0xC000_0034,
    /// The object name already exists.
    OBJECT_NAME_COLLISION ("STATUS_OBJECT_NAME_COLLISION") = 0xC000_0035,
    /// A quota was exceeded.
    QUOTA_EXCEEDED ("STATUS_QUOTA_EXCEEDED") = 0xC000_0044,
    /// Insufficient system resources exist to complete the request.
    INSUFFICIENT_RESOURCES ("STATUS_INSUFFICIENT_RESOURCES") = 0xC000_009A,
    /// The I/O operation timed out.
    IO_TIMEOUT ("STATUS_IO_TIMEOUT") = 0xC000_00B5,
    /// The request is not supported.
    NOT_SUPPORTED ("STATUS_NOT_SUPPORTED") = 0xC000_00BB,
    /// The network name was deleted.
    NETWORK_NAME_DELETED ("STATUS_NETWORK_NAME_DELETED") = 0xC000_00C9,
    /// The I/O request was cancelled.
    CANCELLED ("STATUS_CANCELLED") = 0xC000_0120,
    /// The device is not in a valid state to perform this request.
    INVALID_DEVICE_STATE ("STATUS_INVALID_DEVICE_STATE") = 0xC000_0184,
    /// The transport connection was disconnected.
    CONNECTION_DISCONNECTED ("STATUS_CONNECTION_DISCONNECTED") = 0xC000_020C,
    /// The object was not found.
    NOT_FOUND ("STATUS_NOT_FOUND") = 0xC000_0225,
    /// The request was aborted.
    REQUEST_ABORTED ("STATUS_REQUEST_ABORTED") = 0xC000_0240,
}

impl NtStatus {
    /// Builds a status from its unsigned 32-bit form, as written in `ntstatus.h`.
    pub const fn from_code(code: u32) -> Self {
        NtStatus(code as i32)
    }

    /// The unsigned 32-bit form, e.g. `0xC0000120` for [`NtStatus::CANCELLED`].
    pub const fn code(self) -> u32 {
        self.0 as u32
    }

    /// The severity field (bits 30-31): 0 success, 1 informational, 2 warning, 3 error.
    pub const fn severity(self) -> u8 {
        (self.code() >> 30) as u8
    }

    /// `NT_SUCCESS`: success or informational (invariant 2).
    #[doc(alias = "NT_SUCCESS")]
    pub const fn is_success(self) -> bool {
        self.0 >= 0
    }

    /// `NT_INFORMATION`: severity 1.
    #[doc(alias = "NT_INFORMATION")]
    pub const fn is_information(self) -> bool {
        self.severity() == 1
    }

    /// `NT_WARNING`: severity 2.
    #[doc(alias = "NT_WARNING")]
    pub const fn is_warning(self) -> bool {
        self.severity() == 2
    }

    /// `NT_ERROR`: severity 3.
    #[doc(alias = "NT_ERROR")]
    pub const fn is_error(self) -> bool {
        self.severity() == 3
    }

    /// `Ok(self)` for a success code, `Err(self)` otherwise.
    pub const fn ok(self) -> Result<NtStatus, NtStatus> {
        if self.is_success() {
            Ok(self)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for NtStatus {
    /// The `STATUS_*` name, or `0xXXXXXXXX` for a code without a constant here.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{:#010X}", self.code()),
        }
    }
}

impl fmt::Debug for NtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({:#010X})", self.code()),
            None => write!(f, "NtStatus({:#010X})", self.code()),
        }
    }
}

impl From<NtStatus> for i32 {
    fn from(status: NtStatus) -> i32 {
        status.0
    }
}

impl core::error::Error for NtStatus {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_classes() {
        assert!(NtStatus::SUCCESS.is_success() && !NtStatus::SUCCESS.is_error());
        assert!(NtStatus::PENDING.is_success());
        assert!(NtStatus::BUFFER_OVERFLOW.is_warning() && !NtStatus::BUFFER_OVERFLOW.is_success());
        assert!(NtStatus::CANCELLED.is_error() && !NtStatus::CANCELLED.is_success());
        assert!(NtStatus::from_code(0x4000_0000).is_information());
        assert_eq!(NtStatus::SUCCESS.ok(), Ok(NtStatus::SUCCESS));
        assert_eq!(NtStatus::CANCELLED.ok(), Err(NtStatus::CANCELLED));
    }

    #[test]
    fn display_and_debug() {
        extern crate alloc;
        use alloc::format;
        assert_eq!(format!("{}", NtStatus::NOT_FOUND), "STATUS_NOT_FOUND");
        assert_eq!(
            format!("{}", NtStatus::from_code(0xC000_1234)),
            "0xC0001234"
        );
        assert_eq!(
            format!("{:?}", NtStatus::CANCELLED),
            "STATUS_CANCELLED(0xC0000120)"
        );
        assert_eq!(NtStatus::CANCELLED.0, -1_073_741_536);
    }
}
