//! The emulated device and its memory.

use std::ffi::{c_void, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::launch::DeviceValue;

extern "C" {
    fn pgqa_sim_device_new() -> *mut c_void;
    fn pgqa_sim_device_free(device: *mut c_void);
    fn pgqa_sim_malloc(device: *mut c_void, bytes: usize) -> *mut c_void;
    fn pgqa_sim_free(device: *mut c_void, ptr: *mut c_void) -> i32;
    fn pgqa_sim_set_race_check(device: *mut c_void, on: i32);
    fn pgqa_sim_race_check(device: *mut c_void) -> i32;
    fn pgqa_sim_last_report(device: *mut c_void) -> *const std::ffi::c_char;
    fn pgqa_sim_watch(device: *mut c_void, ptr: *const c_void, len: usize);
    fn pgqa_sim_unwatch_all(device: *mut c_void);
    fn pgqa_sim_watched_bytes(device: *mut c_void) -> u64;
    fn pgqa_sim_launches(device: *mut c_void) -> u64;
    fn pgqa_sim_set_tracing(device: *mut c_void, flags: i32);
    fn pgqa_sim_tracing(device: *mut c_void) -> i32;
    fn pgqa_sim_mark_written(device: *mut c_void, ptr: *const c_void, len: usize);
    fn pgqa_sim_take_profile(device: *mut c_void) -> *mut std::ffi::c_char;
    fn pgqa_sim_free_text(text: *mut std::ffi::c_char);
}

/// What a device does with its launches beyond running them: they run the traced copy of the
/// kernels (every load and store reported to the emulator; see [`crate::sim::profile`]) when
/// either is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tracing {
    /// Keep each launch's profile (requests, wavefronts, sectors, utilisation, bytes in
    /// flight) for [`SimDevice::take_profile`].
    pub profile: bool,
    /// Racecheck and initcheck (compute-sanitizer's semantics): a launch with a hazard or a read
    /// of unwritten bytes fails with the report.
    pub sanitize: bool,
}

impl Tracing {
    fn flags(self) -> i32 {
        self.profile as i32 | (self.sanitize as i32) << 1
    }
}

/// An emulated GPU and its stream: launches on it run to completion before they return. Its
/// buffers are host memory with guard pages, poisoned when made.
///
/// A device and its buffers stay on the thread that made them (neither is `Send` nor `Sync`):
/// around every launch the emulator snapshots and restores all of the device's buffers, which
/// another thread's use of them would race with.
pub struct SimDevice {
    raw: NonNull<c_void>,
}

impl SimDevice {
    /// A new device with no buffers (race check on unless `PAGED_GQA_SIM_RACE_CHECK=0`; the
    /// sanitizers on when `PAGED_GQA_SIM_SANITIZE=1`, as `scripts/test-sim --sanitize` runs).
    pub fn new() -> Rc<Self> {
        // SAFETY: no preconditions; never null.
        let raw = unsafe { pgqa_sim_device_new() };
        Rc::new(Self {
            raw: NonNull::new(raw).expect("the emulator returned a device"),
        })
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.raw.as_ptr()
    }

