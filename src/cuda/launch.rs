//! The thin layer between `ffi` and the safe API: status codes become `Result`s.

use std::ffi::CStr;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ffi;

/// The C enum value of a dtype.
pub(crate) fn dtype(dtype: DType) -> ffi::pgqa_dtype {
    match dtype {
        DType::F32 => ffi::pgqa_dtype::PGQA_DTYPE_F32,
        DType::F16 => ffi::pgqa_dtype::PGQA_DTYPE_F16,
        DType::BF16 => ffi::pgqa_dtype::PGQA_DTYPE_BF16,
    }
}

/// Turns what a launcher returned into a `Result`.
pub(crate) fn check(kernel: &'static str, status: ffi::pgqa_status, cuda_error: i32) -> Result<()> {
    let detail = match status {
        ffi::pgqa_status::PGQA_STATUS_OK => return Ok(()),
        ffi::pgqa_status::PGQA_STATUS_INVALID_ARGUMENT => {
            "the launcher rejected its arguments".to_string()
        }
        ffi::pgqa_status::PGQA_STATUS_MISALIGNED => {
            "a pointer or row is not 16-byte aligned".to_string()
        }
        ffi::pgqa_status::PGQA_STATUS_CUDA_ERROR => {
            // SAFETY: the library returns a static, NUL-terminated string for any value.
            let name = unsafe { CStr::from_ptr(ffi::pgqa_cuda_error_name(cuda_error)) };
            format!("CUDA error {cuda_error} ({})", name.to_string_lossy())
        }
        other => format!("unknown status {}", other.0),
    };
    Err(Error::Launch { kernel, detail })
}
