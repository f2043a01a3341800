//! Kernel side of interceptor. The cgroup connect4/connect6 and sockops
//! programs arrive with the transparent-interception issue; until then the
//! proxy is reached by connecting to its listener directly.
#![no_std]

pub use common::OriginKey;
