//! The one place log lines go: a shared buffer that a background thread writes to stderr.
//!
//! Workers append whole lines under a short lock (a `memcpy`, no allocation once the buffer has
//! grown, no system call); the writer thread swaps the buffer out and writes it in one `write`
//! when [`FLUSH_AT`] bytes are waiting, every [`FLUSH_EVERY`], and when the [`LogGuard`] is
//! dropped at shutdown. A consumer that reads slowly stalls only the writer thread: past
//! [`MAX_PENDING`] bytes waiting, lines are dropped and counted in
//! `rustygate_log_lines_dropped_total`, never waited for. Lines a failed or short write leaves
//! unwritten (a full disk, a closed pipe) are counted there too, and the next line written
//! starts on a line of its own, never glued onto the cut one. Access lines
//! ([`super::access`]) and every other `tracing` event share the buffer, so lines never
//! interleave and keep their order.

use std::io::Write;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};

/// Bytes waiting that wake the writer before its next tick.
pub const FLUSH_AT: usize = 64 * 1024;
/// How long a line may wait in the buffer when traffic is light.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes waiting past which new lines are dropped (the output is not keeping up).
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

/// Why log lines were dropped: the `reason` label of `rustygate_log_lines_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The output did not keep up: [`MAX_PENDING`] bytes were waiting.
    QueueFull,
    /// A write to the output failed or was short (a full disk, a closed pipe).
    WriteFailed,
    /// A policy's `print`/`debug` or a plugin logged past its rate (`policy::engine`,
    /// `plugins::log`).
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::QueueFull,
        DropReason::WriteFailed,
        DropReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::WriteFailed => "write_failed",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// `rustygate_log_lines_dropped_total{reason}`: count with [`count_dropped`].
pub static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "rustygate_log_lines_dropped_total",
            "Log lines (access and other) dropped: the log output did not keep up (queue_full) or failed (write_failed), or a policy or plugin logged past its rate (rate_limited)",
        ),
        &["reason"],
    )
    .unwrap_or_else(|_| unreachable!("constant metric definition"))
});

/// Counts `n` log lines dropped for `reason`.
pub fn count_dropped(reason: DropReason, n: u64) {
    DROPPED.with_label_values(&[reason.as_str()]).inc_by(n);
}

/// Log lines dropped for `reason` so far.
pub fn dropped(reason: DropReason) -> u64 {
    DROPPED.with_label_values(&[reason.as_str()]).get()
}

pub struct LogSink {
    pending: Mutex<Pending>,
    wake: Condvar,
}

struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

