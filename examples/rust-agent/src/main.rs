//! agent-rust: `$BAQUP_SOURCE_PATH` as one tar artifact, `source.tar`, in the work dir.
//!
//!     BAQUP_SOURCE_PATH=/data baqup-run -- agent-rust
//!
//! baqup-run makes it a compliant agent (heartbeats, the bus, checksums, the manifest,
//! the exit-code taxonomy); this program does the work and reports it over the control
//! channel: an intent for the archiving step, progress, events for what it leaves out,
//! the artifact declaration, source metadata and a log record. SIGTERM stops it at the
//! next 64 KiB with the partial archive removed. Standard library only.

mod control;
mod failure;
mod json;
mod signals;
mod tar;
mod walk;

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use control::{Control, Progress};
use failure::Failure;
use json::Object;
use tar::{Kind, Member, TarWriter};
use walk::{Entry, Item};

const ARTIFACT: &str = "source.tar";
const CHUNK: usize = 64 * 1024;
/// For the intent's estimate when no rate limit is set (a modest disk).
const ASSUMED_RATE: f64 = 100.0 * 1024.0 * 1024.0;
/// O_NONBLOCK (the same on every Linux architecture): opening a file that was swapped
/// for a FIFO after the walk saw it must not hang the job.
const O_NONBLOCK: i32 = 0o4000;

struct Config {
    source: PathBuf,
    work_dir: PathBuf,
    /// Bytes a second read from the source; 0 = as fast as the disk goes.
    rate_limit: u64,
    /// (device, inode) of the staging, job and work dirs: never walked into.
    fenced: Vec<(u64, u64)>,
}

fn required(name: &str) -> Result<String, Failure> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(Failure::Config(format!("{} is not set", name))),
    }
}

/// `BAQUP_SOURCE_RATE_LIMIT`: bytes a second, with K, M, G or T as powers of 1024.
fn parse_rate(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&text[..at], c.to_ascii_uppercase()),
        _ => (text, ' '),
    };
    let scale: u64 = match unit {
        ' ' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

impl Config {
    fn from_env() -> Result<Config, Failure> {
        let source = PathBuf::from(required("BAQUP_SOURCE_PATH")?);
        let work_dir = PathBuf::from(required("BAQUP_WORK_DIR").map_err(|_| {
            Failure::Config(String::from(
                "BAQUP_WORK_DIR is not set; run this agent under baqup-run",
            ))
        })?);
        let rate_text =
            std::env::var("BAQUP_SOURCE_RATE_LIMIT").unwrap_or_else(|_| String::from("0"));
        let rate_limit = parse_rate(&rate_text).ok_or_else(|| {
            Failure::Config(format!(
                "BAQUP_SOURCE_RATE_LIMIT={}: expected bytes a second, such as 512K or 20M (0 = no limit)",
                rate_text
            ))
        })?;
        let policy = std::env::var("BAQUP_SOURCE_FOLLOW_SYMLINKS")
            .unwrap_or_else(|_| String::from("shallow"));
        if policy != "shallow" {
            return Err(Failure::Config(format!(
                "BAQUP_SOURCE_FOLLOW_SYMLINKS={}: this agent only implements shallow",
                policy
            )));
        }
        match fs::metadata(&source) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Failure::Data(format!(
                    "source {} is not a directory",
                    source.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Failure::Data(format!("source {} does not exist", source.display())))
            }
            Err(e) => return Err(Failure::io(&format!("source {}", source.display()), &e)),
        }
        let fenced = ["BAQUP_STAGING_DIR", "BAQUP_JOB_DIR", "BAQUP_WORK_DIR"]
            .iter()
            .filter_map(std::env::var_os)
            .filter_map(|dir| fs::metadata(dir).ok())
            .map(|meta| (meta.dev(), meta.ino()))
            .collect();
        Ok(Config { source, work_dir, rate_limit, fenced })
    }
}

fn check_signals() -> Result<(), Failure> {
    match signals::received() {
        Some(signum) => Err(Failure::Terminated(signum)),
        None => Ok(()),
    }
}

/// Holds the reading pace under the rate limit; sleeps in short slices so a SIGTERM
/// is seen within 50 ms.
struct Pace {
    started: Instant,
    limit: u64,
}

