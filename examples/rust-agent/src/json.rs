//! Just enough JSON to write control-channel lines: one object, built field by field.
//!
//! Strings are escaped per RFC 8259 (control characters as `\u00XX`), so any path,
//! however odd, yields a valid line; numbers are integers or finite floats only.

use std::fmt::Write;

/// A JSON object under construction; `finish` closes it.
pub struct Object {
    buf: String,
    empty: bool,
}

impl Object {
    pub fn new() -> Object {
        Object { buf: String::from("{"), empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        escape_into(&mut self.buf, key);
        self.buf.push(':');
    }

    pub fn str(mut self, key: &str, value: &str) -> Object {
        self.key(key);
        escape_into(&mut self.buf, value);
        self
    }

    pub fn uint(mut self, key: &str, value: u64) -> Object {
        self.key(key);
        let _ = write!(self.buf, "{}", value);
        self
    }

    /// A finite float, with at most one decimal (what a percentage or an estimate needs).
    pub fn float(mut self, key: &str, value: f64) -> Object {
        self.key(key);
        let value = if value.is_finite() { value } else { 0.0 };
        let _ = write!(self.buf, "{}", (value * 10.0).round() / 10.0);
        self
    }

    pub fn null(mut self, key: &str) -> Object {
        self.key(key);
        self.buf.push_str("null");
        self
    }

    pub fn object(mut self, key: &str, value: Object) -> Object {
        self.key(key);
        self.buf.push_str(&value.finish());
        self
    }

    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

fn escape_into(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::Object;

    #[test]
    fn escapes_what_json_requires() {
        let line =
            Object::new().str("p", "a\"b\\c\n\u{1}é").uint("n", 7).float("f", 12.34).finish();
        assert_eq!(line, "{\"p\":\"a\\\"b\\\\c\\n\\u0001é\",\"n\":7,\"f\":12.3}");
    }

    #[test]
    fn a_non_finite_float_is_never_written() {
        assert_eq!(Object::new().float("f", f64::NAN).finish(), "{\"f\":0}");
    }
}
