//! The DataRow and CopyData rewriter on arbitrary bytes: no panic, every
//! rewrite one well-formed frame of the same type, a DataRow's column count
//! kept, and a column masked by `redact` holding `[redacted]` or NULL (see
//! `interceptor::masking::rewrite::check_rewrite`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    interceptor::masking::rewrite::check_rewrite(data);
});