impl Pace {
    fn wait(&self, bytes: u64) -> Result<(), Failure> {
        if self.limit == 0 {
            return check_signals();
        }
        let due = Duration::from_secs_f64(bytes as f64 / self.limit as f64);
        loop {
            check_signals()?;
            let elapsed = self.started.elapsed();
            if elapsed >= due {
                return Ok(());
            }
            std::thread::sleep((due - elapsed).min(Duration::from_millis(50)));
        }
    }
}

#[derive(Default)]
struct Totals {
    files: u64,
    bytes: u64,
    directories: u64,
    symlinks: u64,
    skipped: u64,
}

struct Job<'a> {
    config: &'a Config,
    output: &'a Path,
    control: Control,
    tar: TarWriter<BufWriter<File>>,
    pace: Pace,
    done: Totals,
    total_bytes: u64,
    buffer: Vec<u8>,
}

fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl<'a> Job<'a> {
    fn progress(&mut self, current: &Path, force: bool) -> Result<(), Failure> {
        let current = display(current);
        let p = Progress {
            bytes: self.done.bytes,
            files: self.done.files,
            total_bytes: self.total_bytes,
            current_file: Some(&current),
            elapsed: self.pace.started.elapsed(),
        };
        self.control.progress(&p, force)
    }

    fn event(
        &mut self,
        code: &str,
        severity: &str,
        message: &str,
        path: &Path,
    ) -> Result<(), Failure> {
        self.control.event(code, severity, message, &display(path))
    }

    fn member(
        &mut self,
        relative: &Path,
        kind: Kind,
        size: u64,
        meta: &fs::Metadata,
        link: &[u8],
    ) -> Result<(), Failure> {
        let member = Member {
            name: relative.as_os_str().as_bytes(),
            kind,
            size,
            mode: meta.mode(),
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            mtime: meta.mtime(),
            link,
        };
        self.tar.header(&member).map_err(|e| write_failure(self.output, &e))
    }

    fn add(&mut self, entry: Entry) -> Result<(), Failure> {
        check_signals()?;
        let Entry { relative, meta, item } = entry;
        match (item, meta) {
            (Item::Skipped { code, severity, message }, _) => {
                self.done.skipped += 1;
                self.event(code, severity, &message, &relative)
            }
            (Item::Directory, Some(meta)) => {
                self.done.directories += 1;
                self.member(&relative, Kind::Directory, 0, &meta, b"")
            }
            (Item::Symlink(target), Some(meta)) => {
                self.done.symlinks += 1;
                self.member(&relative, Kind::Symlink, 0, &meta, target.as_bytes())
            }
            (Item::File, Some(meta)) => self.add_file(&relative, &meta),
            (_, None) => Ok(()), // the walk gives every kept entry its metadata
        }
    }

    fn add_file(&mut self, relative: &Path, seen: &fs::Metadata) -> Result<(), Failure> {
        let path = self.config.source.join(relative);
        let mut file = match OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(&path) {
            Ok(file) => file,
            Err(e) => {
                self.done.skipped += 1;
                let (code, message) = walk::describe(&e, "not readable");
                return self.event(code, "warn", &message, relative);
            }
        };
        let meta = match file.metadata() {
            Ok(meta) if meta.is_file() && meta.ino() == seen.ino() && meta.dev() == seen.dev() => {
                meta
            }
            _ => {
                self.done.skipped += 1;
                return self.event(
                    "FILE_CHANGED",
                    "warn",
                    "replaced during the backup; left out",
                    relative,
                );
            }
        };
        self.member(relative, Kind::File, meta.len(), &meta, b"")?;
        while self.tar.remaining() > 0 {
            let want = (self.tar.remaining() as usize).min(CHUNK);
            let got = match file.read(&mut self.buffer[..want]) {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::io(&format!("reading {}", path.display()), &e)),
            };
            if got == 0 {
                let missing = self.tar.remaining();
                self.fill_zeros(missing)?;
                let message =
                    format!("shrank while it was read; {} missing bytes stored as zeros", missing);
                self.event("FILE_CHANGED", "warn", &message, relative)?;
                break;
            }
            self.tar.data(&self.buffer[..got]).map_err(|e| write_failure(self.output, &e))?;
            self.done.bytes += got as u64;
            self.progress(relative, false)?;
            self.pace.wait(self.done.bytes)?;
        }
        let mut probe = [0u8; 1];
        if let Ok(1) = file.read(&mut probe) {
            let message = format!("grew while it was read; its first {} bytes stored", meta.len());
            self.event("FILE_CHANGED", "warn", &message, relative)?;
        }
        self.done.files += 1;
        self.progress(relative, false)
    }

    fn fill_zeros(&mut self, mut missing: u64) -> Result<(), Failure> {
        let zeros = vec![0u8; CHUNK];
        while missing > 0 {
            let n = missing.min(CHUNK as u64) as usize;
            self.tar.data(&zeros[..n]).map_err(|e| write_failure(self.output, &e))?;
            missing -= n as u64;
        }
        Ok(())
    }
}

