//! The kernel emulator as a backend: the real `kernels/*.cu`, compiled for the CPU (see
//! `kernels/sim/`), running on emulated device memory with strict checks.
//!
//! Every CUDA thread runs as a fiber; barriers and warp collectives (shuffles, `ldmatrix`,
//! `mma.sync`) must be reached by every thread or lane they name, at the same call site;
//! `cp.async` data lands only at the `wait_group` that retires it; device buffers and shared
//! memory start poisoned (NaN bytes) and have guard pages, so an access past either end is
//! reported with the kernel, block, thread and buffer; with the race check on (the default,
//! `PAGED_GQA_SIM_RACE_CHECK=0` turns it off) every launch runs a second time in reverse order
//! with copies landing at issue, and every buffer must come out bit-identical. A launch the
//! emulator objects to fails with [`Error::Launch`] carrying its report.
//!
//! The API mirrors [`crate::cuda`]: a [`SimDevice`] (the stream), [`SimBuffer`]s (its memory,
//! which is host memory: read and write it directly), [`AttendBatch`], [`SimStorage`] for a
//! [`PagedCache`](crate::cache::PagedCache), [`NaiveAttention`] and [`repeat_kv`]. The
//! emulator presents an H200 (sm_90, 132 SMs, 227 KiB of shared memory per block). It proves
//! logic, not speed: timing, occupancy and the real compiler's code generation need a GPU.

mod attend;
mod baseline;
mod buffer;
mod merge;
pub mod occupancy;
pub mod profile;
pub mod speed_of_light;
mod storage;

pub use attend::{AttendBatch, DeviceKvScales};
pub use baseline::{repeat_kv, NaiveAttention};
pub use buffer::{SimBuffer, SimDevice, Tracing};
pub use merge::merge_states;
pub use storage::{SimStepPlan, SimStorage};

use std::ffi::{c_char, c_void, CStr};

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{check_status, Backend, DeviceValue, Launch};
use crate::plan::KernelChoice;

#[allow(non_camel_case_types)]
type pgqa_stream = ffi::pgqa_stream;

