//! `pma.Watcher`: the call `pma watch` makes (`pma_merge::watch::run`), from a training loop.
//!
//! Two ways to drive it, both the library's own loop:
//! - `poll_once()` runs the watcher with `once` set: it processes whatever checkpoints are ready,
//!   commits, and returns their events. A training loop calls it after each save. Each call takes
//!   and releases the state dir's lock, so the state is always committed between calls, exactly
//!   as with `pma watch --once` from cron.
//! - iterating (`for event in watcher`) starts the library's polling loop (inotify wake-ups,
//!   settle tracking across polls) on a background thread and yields its events as they come;
//!   `stop()` (from any thread), Ctrl-C on the main thread, or `close()` ends it after the update
//!   in progress, like SIGINT ends `pma watch`.
//!
//! Events are the records `pma watch` appends to `events.jsonl`, as [`WatchEvent`] objects. With
//! `exec=`, the event sink runs the command on each `merged` output through the library's
//! [`run_exec`] and adds its `exec` record after the `merged` one, as `pma watch --exec` does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use pma_format::FloatDtype;
use pma_merge::watch::{run_exec, Averaging, WatchConfig, WatchReport};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::{config_error, to_py_err};
use crate::interrupt::run_interruptible;
use crate::options::{self, ByteSize, Count, SelectOptions};
use crate::weights::{weight_spec, DEFAULT_ALPHA};

/// How long `__next__` waits for an event before it runs Python's signal handlers again.
const POLL: Duration = Duration::from_millis(100);

/// One thing the watcher did: the record `pma watch` appends to ``events.jsonl``.
///
/// ``kind`` is one of ``resumed``, ``seen``, ``waiting``, ``skipped-incomplete``, ``pinned``,
/// ``counted``, ``merged``, ``pin-damaged``, ``update-retried``, ``unpinned``, ``pruned``,
/// ``exec``; ``to_dict()`` has every field.
#[pyclass(frozen, module = "pma")]
#[derive(Debug)]
pub struct WatchEvent {
    /// The event name.
    #[pyo3(get)]
    kind: String,
    /// The checkpoint's step, for events about one checkpoint.
    #[pyo3(get)]
    step: Option<u64>,
    /// The merged checkpoint written (``merged``), deleted (``pruned``) or run on (``exec``).
    #[pyo3(get)]
    output: Option<PathBuf>,
    /// The record, serialized.
    json: String,
}

impl WatchEvent {
    /// The record of a library event or of an `exec` run: anything serializing with an `event`
    /// tag, so new library events need no code here.
    fn new(event: &impl serde::Serialize) -> WatchEvent {
        let value = serde_json::to_value(event).expect("watch events serialize to JSON");
        WatchEvent {
            kind: value["event"].as_str().unwrap_or_default().to_string(),
            step: value["step"].as_u64(),
            output: value["output"].as_str().map(PathBuf::from),
            json: value.to_string(),
        }
    }
}

#[pymethods]
impl WatchEvent {
    /// The record as a dict: ``{"event": kind, "step": ..., ...}``.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?.call_method1("loads", (&self.json,))
    }

    /// For ``merged``: the members' steps, oldest first (otherwise empty).
    #[getter]
    fn members(&self) -> Vec<u64> {
        self.field::<Vec<u64>>("members").unwrap_or_default()
    }

    /// For ``merged``: the members' weights, oldest first (empty for ema-stream and otherwise).
    #[getter]
    fn weights(&self) -> Vec<f64> {
        self.field::<Vec<f64>>("weights").unwrap_or_default()
    }

    fn __repr__(&self) -> String {
        format!("WatchEvent({})", self.json)
    }
}

impl WatchEvent {
    fn field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        let value: serde_json::Value = serde_json::from_str(&self.json).ok()?;
        serde_json::from_value(value.get(name)?.clone()).ok()
    }
}

/// What the background loop sends to the iterating thread.
enum Message {
    Event(WatchEvent),
    Done(pma_merge::Result<WatchReport>),
}

/// The background loop of an iterated watcher.
struct Follow {
    rx: Receiver<Message>,
    thread: Option<JoinHandle<()>>,
    finished: bool,
}

/// Keeps merged checkpoints of a training run's newest checkpoints up to date, as ``pma watch``
/// does, from Python. See ``pma/_pma.pyi`` for the arguments.
#[pyclass(frozen, module = "pma")]
pub struct Watcher {
    config: WatchConfig,
    /// The `exec=` command, run on each new output by the event sink.
    exec: Option<String>,
    stop: Arc<AtomicBool>,
    follow: Mutex<Option<Follow>>,
    /// Whether a poll has run: the library reports `resumed` each time it opens the state, which
    /// every `poll_once` does, but for this object only the first is news.
    polled: AtomicBool,
}