/// The first walk: what there is to archive, for the percentages and the estimate.
fn survey(config: &Config) -> Result<Totals, Failure> {
    let mut totals = Totals::default();
    walk::walk(&config.source, &config.fenced, &mut |entry| {
        check_signals()?;
        if let (Item::File, Some(meta)) = (&entry.item, &entry.meta) {
            totals.files += 1;
            totals.bytes += meta.len();
        }
        Ok(())
    })?;
    Ok(totals)
}

fn run(config: &Config, control: Control, output: &Path) -> Result<Totals, Failure> {
    let survey = survey(config)?;
    let file =
        OpenOptions::new().write(true).create_new(true).open(output).map_err(|e| {
            Failure::CantCreate(format!("cannot create {}: {}", output.display(), e))
        })?;
    let rate = if config.rate_limit > 0 { config.rate_limit as f64 } else { ASSUMED_RATE };
    let mut job = Job {
        config,
        output,
        control,
        tar: TarWriter::new(BufWriter::with_capacity(4 * CHUNK, file)),
        pace: Pace { started: Instant::now(), limit: config.rate_limit },
        done: Totals::default(),
        total_bytes: survey.bytes,
        buffer: vec![0u8; CHUNK],
    };
    let source = display(&config.source);
    job.control.intent("archive", (survey.bytes as f64 / rate).ceil().max(1.0), &source)?;
    walk::walk(&config.source, &config.fenced, &mut |entry| job.add(entry))?;
    let Job { mut control, tar, done, pace, .. } = job;
    let file = tar
        .finish()
        .and_then(|out| out.into_inner().map_err(|e| e.into_error()))
        .and_then(|file| file.sync_all().map(|_| file))
        .map_err(|e| write_failure(output, &e))?;
    drop(file);
    control.clear_intent()?;
    let p = Progress {
        bytes: done.bytes,
        files: done.files,
        total_bytes: done.bytes,
        current_file: None,
        elapsed: pace.started.elapsed(),
    };
    control.progress(&p, true)?;
    control.artifact(ARTIFACT)?;
    let d = &done;
    let metadata = Object::new()
        .str("type", "tar")
        .str("path", &source)
        .uint("files_included", d.files)
        .uint("bytes_included", d.bytes)
        .uint("directories", d.directories)
        .uint("symlinks", d.symlinks)
        .uint("entries_skipped", d.skipped);
    control.metadata(metadata)?;
    let context =
        Object::new().uint("files", d.files).uint("bytes", d.bytes).uint("skipped", d.skipped);
    control.log("info", "archive written", context)?;
    Ok(done)
}

fn write_failure(output: &Path, error: &std::io::Error) -> Failure {
    Failure::io(&format!("writing {}", output.display()), error)
}

fn main() {
    if !signals::install() {
        eprintln!("agent-rust: cannot install the SIGTERM handler; a stop will not be clean");
    }
    let outcome = Config::from_env().and_then(|config| {
        let control = Control::from_env()?;
        let output = config.work_dir.join(ARTIFACT);
        let result = run(&config, control, &output);
        if result.is_err() {
            // a partial archive must never be mistaken for a backup
            let _ = fs::remove_file(&output);
        }
        result
    });
    match outcome {
        Ok(_) => {}
        Err(failure) => {
            eprintln!("agent-rust: {}", failure);
            std::process::exit(failure.exit_code());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_take_powers_of_1024() {
        assert_eq!(parse_rate("0"), Some(0));
        assert_eq!(parse_rate("512K"), Some(512 * 1024));
        assert_eq!(parse_rate("2m"), Some(2 << 20));
        assert_eq!(parse_rate("1.5M"), None);
        assert_eq!(parse_rate("M"), None);
        assert_eq!(parse_rate("10X"), None);
        assert_eq!(parse_rate("99999999999T"), None);
    }
}
