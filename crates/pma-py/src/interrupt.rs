//! Running a library call without the GIL while Ctrl-C still works.
//!
//! Python runs signal handlers only on the main thread, and only when that thread runs Python
//! code or calls `PyErr_CheckSignals`. A merge that simply released the GIL for minutes would
//! leave Ctrl-C pending until it finished. So the call runs on a scoped worker thread while the
//! calling thread sleeps without the GIL in short slices; between slices it takes the GIL back,
//! runs the signal handlers (`Python::check_signals`) and looks at the caller's cancel event.
//! When a handler raises (Ctrl-C → `KeyboardInterrupt`) or the event is set, the library's
//! cancel flag is set; the library stops at its next safe point and leaves no output behind, and
//! the worker is awaited so nothing outlives the call. A handler's exception wins over the
//! library's `Interrupted`: Ctrl-C surfaces as the `KeyboardInterrupt` Python code expects.
//!
//! On other threads `check_signals` does nothing, so a merge started from a Python thread is
//! stopped through its `cancel` event instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pyo3::prelude::*;

/// How long the caller sleeps between signal checks: the delay Ctrl-C can take to register.
const POLL: Duration = Duration::from_millis(50);

/// Runs `work(cancel_flag)` off the GIL; see the module docs. `cancel_event` is an optional
/// Python object with an `is_set()` method (a `threading.Event`).
pub(crate) fn run_interruptible<T, F>(
    py: Python<'_>,
    cancel_event: Option<&Bound<'_, PyAny>>,
    work: F,
) -> PyResult<T>
where
    F: FnOnce(&AtomicBool) -> T + Send,
    T: Send,
{
    let cancel = AtomicBool::new(false);
    let caller = std::thread::current();
    std::thread::scope(|scope| {
        let cancel = &cancel;
        let handle = scope.spawn(move || {
            let out = work(cancel);
            caller.unpark();
            out
        });
        let mut raised: Option<PyErr> = None;
        while !handle.is_finished() {
            py.detach(|| {
                if !handle.is_finished() {
                    std::thread::park_timeout(POLL);
                }
            });
            if handle.is_finished() || raised.is_some() {
                continue;
            }
            let event_set = cancel_event.map_or(Ok(false), |event| {
                event.call_method0("is_set").and_then(|v| v.is_truthy())
            });
            // An exception from a signal handler or from the event itself stops the work too;
            // returning it at once would leave the worker running while this thread blocks in
            // the scope's join with the GIL held.
            match (event_set, py.check_signals()) {
                (_, Err(e)) | (Err(e), _) => raised = Some(e),
                (Ok(true), Ok(())) => {}
                (Ok(false), Ok(())) => continue,
            }
            cancel.store(true, Ordering::SeqCst);
        }
        let out = handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match raised {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}