extern "C" {
    fn pgqa_sim_attend(
        params: *const ffi::pgqa_attend_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_merge_states(
        params: *const ffi::pgqa_merge_states_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_write_kv(
        params: *const ffi::pgqa_write_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_copy_blocks(
        params: *const ffi::pgqa_copy_blocks_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_repeat_kv(
        params: *const ffi::pgqa_repeat_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_gather_kv(
        params: *const ffi::pgqa_gather_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_naive_decode(
        params: *const ffi::pgqa_naive_decode_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_attend(
        params: *const ffi::pgqa_attend_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_merge_states(
        params: *const ffi::pgqa_merge_states_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_write_kv(
        params: *const ffi::pgqa_write_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_copy_blocks(
        params: *const ffi::pgqa_copy_blocks_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_repeat_kv(
        params: *const ffi::pgqa_repeat_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_gather_kv(
        params: *const ffi::pgqa_gather_kv_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_trace_naive_decode(
        params: *const ffi::pgqa_naive_decode_params,
        stream: pgqa_stream,
        cuda_error: *mut i32,
    ) -> ffi::pgqa_status;
    fn pgqa_sim_cuda_error_name(cuda_error: i32) -> *const c_char;
    fn pgqa_sim_check(
        name: *const c_char,
        variant: i32,
        input: *const c_void,
        input_bytes: usize,
        output: *mut c_void,
        output_bytes: usize,
        report: *mut c_char,
        report_bytes: usize,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn pgqa_trace_check(
        name: *const c_char,
        variant: i32,
        input: *const c_void,
        input_bytes: usize,
        output: *mut c_void,
        output_bytes: usize,
        report: *mut c_char,
        report_bytes: usize,
        tracing: i32,
        profile: *mut *mut c_char,
    ) -> i32;
    fn pgqa_sim_free_text(text: *mut c_char);
    fn pgqa_sim_sm_count() -> i32;
    fn pgqa_sim_f16_to_f32(bits: u16) -> f32;
    fn pgqa_sim_f32_to_f16(x: f32) -> u16;
    fn pgqa_sim_bf16_to_f32(bits: u16) -> f32;
    fn pgqa_sim_f32_to_bf16(x: f32) -> u16;
}

impl Backend for std::rc::Rc<SimDevice> {
    type Buffer<T: DeviceValue> = SimBuffer<T>;

    /// The emulated H200's, as its runtime reports them to the kernels' launchers.
    fn sm_count(&self) -> Result<usize> {
        // SAFETY: a constant of the emulator.
        Ok(unsafe { pgqa_sim_sm_count() }.max(1) as usize)
    }

    /// The emulated H200 runs both kernels.
    fn kernels(&self, requested: KernelChoice) -> Result<KernelChoice> {
        Ok(requested)
    }

    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<SimBuffer<T>> {
        let mut buffer = self.alloc::<T>(len)?;
        buffer.as_mut_slice().fill(T::zeroed());
        Ok(buffer)
    }

    fn upload<T: DeviceValue>(&self, values: &[T]) -> Result<SimBuffer<T>> {
        self.upload(values)
    }

    fn write<T: DeviceValue>(&self, values: &[T], dst: &mut SimBuffer<T>) -> Result<()> {
        dst.as_mut_slice()[..values.len()].copy_from_slice(values);
        Ok(())
    }

    fn address<T: DeviceValue>(&self, buffer: &SimBuffer<T>) -> u64 {
        buffer.address()
    }

    fn len<T: DeviceValue>(buffer: &SimBuffer<T>) -> usize {
        buffer.len()
    }

    fn same(&self, other: &Self) -> bool {
        std::rc::Rc::ptr_eq(self, other)
    }

    unsafe fn launch(&self, call: Launch<'_>) -> Result<()> {
        let stream = self.raw() as pgqa_stream;
        let mut cuda_error = 0i32;
        // The traced copy of the kernels when the device profiles or sanitizes.
        let traced = self.tracing() != Tracing::default();
        macro_rules! entry {
            ($plain:ident, $traced:ident, $params:expr) => {
                if traced {
                    $traced($params, stream, &mut cuda_error)
                } else {
                    $plain($params, stream, &mut cuda_error)
                }
            };
        }
        let kernel = call.kernel();
        // SAFETY: forwarded from the caller: every pointer is a live buffer of this device.
        let status = unsafe {
            match call {
                Launch::Attend(p) => entry!(pgqa_sim_attend, pgqa_trace_attend, p),
                Launch::MergeStates(p) => entry!(pgqa_sim_merge_states, pgqa_trace_merge_states, p),
                Launch::WriteKv(p) => entry!(pgqa_sim_write_kv, pgqa_trace_write_kv, p),
                Launch::CopyBlocks(p) => entry!(pgqa_sim_copy_blocks, pgqa_trace_copy_blocks, p),
                Launch::RepeatKv(p) => entry!(pgqa_sim_repeat_kv, pgqa_trace_repeat_kv, p),
                Launch::GatherKv(p) => entry!(pgqa_sim_gather_kv, pgqa_trace_gather_kv, p),
                Launch::NaiveDecode(p) => entry!(pgqa_sim_naive_decode, pgqa_trace_naive_decode, p),
            }
        };
        check_status(kernel, status, || {
            // SAFETY: a static, NUL-terminated string for any value.
            let name = unsafe { CStr::from_ptr(pgqa_sim_cuda_error_name(cuda_error)) };
            format!(
                "emulated {} ({cuda_error}): {}",
                name.to_string_lossy(),
                self.last_report()
            )
        })
    }
}

/// What one of the emulator's planted-bug checks (`kernels/sim/checks.cu`) did: the launch's
/// `cudaError` value, the device output (poisoned where unwritten) and the emulator's report.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub status: i32,
    pub output: Vec<u8>,
    pub report: String,
}

/// Runs the emulator's check `name` (`variant` 0: correct; others: a planted mistake) with
/// `input` in a device buffer and `output_bytes` of poisoned device output. `None` for a name the
/// emulator does not know.
pub fn run_check(name: &str, variant: i32, input: &[u8], output_bytes: usize) -> Option<CheckRun> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut output = vec![0u8; output_bytes];
    let mut report = vec![0u8; 8192];
    // SAFETY: every pointer is valid for the lengths given.
    let status = unsafe {
        pgqa_sim_check(
            name.as_ptr(),
            variant,
            input.as_ptr().cast(),
            input.len(),
            output.as_mut_ptr().cast(),
            output.len(),
            report.as_mut_ptr().cast(),
            report.len(),
        )
    };
    if status == -1 {
        return None;
    }
    let end = report.iter().position(|&b| b == 0).unwrap_or(report.len());
    Some(CheckRun {
        status,
        output,
        report: String::from_utf8_lossy(&report[..end]).into_owned(),
    })
}

/// [`run_check`] on the traced copy of the checks, on a device traced as `tracing` says:
/// the run and the profile of its launches (empty unless `tracing.profile`).
pub fn run_traced_check(
    name: &str,
    variant: i32,
    input: &[u8],
    output_bytes: usize,
    tracing: Tracing,
) -> Option<(CheckRun, profile::Profile)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut output = vec![0u8; output_bytes];
    let mut report = vec![0u8; 16384];
    let mut text: *mut c_char = std::ptr::null_mut();
    let flags = tracing.profile as i32 | (tracing.sanitize as i32) << 1;
    // SAFETY: every pointer is valid for the lengths given; `text` is malloc'd by the emulator
    // (or left null for an unknown name) and freed here.
    let (status, profile_text) = unsafe {
        let status = pgqa_trace_check(
            name.as_ptr(),
            variant,
            input.as_ptr().cast(),
            input.len(),
            output.as_mut_ptr().cast(),
            output.len(),
            report.as_mut_ptr().cast(),
            report.len(),
            flags,
            &mut text,
        );
        let profile_text = if text.is_null() {
            String::new()
        } else {
            let t = CStr::from_ptr(text).to_string_lossy().into_owned();
            pgqa_sim_free_text(text);
            t
        };
        (status, profile_text)
    };
    if status == -1 {
        return None;
    }
    let end = report.iter().position(|&b| b == 0).unwrap_or(report.len());
    let run = CheckRun {
        status,
        output,
        report: String::from_utf8_lossy(&report[..end]).into_owned(),
    };
    Some((run, profile::Profile::parse(&profile_text).ok()?))
}

/// The emulator's 16-bit float conversions (its `__half`, `__nv_bfloat16`): widen, and round
/// to nearest even.
pub mod convert {
    /// f16 bits to f32.
    pub fn f16_to_f32(bits: u16) -> f32 {
        // SAFETY: a pure function.
        unsafe { super::pgqa_sim_f16_to_f32(bits) }
    }
    /// f32 to f16 bits (`__float2half_rn`).
    pub fn f32_to_f16(x: f32) -> u16 {
        // SAFETY: a pure function.
        unsafe { super::pgqa_sim_f32_to_f16(x) }
    }
    /// bf16 bits to f32.
    pub fn bf16_to_f32(bits: u16) -> f32 {
        // SAFETY: a pure function.
        unsafe { super::pgqa_sim_bf16_to_f32(bits) }
    }
    /// f32 to bf16 bits (`__float2bfloat16_rn`).
    pub fn f32_to_bf16(x: f32) -> u16 {
        // SAFETY: a pure function.
        unsafe { super::pgqa_sim_f32_to_bf16(x) }
    }
}

/// `Err(Driver)` for a failed emulator allocation.
fn out_of_memory(bytes: usize) -> Error {
    Error::Driver(format!("the emulator could not map {bytes} bytes"))
}