impl LogSink {
    pub fn new() -> LogSink {
        LogSink {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock leaves only bytes behind; keep logging.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one or more whole lines. `false` (and counted) when they were dropped.
    pub fn push(&self, lines: &[u8]) -> bool {
        let mut p = self.lock();
        if p.buf.len() + lines.len() > MAX_PENDING {
            drop(p);
            count_dropped(DropReason::QueueFull, 1);
            return false;
        }
        let below = p.buf.len() < FLUSH_AT;
        p.buf.extend_from_slice(lines);
        let wake = below && p.buf.len() >= FLUSH_AT;
        drop(p);
        if wake {
            self.wake.notify_one();
        }
        true
    }

    /// Writes what is queued to `out` until [`LogSink::close`], then what is left.
    pub fn run(&self, out: &mut dyn Write) {
        let mut spare = Vec::new();
        // The output ends in part of a line (a write failed or stopped short).
        let mut cut = false;
        loop {
            let mut p = self.lock();
            if p.buf.len() < FLUSH_AT && !p.closed {
                p = self
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .map(|(p, _)| p)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut p.buf, &mut spare);
            let closed = p.closed;
            drop(p);
            if !spare.is_empty() {
                cut = write_lines(out, &spare, cut);
                spare.clear();
                // A burst does not pin its peak: keep a few flushes' worth.
                spare.shrink_to(4 * FLUSH_AT);
            }
            if closed && self.lock().buf.is_empty() {
                return;
            }
        }
    }

    /// Asks [`LogSink::run`] to write what is left and return.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// Writes `lines` (whole lines) to `out`, after a line feed when the output was left `cut` (it
/// ends in part of a line), so that no line is glued onto a cut one. Every line not written
/// whole (the one a failed or short write cut, and all after it) is counted as `write_failed`:
/// nothing else can be told when the log output itself fails. Returns whether the output is
/// left cut.
fn write_lines(out: &mut dyn Write, lines: &[u8], cut: bool) -> bool {
    if cut && !matches!(out.write(b"\n"), Ok(1)) {
        count_dropped(
            DropReason::WriteFailed,
            memchr::memchr_iter(b'\n', lines).count() as u64,
        );
        return true;
    }
    let mut written = 0;
    while written < lines.len() {
        match out.write(&lines[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = out.flush();
    let lost = &lines[written..];
    if lost.is_empty() {
        return false;
    }
    count_dropped(
        DropReason::WriteFailed,
        memchr::memchr_iter(b'\n', lost).count() as u64,
    );
    written > 0 && lines[written - 1] != b'\n'
}

impl Default for LogSink {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's sink, once logging is initialised.
static SINK: OnceLock<&'static LogSink> = OnceLock::new();

pub fn global() -> Option<&'static LogSink> {
    SINK.get().copied()
}

/// Installs the process-wide sink writing to stderr and starts its writer thread. `None` when
/// one is already installed (the first keeps running).
pub fn install_stderr() -> Option<LogGuard> {
    let sink: &'static LogSink = Box::leak(Box::new(LogSink::new()));
    SINK.set(sink).ok()?;
    let thread = std::thread::Builder::new()
        .name("rustygate-log".into())
        .spawn(move || sink.run(&mut std::io::stderr()))
        .ok()?;
    Some(LogGuard {
        sink,
        thread: Some(thread),
    })
}

/// Flushes the sink when dropped: keep it until the process is about to exit.
pub struct LogGuard {
    sink: &'static LogSink,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sink.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `tracing_subscriber`'s writer: each event arrives as one `write_all` of a whole line.
#[derive(Clone, Copy)]
pub struct SinkWriter(pub &'static LogSink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Dropped lines are counted by the sink; the event's writer has nothing to retry.
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, mpsc};

    /// An output that blocks until the test lets it go, recording what it got.
    struct Gate {
        open: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.open.recv();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_past_the_cap_and_close_writes_the_rest() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new()));
        let (open, gate) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = Gate {
            open: gate,
            got: Arc::clone(&got),
        };
        let writer = std::thread::spawn(move || sink.run(&mut out));
        // The first flush's worth is taken by the writer, which then stalls on the gate.
        let line = vec![b'x'; 1023];
        let line = [line.as_slice(), b"\n"].concat();
        for _ in 0..FLUSH_AT / line.len() {
            assert!(sink.push(&line));
        }
        std::thread::sleep(FLUSH_EVERY * 3);
        let before = dropped(DropReason::QueueFull);
        let mut accepted = 0usize;
        let mut refused = 0usize;
        for _ in 0..(MAX_PENDING / line.len() + 100) {
            if sink.push(&line) {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(refused >= 100, "past the cap lines are dropped: {refused}");
        assert!(dropped(DropReason::QueueFull) - before >= refused as u64);
        assert!(accepted * line.len() <= MAX_PENDING);
        // Let the output go and close: everything accepted is written, in whole lines.
        sink.close();
        for _ in 0..10_000 {
            let _ = open.send(());
        }
        writer.join().unwrap();
        let got = got.lock().unwrap();
        let lines = got.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
        assert_eq!(lines, FLUSH_AT / line.len() + accepted);
        assert!(
            got.split(|b| *b == b'\n')
                .all(|l| l.is_empty() || l.len() == 1023)
        );
    }

    /// An output that takes `first` bytes of the first write, fails the next write, and then
    /// takes everything: a disk that filled up and was freed again.
    struct Cuts {
        first: usize,
        writes: usize,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Cuts {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            let mut got = self.got.lock().unwrap();
            match self.writes {
                1 => {
                    let n = self.first.min(buf.len());
                    got.extend_from_slice(&buf[..n]);
                    Ok(n)
                }
                2 => Err(std::io::Error::from_raw_os_error(28)),
                _ => {
                    got.extend_from_slice(buf);
                    Ok(buf.len())
                }
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(from: std::ops::Range<usize>) -> Vec<u8> {
        from.flat_map(|n| format!("{{\"n\":{n}}}\n").into_bytes())
            .collect()
    }

    /// A write cut short, then failing: the lines not written whole are counted, and the lines
    /// of the next flush start on a line of their own. Before, nothing was counted and the
    /// next line was glued onto the cut one.
    #[test]
    fn lines_a_failed_or_short_write_loses_are_counted_and_none_is_glued_to_a_cut_one() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = Cuts {
            first: 20,
            writes: 0,
            got: Arc::clone(&got),
        };
        let before = dropped(DropReason::WriteFailed);
        // `{"n":0}\n` is 8 bytes: two whole lines and 4 bytes of the third go out.
        assert!(sink.push(&json_lines(0..10)));
        let writer = std::thread::spawn(move || sink.run(&mut out));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sink.push(&json_lines(10..12)));
        sink.close();
        writer.join().unwrap();
        let lost = dropped(DropReason::WriteFailed) - before;
        assert!(lost >= 8, "{lost}");
        let got = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 5, "{got:?}");
        for (i, n) in [(0, 0), (1, 1), (3, 10), (4, 11)] {
            let v: serde_json::Value = serde_json::from_str(lines[i]).unwrap();
            assert_eq!(v["n"], n, "{got:?}");
        }
        assert_eq!(lines[2], "{\"n\"", "the cut line stands alone: {got:?}");
    }

    #[test]
    fn lines_reach_the_output_within_the_tick_without_a_close() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = mpsc::channel();
        for _ in 0..100 {
            open.send(()).unwrap();
        }
        let mut out = Gate {
            open: gate,
            got: Arc::clone(&got),
        };
        std::thread::spawn(move || sink.run(&mut out));
        assert!(sink.push(b"one\n"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(got.lock().unwrap().as_slice(), b"one\n");
        sink.close();
    }
}
