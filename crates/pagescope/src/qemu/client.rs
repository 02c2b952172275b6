//! A QMP client over a unix socket: negotiation, commands, events.
//!
//! One client per socket: QEMU serves one QMP connection per `-qmp`
//! option at a time. Commands are answered in order; events that arrive
//! while a command waits are kept and handed out by [`Qmp::take_events`]
//! and [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind as IoKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::QmpError;
use super::message::{Event, Message, command_line, parse_message};

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not complete yet (a read timed out mid-line).
    partial: Vec<u8>,
    events: VecDeque<Event>,
    next_id: u64,
    greeting: Value,
    /// The time a command may take unless the caller says otherwise.
    pub timeout: Duration,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads QEMU's greeting and
    /// leaves capabilities negotiation mode (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(QmpError::Io)?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match qmp.read_message(deadline, timeout, "the QMP greeting")? {
                Message::Greeting(g) => {
                    qmp.greeting = g;
                    break;
                }
                Message::Event(e) => qmp.events.push_back(e),
                other => {
                    return Err(QmpError::Protocol {
                        detail: format!("expected the greeting, got {other:?}"),
                    });
                }
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's greeting (`version`, `capabilities`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with `arguments` and returns its result, within
    /// [`Qmp::timeout`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, self.timeout)
    }

    /// Runs `command` and returns its result, within `timeout`.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = command_line(command, arguments.as_ref(), id);
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| match e.kind() {
                IoKind::BrokenPipe | IoKind::ConnectionReset => QmpError::Closed,
                _ => QmpError::Io(e),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, timeout, command)? {
                Message::Event(e) => self.events.push_back(e),
                Message::Return { id: got, value } if answers(got.as_ref(), id) => {
                    return Ok(value);
                }
                Message::Error {
                    id: got,
                    class,
                    desc,
                } if answers(got.as_ref(), id) => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class,
                        desc,
                    });
                }
                // An answer to an earlier command that timed out.
                Message::Return { .. } | Message::Error { .. } | Message::Greeting(_) => {}
            }
        }
    }

    /// The events received so far, oldest first (and forgets them).
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for an event named `name` (one already
    /// received counts) and returns it; other events are kept.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(i).expect("index just found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, timeout, name)? {
                Message::Event(e) if e.name == name => return Ok(e),
                Message::Event(e) => self.events.push_back(e),
                _ => {}
            }
        }
    }

    /// Reads the next message, waiting until `deadline` at most (`timeout`
    /// is what the caller allowed, for the error).
    fn read_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Message, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    waited: timeout,
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(QmpError::Io)?;
            // read_until keeps what it consumed in `partial` on a timeout.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    return parse_message(text.trim_end());
                }
                Ok(_) => return Err(QmpError::Closed),
                Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {}
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) if e.kind() == IoKind::ConnectionReset => return Err(QmpError::Closed),
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }
}

fn answers(got: Option<&Value>, id: u64) -> bool {
    got.and_then(Value::as_u64) == Some(id)
}