#[pymethods]
impl Watcher {
    #[new]
    #[pyo3(signature = (
        run, out, *, method=Some("ema".to_string()), alpha=DEFAULT_ALPHA, weights=None,
        normalize=false, incremental=false, state_dtype="f32".to_string(), last=None, every=None,
        min=None, tokens_per_step=None, dtype=None, max_shard_size=None, threads=None,
        allow_nonfinite=false, keep=None, exec=None, interval=30.0, settle=5.0, ready_file=None
    ))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments, one per `pma watch` flag.
    fn new(
        run: PathBuf,
        out: PathBuf,
        method: Option<String>,
        alpha: f64,
        weights: Option<Vec<f64>>,
        normalize: bool,
        incremental: bool,
        state_dtype: String,
        last: Option<usize>,
        every: Option<Count>,
        min: Option<usize>,
        tokens_per_step: Option<Count>,
        dtype: Option<String>,
        max_shard_size: Option<ByteSize>,
        threads: Option<usize>,
        allow_nonfinite: bool,
        keep: Option<usize>,
        exec: Option<String>,
        interval: f64,
        settle: f64,
        ready_file: Option<String>,
    ) -> PyResult<Watcher> {
        let selection = SelectOptions {
            last,
            every,
            at: None,
            min,
            tokens_per_step,
        }
        .selection()?;
        let averaging = averaging(
            method.as_deref(),
            alpha,
            weights,
            normalize,
            incremental,
            &state_dtype,
            &selection,
        )?;
        let config = WatchConfig {
            averaging,
            out_dtype: options::dtype(dtype.as_deref())?,
            max_shard_bytes: options::max_shard_bytes(max_shard_size.as_ref())?,
            allow_nonfinite,
            threads: threads.unwrap_or(0),
            keep,
            once: false,
            interval: seconds(interval, "interval")?,
            settle: seconds(settle, "settle")?,
            ready_file,
            direct_io: pma_format::DirectIo::from_env(),
            ..WatchConfig::new(run, out)
        };
        config.validate().map_err(to_py_err)?;
        // Checked here as well as by the library, so a misplaced `out` fails at construction.
        pma_merge::check_output_placement(&config.out_dir, &[config.run_dir.as_path()])
            .map_err(to_py_err)?;
        Ok(Watcher {
            config,
            exec,
            stop: Arc::new(AtomicBool::new(false)),
            follow: Mutex::new(None),
            polled: AtomicBool::new(false),
        })
    }

    /// The training run's directory.
    #[getter]
    fn run(&self) -> PathBuf {
        self.config.run_dir.clone()
    }

    /// Where merged checkpoints go (``step-XXXXXXX/``; the state is in ``.pma-watch/``).
    #[getter]
    fn out(&self) -> PathBuf {
        self.config.out_dir.clone()
    }

    /// Processes every checkpoint that is ready now, in step order, and returns what happened.
    ///
    /// Call it after each checkpoint save. A checkpoint counts once this watcher has seen its
    /// files unchanged for ``settle`` seconds (waited out here when it is otherwise complete;
    /// pass ``settle=0`` when calling right after a save that has returned), carries
    /// ``ready_file`` if one was asked for, and validates. Ctrl-C lets the update in progress
    /// finish and commit, then raises ``KeyboardInterrupt``.
    fn poll_once(&self, py: Python<'_>) -> PyResult<Vec<WatchEvent>> {
        let _idle = self.idle()?;
        let config = WatchConfig {
            once: true,
            ..self.config.clone()
        };
        let exec = self.exec.as_deref();
        let (events, result) = run_interruptible(py, None, |stop| {
            let mut events = Vec::new();
            let result = pma_merge::watch::run(&config, stop, &mut |e| {
                records(e, exec, &mut |r| events.push(r));
            });
            (events, result)
        })?;
        result.map_err(to_py_err)?;
        let first = !self.polled.swap(true, Ordering::SeqCst);
        Ok(events
            .into_iter()
            .filter(|e| first || e.kind != "resumed")
            .collect())
    }

    /// Asks the background loop of an iterated watcher to stop after the update in progress;
    /// the iteration then ends. Safe to call from any thread.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the background loop (if iterating) and waits for it to finish its update.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.stop();
        loop {
            match self.next_event(py)? {
                Some(_) => continue,
                None => return Ok(()),
            }
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<WatchEvent>> {
        self.next_event(py)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Watcher(run='{}', out='{}')",
            self.config.run_dir.display(),
            self.config.out_dir.display()
        )
    }
}