    /// `len` elements whose bytes are all 0xff (NaN in f32, f16 and bf16): what a kernel leaves
    /// unwritten stays visibly poisoned.
    pub fn alloc<T: DeviceValue>(self: &Rc<Self>, len: usize) -> Result<SimBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::TooLarge {
                what: "emulator buffer bytes",
                value: len as u128 * std::mem::size_of::<T>() as u128,
                limit: usize::MAX as u128,
            })?;
        // SAFETY: the device is live; the emulator returns null when it cannot map.
        let ptr = unsafe { pgqa_sim_malloc(self.raw(), bytes) };
        let ptr = NonNull::new(ptr.cast::<T>()).ok_or_else(|| super::out_of_memory(bytes))?;
        Ok(SimBuffer {
            device: self.clone(),
            ptr,
            len,
            element: PhantomData,
        })
    }

    /// A buffer holding a copy of `values`.
    pub fn upload<T: DeviceValue>(self: &Rc<Self>, values: &[T]) -> Result<SimBuffer<T>> {
        let mut buffer = self.alloc(values.len())?;
        buffer.as_mut_slice().copy_from_slice(values);
        Ok(buffer)
    }

    /// Turns the two-schedule race check on or off for later launches.
    pub fn set_race_check(&self, on: bool) {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_set_race_check(self.raw(), on as i32) }
    }

    /// Whether launches run twice (forward with late copies, reverse with early copies) and
    /// must agree bit for bit.
    pub fn race_check(&self) -> bool {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_race_check(self.raw()) != 0 }
    }

    /// The report of the last launch the emulator refused or failed ("" when none did).
    pub fn last_report(&self) -> String {
        // SAFETY: a NUL-terminated string owned by the device, copied at once (the device is
        // used by this thread only, so no launch changes it meanwhile).
        unsafe { CStr::from_ptr(pgqa_sim_last_report(self.raw())) }
            .to_string_lossy()
            .into_owned()
    }

    /// Counts, in later launches, the bytes `cp.async` brings from device addresses
    /// `[address, address + bytes)` (the K/V pages: the traffic counter). Counts add up over
    /// every watched range until [`unwatch_all`](Self::unwatch_all).
    pub fn watch(&self, address: u64, bytes: usize) {
        // SAFETY: only records the range.
        unsafe { pgqa_sim_watch(self.raw(), address as *const c_void, bytes) }
    }

    /// Stops counting and resets the count.
    pub fn unwatch_all(&self) {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_unwatch_all(self.raw()) }
    }

    /// Bytes `cp.async` brought from the watched ranges since they were set (the first
    /// schedule of each launch only).
    pub fn watched_bytes(&self) -> u64 {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_watched_bytes(self.raw()) }
    }

    /// A new device whose launches are traced as `tracing` says (and whose buffers the
    /// initcheck follows from their allocation).
    pub fn with_tracing(tracing: Tracing) -> Rc<Self> {
        let device = Self::new();
        device.set_tracing(tracing);
        device
    }

    /// Traces later launches as `tracing` says (initcheck follows the buffers allocated while
    /// the sanitizers are on; older ones it does not check).
    pub fn set_tracing(&self, tracing: Tracing) {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_set_tracing(self.raw(), tracing.flags()) }
    }

    /// How launches are traced.
    pub fn tracing(&self) -> Tracing {
        // SAFETY: the device is live.
        let flags = unsafe { pgqa_sim_tracing(self.raw()) };
        Tracing {
            profile: flags & 1 != 0,
            sanitize: flags & 2 != 0,
        }
    }

    /// The profiles of the launches traced since the last call (none unless
    /// [`Tracing::profile`] is on), with their sites named `file:line`.
    pub fn take_profile(&self) -> Result<super::profile::Profile> {
        // SAFETY: the device is live; the text is malloc'd, NUL-terminated, freed below.
        let text = unsafe {
            let raw = pgqa_sim_take_profile(self.raw());
            if raw.is_null() {
                return Err(super::out_of_memory(0));
            }
            let text = CStr::from_ptr(raw).to_string_lossy().into_owned();
            pgqa_sim_free_text(raw);
            text
        };
        super::profile::Profile::parse(&text)
    }

    /// Kernel launches run on this device so far.
    pub fn launches(&self) -> u64 {
        // SAFETY: the device is live.
        unsafe { pgqa_sim_launches(self.raw()) }
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        // SAFETY: every buffer holds an Rc of its device, so none is left.
        unsafe { pgqa_sim_device_free(self.raw()) }
    }
}

/// `len` elements of emulated device memory. The memory is the host's, so it reads and
/// writes as a slice; a kernel launched on it sees what the slice holds.
pub struct SimBuffer<T: DeviceValue> {
    device: Rc<SimDevice>,
    ptr: NonNull<T>,
    len: usize,
    element: PhantomData<T>,
}

impl<T: DeviceValue> SimBuffer<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element.
    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The device the buffer lives on.
    pub fn device(&self) -> &Rc<SimDevice> {
        &self.device
    }

    /// The address, after checking that the buffer lives on `device`.
    pub(crate) fn address_on(&self, name: &'static str, device: &Rc<SimDevice>) -> Result<u64> {
        if !Rc::ptr_eq(&self.device, device) {
            return Err(Error::DeviceMismatch { what: name });
        }
        Ok(self.address())
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: len elements of T (any bit pattern is a valid Pod value) owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The elements, to write.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // What the host may write counts as written for the initcheck.
        // SAFETY: the range is this live buffer's.
        unsafe {
            pgqa_sim_mark_written(
                self.device.raw(),
                self.ptr.as_ptr().cast(),
                self.len * std::mem::size_of::<T>(),
            )
        };
        // SAFETY: the buffer's live memory, borrowed exclusively with the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// A copy of the elements.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }

    /// Overwrites every element with `values` (of the same length).
    pub fn copy_from(&mut self, values: &[T]) -> Result<()> {
        Error::check_len("values", values.len(), self.len)?;
        self.as_mut_slice().copy_from_slice(values);
        Ok(())
    }
}

impl<T: DeviceValue> Drop for SimBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by this device, freed once.
        unsafe { pgqa_sim_free(self.device.raw(), self.ptr.as_ptr().cast()) };
    }
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("race_check", &self.race_check())
            .field("launches", &self.launches())
            .finish()
    }
}

impl<T: DeviceValue> std::fmt::Debug for SimBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBuffer")
            .field("address", &format_args!("{:#x}", self.address()))
            .field("len", &self.len)
            .finish()
    }
}
