/// One field of a kernel-provided struct (context or socket), read with a
/// single volatile load at a constant offset from the pointer. The verifier
/// forbids pointer arithmetic on context and socket pointers, which LLVM
/// would otherwise emit for arrays and adjacent fields.
///
/// `read_field!(ptr, field)`, `read_field!(ptr, array[2])`.
macro_rules! read_field {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: callers pass a valid pointer from the kernel for this run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}