impl Watcher {
    /// Locks the loop slot for `poll_once`, refusing while a background loop runs (both would
    /// want the state dir's lock).
    fn idle(&self) -> PyResult<std::sync::MutexGuard<'_, Option<Follow>>> {
        let guard = self.follow.try_lock().map_err(|_| busy())?;
        match &*guard {
            Some(f) if !f.finished => Err(busy()),
            _ => Ok(guard),
        }
    }

    /// The next event of the background loop, starting it on first use; `None` once it ended.
    fn next_event(&self, py: Python<'_>) -> PyResult<Option<WatchEvent>> {
        let mut guard = match self.follow.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return Err(busy()),
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if guard.is_none() {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            *guard = Some(self.spawn()?);
        }
        let follow = guard.as_mut().expect("started above");
        if follow.finished {
            return Ok(None);
        }
        loop {
            let rx = &mut follow.rx;
            match py.detach(move || rx.recv_timeout(POLL)) {
                Ok(Message::Event(e)) => return Ok(Some(e)),
                Ok(Message::Done(result)) => {
                    follow.finished = true;
                    if let Some(t) = follow.thread.take() {
                        // It has sent its last message and is returning.
                        py.detach(|| t.join()).map_err(|_| panicked())?;
                    }
                    result.map_err(to_py_err)?;
                    return Ok(None);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        // Like SIGINT to `pma watch`: the update in progress completes.
                        self.stop.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    follow.finished = true;
                    return Err(panicked());
                }
            }
        }
    }

    fn spawn(&self) -> PyResult<Follow> {
        let (tx, rx) = mpsc::channel();
        let config = self.config.clone();
        let exec = self.exec.clone();
        let stop = Arc::clone(&self.stop);
        let thread = std::thread::Builder::new()
            .name("pma-watch".into())
            .spawn(move || {
                let result = pma_merge::watch::run(&config, &stop, &mut |e| {
                    records(e, exec.as_deref(), &mut |r| {
                        // The receiver only goes away with the Watcher, and then nobody listens.
                        let _ = tx.send(Message::Event(r));
                    });
                });
                let _ = tx.send(Message::Done(result));
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the watch thread: {e}")))?;
        Ok(Follow {
            rx,
            thread: Some(thread),
            finished: false,
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // A loop still running stops after its update; it holds its own copy of the config.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The event sink: the event's record, then, for a `merged` event with `exec` set, the record of
/// running the command on the output (the CLI's sink, less the log and the terminal). The update
/// is committed before `merged` is sent, so the command sees a durable output; a failing command
/// is recorded and the watcher goes on.
fn records(
    event: &pma_merge::watch::WatchEvent,
    exec: Option<&str>,
    emit: &mut dyn FnMut(WatchEvent),
) {
    emit(WatchEvent::new(event));
    if let (pma_merge::watch::WatchEvent::Merged { output, .. }, Some(cmd)) = (event, exec) {
        emit(WatchEvent::new(&run_exec(cmd, output)));
    }
}

fn busy() -> PyErr {
    PyRuntimeError::new_err(
        "this Watcher is being iterated; stop() or close() it before polling it otherwise",
    )
}

fn panicked() -> PyErr {
    PyRuntimeError::new_err("the watch thread panicked")
}

fn seconds(v: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| config_error(format!("{name} {v} is not a valid duration")))
}

/// The averaging of a watcher from its keywords (the CLI's `TryFrom<&Args> for WatchConfig`).
fn averaging(
    method: Option<&str>,
    alpha: f64,
    weights: Option<Vec<f64>>,
    normalize: bool,
    incremental: bool,
    state_dtype: &str,
    selection: &pma_merge::Selection,
) -> PyResult<Averaging> {
    let stream = method.is_some_and(|m| m.eq_ignore_ascii_case("ema-stream"));
    if stream {
        if weights.is_some() {
            return Err(config_error("give method or weights, not both"));
        }
        if selection.last.is_some() || selection.every.is_some() || incremental {
            return Err(config_error(
                "ema-stream averages the whole history: drop last/every/incremental",
            ));
        }
        let state_dtype = match FloatDtype::parse(state_dtype) {
            Some(d @ (FloatDtype::F32 | FloatDtype::F64)) => d,
            _ => {
                return Err(config_error(format!(
                    "state dtype '{state_dtype}' must be f32 or f64"
                )))
            }
        };
        return Ok(Averaging::EmaStream { alpha, state_dtype });
    }
    let method = weight_spec(method, alpha, weights, normalize)?;
    if incremental {
        if method != pma_merge::WeightSpec::Sma {
            return Err(config_error("incremental works with method='sma' only"));
        }
        if selection.every.is_some() {
            return Err(config_error(
                "incremental slides over consecutive checkpoints; drop every",
            ));
        }
        return Ok(Averaging::IncrementalSma {
            last: selection.last,
            min: selection.min,
        });
    }
    Ok(Averaging::Window {
        method,
        last: selection.last,
        every: selection.every,
        min: selection.min,
    })
}
