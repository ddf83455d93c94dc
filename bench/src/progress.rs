//! Progress on stderr, stamped with the seconds since the bench started.

use std::{sync::OnceLock, time::Instant};

pub(crate) static START: OnceLock<Instant> = OnceLock::new();

/// Progress on stderr, stamped with the seconds since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {{
        let t = $crate::progress::START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64();
        eprintln!("[{t:6.1}s] {}", format_args!($($arg)*));
    }};
}
