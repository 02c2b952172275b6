//! QMP's wire format: one JSON object per line.
//!
//! From QEMU (`docs/interop/qmp-spec.rst`): a greeting `{"QMP": {...}}`,
//! answers `{"return": V, "id": I}` or `{"error": {"class": C, "desc": D},
//! "id": I}`, and asynchronous events `{"event": NAME, "data": {...},
//! "timestamp": {"seconds": S, "microseconds": U}}`. Commands are
//! `{"execute": NAME, "arguments": {...}, "id": I}`.

use serde_json::{Map, Value};

use super::QmpError;

/// One message from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The greeting QEMU sends on connect (its `QMP` member).
    Greeting(Value),
    /// A command's result.
    Return {
        /// The command's `id`, echoed.
        id: Option<Value>,
        /// The result.
        value: Value,
    },
    /// A command's failure.
    Error {
        /// The command's `id`, echoed.
        id: Option<Value>,
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// An asynchronous QMP event (`STOP`, `RESUME`, `MIGRATION`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name.
    pub name: String,
    /// Its `data` member (`Null` if absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch, if given.
    pub timestamp_us: Option<u64>,
}

/// Parses one line from QEMU.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let bad = |what: &str| QmpError::Protocol {
        detail: format!("{what}: {}", line.chars().take(120).collect::<String>()),
    };
    let value: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(bad("not a JSON object"));
    };
    let id = obj.remove("id");
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_owned);
        return Ok(Message::Error {
            id,
            class: field("class").ok_or_else(|| bad("error without a class"))?,
            desc: field("desc").unwrap_or_default(),
        });
    }
    if let Some(name) = obj.remove("event") {
        let name = name
            .as_str()
            .ok_or_else(|| bad("event name not a string"))?;
        return Ok(Message::Event(Event {
            name: name.to_owned(),
            data: obj.remove("data").unwrap_or(Value::Null),
            timestamp_us: obj.get("timestamp").and_then(timestamp_us),
        }));
    }
    Err(bad("neither greeting, return, error nor event"))
}

fn timestamp_us(t: &Value) -> Option<u64> {
    let s = t.get("seconds")?.as_u64()?;
    let us = t.get("microseconds")?.as_u64()?;
    s.checked_mul(1_000_000)?.checked_add(us)
}

/// The line (with its newline) that runs `execute` with `arguments`
/// (omitted when `None`), tagged with `id`.
pub fn command_line(execute: &str, arguments: Option<&Value>, id: u64) -> String {
    let mut obj = Map::new();
    obj.insert("execute".into(), Value::from(execute));
    if let Some(a) = arguments {
        obj.insert("arguments".into(), a.clone());
    }
    obj.insert("id".into(), Value::from(id));
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn greeting() {
        let m = parse_message(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        let Message::Greeting(g) = m else {
            panic!("{m:?}")
        };
        assert_eq!(g["version"]["qemu"]["major"], 7);
    }

    #[test]
    fn return_with_id() {
        let m = parse_message(r#"{"return": {"status": "running", "running": true}, "id": 3}"#)
            .unwrap();
        assert_eq!(
            m,
            Message::Return {
                id: Some(json!(3)),
                value: json!({"status": "running", "running": true}),
            }
        );
        assert_eq!(
            parse_message(r#"{"return": {}}"#).unwrap(),
            Message::Return {
                id: None,
                value: json!({})
            }
        );
    }

    #[test]
    fn error() {
        let m = parse_message(
            r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Error {
                id: Some(json!(7)),
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into(),
            }
        );
    }

    #[test]
    fn event() {
        let m = parse_message(
            r#"{"timestamp": {"seconds": 1765000000, "microseconds": 250}, "event": "MIGRATION", "data": {"status": "completed"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Event(Event {
                name: "MIGRATION".into(),
                data: json!({"status": "completed"}),
                timestamp_us: Some(1_765_000_000_000_250),
            })
        );
        let Message::Event(e) = parse_message(r#"{"event": "STOP"}"#).unwrap() else {
            panic!()
        };
        assert_eq!((e.data, e.timestamp_us), (Value::Null, None));
    }

    #[test]
    fn malformed() {
        for line in [
            "",
            "not json",
            "[1, 2]",
            r#"{"id": 1}"#,
            r#"{"error": {"desc": "no class"}}"#,
            r#"{"event": 5}"#,
            r#"{"return": {"truncated"#,
        ] {
            let e = parse_message(line).unwrap_err();
            assert!(matches!(e, QmpError::Protocol { .. }), "{line}: {e:?}");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            command_line("stop", None, 1),
            "{\"execute\":\"stop\",\"id\":1}\n"
        );
        let args = json!({"uri": "unix:/tmp/m.sock"});
        let line = command_line("migrate", Some(&args), 9);
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back,
            json!({"execute": "migrate", "arguments": args, "id": 9})
        );
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
    }
}
