//! Why the agent stops, and the exit code of the contract's taxonomy for each reason.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Failure {
    /// A variable is missing or malformed (64).
    Config(String),
    /// The source is not what a backup can be taken of (65).
    Data(String),
    /// The artifact cannot be created (73).
    CantCreate(String),
    /// Reading the source or writing the artifact failed (74).
    Io(String),
    /// SIGTERM or SIGINT: the job was asked to stop (1; baqup-run reports ABORTED).
    Terminated(i32),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Config(_) => 64,
            Failure::Data(_) => 65,
            Failure::CantCreate(_) => 73,
            Failure::Io(_) => 74,
            Failure::Terminated(_) => 1,
        }
    }

    pub fn io(what: &str, error: &io::Error) -> Failure {
        Failure::Io(format!("{}: {}", what, error))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Config(m) | Failure::Data(m) | Failure::CantCreate(m) | Failure::Io(m) => {
                f.write_str(m)
            }
            Failure::Terminated(signum) => write!(
                f,
                "stopped by {}; the partial archive was removed",
                if *signum == crate::signals::SIGINT { "SIGINT" } else { "SIGTERM" }
            ),
        }
    }
}
