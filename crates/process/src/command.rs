//! [`Command`]: what to run in the guest, and how.

use vmkit_proto::agent::{SpawnProcessRequest, TtySize};

/// A process to spawn in the guest: a builder, like `std::process::Command`.
///
/// ```
/// let cmd = vmkit_process::Command::new(["sh", "-c", "echo $GREETING"])
///     .env("GREETING", "hello")
///     .cwd("/tmp")
///     .tag("exec-1");
/// assert_eq!(cmd.argv()[0], "sh");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: Option<u32>,
    gid: Option<u32>,
    tty: Option<(u16, u16)>,
    tag: String,
}

impl Command {
    /// The program and its arguments; the program is looked up in the guest's PATH
    /// when it has no '/'.
    pub fn new<I, S>(argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: String::new(),
            uid: None,
            gid: None,
            tty: None,
            tag: String::new(),
        }
    }

    /// Sets an environment variable (added to the guest's minimal PATH and HOME, which it
    /// may replace).
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Command {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// The working directory: an absolute path in the guest (default `/`).
    #[must_use]
    pub fn cwd(mut self, dir: &str) -> Command {
        dir.clone_into(&mut self.cwd);
        self
    }

    /// Runs as this user and group.
    #[must_use]
    pub fn user(mut self, uid: u32, gid: u32) -> Command {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }

    /// Runs on a new TTY of `rows` × `cols`: its stdio is then one [`crate::Tty`]
    /// stream, and it can be resized.
    #[must_use]
    pub fn tty(mut self, rows: u16, cols: u16) -> Command {
        self.tty = Some((rows, cols));
        self
    }

    /// A name of the caller's for the process, listed back (at most 256 bytes).
    #[must_use]
    pub fn tag(mut self, tag: &str) -> Command {
        tag.clone_into(&mut self.tag);
        self
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// Whether it runs on a TTY.
    pub fn has_tty(&self) -> bool {
        self.tty.is_some()
    }

    /// The request the agent gets.
    pub(crate) fn request(&self) -> SpawnProcessRequest {
        let mut req = SpawnProcessRequest::new();
        req.argv.clone_from(&self.argv);
        req.env.clone_from(&self.env);
        req.cwd.clone_from(&self.cwd);
        req.uid = self.uid;
        req.gid = self.gid;
        req.tty = self
            .tty
            .map(|(rows, cols)| {
                let mut size = TtySize::new();
                size.rows = u32::from(rows);
                size.cols = u32::from(cols);
                size
            })
            .into();
        req.tag.clone_from(&self.tag);
        req
    }
}
