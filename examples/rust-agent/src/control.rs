//! The control channel (INTERFACE.md section 3): one JSON object per line on the
//! descriptor baqup-run names in `BAQUP_CONTROL_FD`.
//!
//! Progress is rate-limited here as well as in baqup-run, so a tree of a million small
//! files costs a few hundred lines, not a million.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::FromRawFd;
use std::time::{Duration, Instant};

use crate::failure::Failure;
use crate::json::Object;

const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub struct Control {
    out: File,
    fd: i32,
    last_progress: Option<Instant>,
}

/// What the job has done so far, for a progress line.
pub struct Progress<'a> {
    pub bytes: u64,
    pub files: u64,
    pub total_bytes: u64,
    pub current_file: Option<&'a str>,
    pub elapsed: Duration,
}

impl Control {
    /// The channel from `BAQUP_CONTROL_FD` (default 3), checked to be open.
    pub fn from_env() -> Result<Control, Failure> {
        let text = std::env::var("BAQUP_CONTROL_FD").unwrap_or_else(|_| String::from("3"));
        let fd: i32 = match text.trim().parse() {
            Ok(fd) if fd >= 0 => fd,
            _ => {
                return Err(Failure::Config(format!(
                    "BAQUP_CONTROL_FD={}: expected a file descriptor number",
                    text
                )))
            }
        };
        // SAFETY: baqup-run hands this descriptor to us alone; if it is not open,
        // fstat fails and the File is forgotten, never closed.
        let out = unsafe { File::from_raw_fd(fd) };
        if out.metadata().is_err() {
            std::mem::forget(out);
            return Err(Failure::Config(format!(
                "BAQUP_CONTROL_FD={}: descriptor not open; run this agent under baqup-run",
                fd
            )));
        }
        Ok(Control { out, fd, last_progress: None })
    }

    fn send(&mut self, line: String) -> Result<(), Failure> {
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        self.out
            .write_all(&bytes)
            .map_err(|e| Failure::io(&format!("control channel (fd {})", self.fd), &e))
    }

    pub fn intent(
        &mut self,
        operation: &str,
        expected_seconds: f64,
        detail: &str,
    ) -> Result<(), Failure> {
        let line = Object::new()
            .str("type", "intent")
            .str("operation", operation)
            .float("expected_duration_seconds", expected_seconds)
            .str("detail", detail)
            .finish();
        self.send(line)
    }

    pub fn clear_intent(&mut self) -> Result<(), Failure> {
        self.send(Object::new().str("type", "intent").null("operation").finish())
    }

    /// A progress line, unless one went out less than 250 ms ago (`force` sends anyway).
    pub fn progress(&mut self, p: &Progress<'_>, force: bool) -> Result<(), Failure> {
        let now = Instant::now();
        if let Some(last) = self.last_progress {
            if !force && now.duration_since(last) < PROGRESS_EVERY {
                return Ok(());
            }
        }
        self.last_progress = Some(now);
        let percent = if p.total_bytes == 0 {
            if force {
                100.0
            } else {
                0.0
            }
        } else {
            (p.bytes as f64 * 100.0 / p.total_bytes as f64).min(100.0)
        };
        let mut line = Object::new()
            .str("type", "progress")
            .float("percent_complete", percent)
            .uint("bytes_processed", p.bytes)
            .uint("files_processed", p.files);
        if let Some(current) = p.current_file {
            line = line.str("current_file", current);
        }
        if p.bytes > 0 && p.total_bytes >= p.bytes {
            let rate = p.bytes as f64 / p.elapsed.as_secs_f64().max(0.001);
            line =
                line.float("estimated_remaining_seconds", (p.total_bytes - p.bytes) as f64 / rate);
        }
        self.send(line.finish())
    }

    pub fn event(
        &mut self,
        code: &str,
        severity: &str,
        message: &str,
        path: &str,
    ) -> Result<(), Failure> {
        let line = Object::new()
            .str("type", "event")
            .str("severity", severity)
            .str("code", code)
            .str("message", message)
            .str("path", path)
            .finish();
        self.send(line)
    }

    pub fn artifact(&mut self, filename: &str) -> Result<(), Failure> {
        self.send(Object::new().str("type", "artifact").str("filename", filename).finish())
    }

    pub fn metadata(&mut self, source_metadata: Object) -> Result<(), Failure> {
        self.send(
            Object::new()
                .str("type", "metadata")
                .object("source_metadata", source_metadata)
                .finish(),
        )
    }

    pub fn log(&mut self, level: &str, message: &str, context: Object) -> Result<(), Failure> {
        let line = Object::new()
            .str("type", "log")
            .str("level", level)
            .str("message", message)
            .object("context", context)
            .finish();
        self.send(line)
    }
}
