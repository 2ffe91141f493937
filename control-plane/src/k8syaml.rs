//! Kubernetes manifests as Kubernetes itself reads them, and written back so that they still
//! mean the same.
//!
//! `kubectl` and the API server read YAML with go-yaml v2 (YAML 1.1 scalars) and turn it into
//! JSON before anything else looks at it. So in a manifest `0755` is the number 493,
//! `yes`/`on` are `true`, `0x1F` is 31, `1_000` is 1000, and `"0755"` stays text. A reader
//! with YAML 1.2 rules (every Rust YAML crate) sees other values, and a writer that prints
//! `yes` or `1_000` unquoted changes them back. [`read_documents`] follows go-yaml v2's
//! resolution (anchors, aliases and `<<` merge keys included) into the JSON values Kubernetes
//! would see; [`write_documents`] quotes every string that any YAML 1.1 or 1.2 reader could
//! take for something else, and checks its own output by reading it back.

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};
use serde_json::{Map, Number, Value};

/// Why a text is not a manifest Kubernetes could read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ReadError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Deepest nesting accepted (Kubernetes objects are far shallower; this bounds recursion).
const MAX_DEPTH: usize = 256;

/// Every document of `text` as the JSON Kubernetes would receive; empty documents (and
/// documents that are only `null`) are left out, as `kubectl` leaves them out.
pub fn read_documents(text: &str) -> Result<Vec<Value>, ReadError> {
    let mut reader = Reader {
        parser: Parser::new_from_str(text),
        anchors: Vec::new(),
    };
    let mut documents = Vec::new();
    loop {
        let (event, span) = reader.next()?;
        match event {
            Event::StreamEnd => return Ok(documents),
            Event::DocumentStart(_) => {
                reader.anchors.clear();
                let (event, span) = reader.next()?;
                let value = if matches!(event, Event::DocumentEnd) {
                    Value::Null
                } else {
                    let value = reader.node(event, span, 0)?;
                    let (end, span) = reader.next()?;
                    if !matches!(end, Event::DocumentEnd) {
                        return Err(at(span, "expected the end of the document"));
                    }
                    value
                };
                if !value.is_null() {
                    documents.push(value);
                }
            }
            Event::StreamStart | Event::Nothing => {}
            _ => return Err(at(span, "expected a document")),
        }
    }
}

fn at(span: Span, message: impl Into<String>) -> ReadError {
    ReadError {
        line: span.start.line(),
        column: span.start.col() + 1,
        message: message.into(),
    }
}

struct Reader<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// Values by anchor id (ids start at 1; 0 means no anchor).
    anchors: Vec<Option<Value>>,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), ReadError> {
        match self.parser.next_event() {
            Some(Ok(pair)) => Ok(pair),
            Some(Err(e)) => Err(ReadError {
                line: e.marker().line(),
                column: e.marker().col() + 1,
                message: e.info().to_string(),
            }),
            None => Ok((Event::StreamEnd, Span::default())),
        }
    }

    fn remember(&mut self, anchor: usize, value: &Value) {
        if anchor == 0 {
            return;
        }
        if self.anchors.len() <= anchor {
            self.anchors.resize(anchor + 1, None);
        }
        self.anchors[anchor] = Some(value.clone());
    }

    /// The value of the node that starts with `event`.
    fn node(&mut self, event: Event<'a>, span: Span, depth: usize) -> Result<Value, ReadError> {
        if depth > MAX_DEPTH {
            return Err(at(span, "nested too deeply"));
        }
        Ok(match event {
            Event::Scalar(text, style, anchor, tag) => {
                let value = scalar(&text, style, tag.as_deref(), span)?;
                self.remember(anchor, &value);
                value
            }
            Event::Alias(id) => self
                .anchors
                .get(id)
                .cloned()
                .flatten()
                .ok_or_else(|| at(span, "an alias to an unknown anchor"))?,
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, span, depth + 1)?);
                }
                let value = Value::Array(items);
                self.remember(anchor, &value);
                value
            }
            Event::MappingStart(anchor, _) => {
                let value = Value::Object(self.mapping(depth)?);
                self.remember(anchor, &value);
                value
            }
            _ => return Err(at(span, "expected a value")),
        })
    }

    /// The entries of a mapping, after its `MappingStart`. As in go-yaml v2, entries apply in
    /// order (a repeated key keeps the last value) and a `<<` merge applies where it stands.
    fn mapping(&mut self, depth: usize) -> Result<Map<String, Value>, ReadError> {
        let mut map = Map::new();
        loop {
            let (event, span) = self.next()?;
            if matches!(event, Event::MappingEnd) {
                return Ok(map);
            }
            let merge = matches!(&event, Event::Scalar(text, ScalarStyle::Plain, _, tag)
                if text == "<<" && tag.as_deref().is_none_or(|t| is_core(t, "merge")));
            let key = self.node(event, span, depth + 1)?;
            let (event, value_span) = self.next()?;
            let value = self.node(event, value_span, depth + 1)?;
            if merge {
                merge_into(&mut map, value, value_span)?;
                continue;
            }
            map.insert(key_string(&key, span)?, value);
        }
    }
}

/// `<<: {...}` or `<<: [{...}, {...}]` (earlier mappings of a list take precedence).
fn merge_into(map: &mut Map<String, Value>, value: Value, span: Span) -> Result<(), ReadError> {
    let wrong = || at(span, "a `<<` merge needs a mapping or a list of mappings");
    match value {
        Value::Object(from) => {
            map.extend(from);
            Ok(())
        }
        Value::Array(list) => {
            for item in list.into_iter().rev() {
                match item {
                    Value::Object(from) => map.extend(from),
                    _ => return Err(wrong()),
                }
            }
            Ok(())
        }
        _ => Err(wrong()),
    }
}

/// JSON keys are strings: go-yaml's other key types become their text, as Kubernetes does.
fn key_string(key: &Value, span: Span) -> Result<String, ReadError> {
    match key {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Err(at(span, "a mapping key cannot be null")),
        Value::Array(_) | Value::Object(_) => {
            Err(at(span, "a mapping key must be a scalar in a manifest"))
        }
    }
}

fn is_core(tag: &Tag, suffix: &str) -> bool {
    tag.is_yaml_core_schema() && tag.suffix == suffix
}

/// A scalar as go-yaml v2 resolves it: quoted and block scalars are text, plain ones are
/// resolved, and an explicit core tag (`!!str`, `!!int`, ...) decides or is checked.
fn scalar(
    text: &str,
    style: ScalarStyle,
    tag: Option<&Tag>,
    span: Span,
) -> Result<Value, ReadError> {
    let plain = matches!(style, ScalarStyle::Plain);
    let Some(tag) = tag.filter(|t| t.is_yaml_core_schema()) else {
        // Untagged, or an application tag (`!foo`), which go-yaml reads as text.
        return if plain && tag.is_none() {
            resolve(text).map_err(|m| at(span, m))
        } else {
            Ok(Value::String(text.to_string()))
        };
    };
    let resolved = || resolve(text).map_err(|m| at(span, m));
    let mismatch = |what: &str| {
        at(
            span,
            format!("`{text}` cannot be read as {what} (tag !!{})", tag.suffix),
        )
    };
    match tag.suffix.as_str() {
        "str" | "timestamp" => Ok(Value::String(text.to_string())),
        "binary" => Err(at(
            span,
            "!!binary values are not supported by Kubernetes' YAML reading; give the base64 text without the tag",
        )),
        "null" => match resolved()? {
            Value::Null => Ok(Value::Null),
            _ => Err(mismatch("null")),
        },
        "bool" => match resolved()? {
            Value::Bool(b) => Ok(Value::Bool(b)),
            _ => Err(mismatch("a boolean")),
        },
        "int" => match resolved()? {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Value::Number(n)),
            _ => Err(mismatch("an integer")),
        },
        "float" => match resolved()? {
            Value::Number(n) => Ok(Value::Number(n)),
            _ => Err(mismatch("a number")),
        },
        _ => Ok(Value::String(text.to_string())),
    }
}

/// YAML 1.1 words go-yaml v2 resolves by table.
fn table(text: &str) -> Option<Value> {
    Some(match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            Value::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            Value::Bool(false)
        }
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        _ => return None,
    })
}

/// A plain scalar, resolved by go-yaml v2's rules; `Err` for values Kubernetes' JSON cannot
/// carry (infinities, NaN, integers wider than 64 bits).
pub fn resolve(text: &str) -> Result<Value, String> {
    if let Some(value) = table(text) {
        return Ok(value);
    }
    if matches!(
        text,
        ".nan"
            | ".NaN"
            | ".NAN"
            | ".inf"
            | ".Inf"
            | ".INF"
            | "+.inf"
            | "+.Inf"
            | "+.INF"
            | "-.inf"
            | "-.Inf"
            | "-.INF"
    ) {
        return Err(format!(
            "`{text}` is not a number JSON can carry, so Kubernetes refuses it; quote it if it is text"
        ));
    }
    let string = || Ok(Value::String(text.to_string()));
    match text.as_bytes().first() {
        Some(b'.') => match text.parse::<f64>() {
            Ok(f) if go_float_syntax(&text[1..], true) && f.is_finite() => Ok(number(f)),
            _ => string(),
        },
        Some(b'0'..=b'9' | b'+' | b'-') => {
            let plain: String = text.chars().filter(|&c| c != '_').collect();
            match go_parse_int(&plain) {
                Some(Int::Signed(i)) => return Ok(Value::Number(i.into())),
                Some(Int::Unsigned(u)) => return Ok(Value::Number(u.into())),
                Some(Int::TooWide) if !is_yaml_float(&plain) => {
                    return Err(format!(
                        "the integer `{text}` does not fit in 64 bits; quote it if it is text"
                    ));
                }
                Some(Int::TooWide) => {}
                None => {}
            }
            if is_yaml_float(&plain) {
                if let Ok(f) = plain.parse::<f64>() {
                    if f.is_finite() {
                        return Ok(number(f));
                    }
                }
            }
            string()
        }
        _ => string(),
    }
}

/// A float as Kubernetes' JSON carries it: a whole number is written as an integer.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 {
        if f >= -(2f64.powi(63)) && f < 2f64.powi(63) {
            #[allow(clippy::cast_possible_truncation)]
            return Value::Number((f as i64).into());
        }
        if f >= 0.0 && f < 2f64.powi(64) {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            return Value::Number((f as u64).into());
        }
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// go-yaml's float pattern: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn is_yaml_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    match s.strip_prefix('.') {
        Some(rest) => go_float_syntax(rest, true),
        None => go_float_syntax(s, false),
    }
}

/// The part of the float pattern after an optional sign; `after_dot` when a leading `.` was
/// taken (then at least one digit must follow it).
fn go_float_syntax(s: &str, after_dot: bool) -> bool {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let lead = digits(s);
    if lead == 0 {
        return false;
    }
    let mut rest = &s[lead..];
    if !after_dot {
        if let Some(fraction) = rest.strip_prefix('.') {
            rest = &fraction[digits(fraction)..];
        }
    }
    match rest.strip_prefix(['e', 'E']) {
        None => rest.is_empty(),
        Some(exp) => {
            let exp = exp.strip_prefix(['-', '+']).unwrap_or(exp);
            !exp.is_empty() && digits(exp) == exp.len()
        }
    }
}

enum Int {
    Signed(i64),
    Unsigned(u64),
    /// Well formed, but outside 64 bits.
    TooWide,
}

/// Go's `strconv.ParseInt(s, 0, 64)`, then `ParseUint`: an optional sign, then `0x`, `0o`,
/// `0b` or a leading `0` (octal) choose the base.
fn go_parse_int(s: &str) -> Option<Int> {
    let (negative, unsigned) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = unsigned.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits) = match lower.as_deref() {
        Some("0x") => (16, &unsigned[2..]),
        Some("0o") => (8, &unsigned[2..]),
        Some("0b") => (2, &unsigned[2..]),
        _ if unsigned.len() > 1 && unsigned.starts_with('0') => (8, &unsigned[1..]),
        _ => (10, unsigned),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = match u128::from_str_radix(digits, radix) {
        Ok(m) => m,
        Err(_) => return Some(Int::TooWide),
    };
    if negative {
        if magnitude <= 1u128 << 63 {
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            return Some(Int::Signed((magnitude as i128).wrapping_neg() as i64));
        }
        return Some(Int::TooWide);
    }
    if let Ok(i) = i64::try_from(magnitude) {
        return Some(Int::Signed(i));
    }
    match u64::try_from(magnitude) {
        // ParseUint takes no sign: `+18446744073709551615` is too wide for ParseInt only.
        Ok(u) if !s.starts_with('+') => Some(Int::Unsigned(u)),
        _ => Some(Int::TooWide),
    }
}

/// Writes documents as YAML, separated by `---`, and checks that reading the text back gives
/// the same values.
pub fn write_documents(documents: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        write_node(&mut out, document, 0, Context::Document);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    match read_documents(&out) {
        Ok(back) if back == documents => Ok(out),
        Ok(_) => Err("the YAML written does not read back as the same values".into()),
        Err(e) => Err(format!("the YAML written does not read back: {e}")),
    }
}

/// Where a node is written, which decides how it starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    /// At the top of a document.
    Document,
    /// After `key:` (a space or a newline follows).
    Value,
    /// After `- ` (a mapping or sequence continues on the same line).
    Item,
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_node(out: &mut String, value: &Value, depth: usize, context: Context) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if context == Context::Value {
                out.push('\n');
            }
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 || context == Context::Value {
                    indent(out, depth);
                }
                write_string(out, key, depth, true);
                out.push(':');
                write_node(out, item, depth + 2, Context::Value);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            // A list under a key starts at the key's own column, as kubectl writes it.
            let column = if context == Context::Value {
                out.push('\n');
                depth.saturating_sub(2)
            } else {
                depth
            };
            for (i, item) in items.iter().enumerate() {
                if i > 0 || context == Context::Value {
                    indent(out, column);
                }
                out.push_str("- ");
                write_node(out, item, column + 2, Context::Item);
            }
        }
        scalar => {
            if context == Context::Value {
                out.push(' ');
            }
            match scalar {
                Value::Object(_) => out.push_str("{}"),
                Value::Array(_) => out.push_str("[]"),
                Value::Null => out.push_str("null"),
                Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Value::Number(n) => write_number(out, n),
                Value::String(s) => write_string(out, s, depth, false),
            }
            out.push('\n');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    match n.as_f64() {
        Some(f) if !(n.is_i64() || n.is_u64()) => {
            // `{:?}` keeps a `.` or an exponent, so the number reads back as a float.
            out.push_str(&format!("{f:?}"));
        }
        _ => out.push_str(&n.to_string()),
    }
}

/// A string: plain when no reader could take it for anything else, a literal block for
/// multi-line text that a block carries exactly, double-quoted otherwise.
fn write_string(out: &mut String, s: &str, depth: usize, key: bool) {
    if plain_safe(s) {
        out.push_str(s);
    } else if !key && literal_safe(s) {
        let chomp = if !s.ends_with('\n') {
            "-"
        } else if s.ends_with("\n\n") {
            "+"
        } else {
            ""
        };
        out.push('|');
        out.push_str(chomp);
        let body = s.strip_suffix('\n').unwrap_or(s);
        for line in body.split('\n') {
            out.push('\n');
            if !line.is_empty() {
                indent(out, depth);
                out.push_str(line);
            }
        }
    } else {
        double_quoted(out, s);
    }
}

fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if needs_escape(c) => {
                let n = u32::from(c);
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else {
                    out.push_str(&format!("\\u{n:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Characters YAML cannot carry as they are (controls, YAML 1.1's extra line breaks, BOM).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
        )
}

/// Text every YAML reader, 1.1 or 1.2, reads back as this same string without quotes.
fn plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    // Anything that starts like a number, an indicator or a document marker is quoted, which
    // also covers YAML 1.1's sexagesimal (`1:20`) and 1.2's `0o17`.
    if first.is_ascii_digit()
        || matches!(
            first,
            '-' | '+'
                | '.'
                | '?'
                | ':'
                | ','
                | '['
                | ']'
                | '{'
                | '}'
                | '#'
                | '&'
                | '*'
                | '!'
                | '|'
                | '>'
                | '\''
                | '"'
                | '%'
                | '@'
                | '`'
                | '~'
                | '='
                | '<'
                | ' '
        )
    {
        // `--flag=value` and `-x` read as text everywhere; a lone `-` or `- x` does not.
        let short = first == '-'
            && s.len() > 1
            && !s[1..].starts_with(|c: char| c.is_ascii_digit() || matches!(c, ' ' | '.' | '-'));
        let long = s.starts_with("--") && s.len() > 2 && !s.starts_with("---");
        let flag = short || long;
        if !flag {
            return false;
        }
    }
    if s.ends_with([' ', ':']) || s.contains(": ") || s.contains(" #") || s.contains("  ") {
        return false;
    }
    if !s.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '-' | '_'
                    | '.'
                    | '/'
                    | '='
                    | '+'
                    | '@'
                    | '~'
                    | '%'
                    | '^'
                    | '$'
                    | '('
                    | ')'
                    | ':'
                    | ','
                    | ' '
                    | ';'
                    | '*'
                    | '&'
                    | '!'
                    | '?'
                    | '<'
                    | '>'
                    | '#'
            )
            || (!c.is_ascii() && !needs_escape(c) && !c.is_whitespace())
    }) {
        return false;
    }
    // Neither YAML 1.1 (as Kubernetes reads it) nor 1.2's core schema may see a non-string.
    matches!(resolve(s), Ok(Value::String(_))) && !core_schema_non_string(s) && s != "<<"
}

/// YAML 1.2 core schema: null, booleans, integers (`0o`, `0x`) and floats.
fn core_schema_non_string(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "null" | "~" | "true" | "false" | ".inf" | "-.inf" | "+.inf" | ".nan"
    ) || is_yaml_float(s)
        || go_parse_int(s).is_some()
}

/// Multi-line text a literal block (`|`) carries exactly: nothing to escape, no line that a
/// block would shorten (leading spaces on the first line, whitespace-only lines), no `\r`.
fn literal_safe(s: &str) -> bool {
    s.contains('\n')
        && !s.starts_with([' ', '\t', '\n'])
        && !s.chars().any(|c| c != '\n' && c != '\t' && needs_escape(c))
        && s.trim_end_matches('\n')
            .split('\n')
            .all(|line| line.is_empty() || !line.trim().is_empty())
        && !s
            .trim_end_matches('\n')
            .split('\n')
            .any(|l| l.ends_with([' ', '\t']))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_one(text: &str) -> Value {
        let mut docs = read_documents(text).expect("reads");
        assert_eq!(docs.len(), 1, "{text}");
        docs.remove(0)
    }

    #[test]
    fn scalars_resolve_as_kubernetes_reads_them() {
        let v = read_one(
            "octal: 0755\nhex: 0x1F\nunderscore: 1_000\nbig: 12345678901234567890\nneg: -0755\n\
             a_yes: yes\na_on: on\na_off: Off\na_n: N\nquoted: '0755'\ndouble: \"yes\"\nfloat: 1.5\n\
             exp: 1e3\nwhole: 2.0\nnothing:\ntilde: ~\nstamp: 2001-12-14\nnotoctal: 08\n\
             zero_o: 0o17\nbin: 0b101\ndotted: 1.2.3\nlarge_float: 1e400\nstr_tag: !!str 0755\n\
             float_tag: !!float 3\nplus: +12\nversion: v1.0\n",
        );
        assert_eq!(
            v,
            json!({
                "octal": 493, "hex": 31, "underscore": 1000, "big": 12345678901234567890u64,
                "neg": -493, "a_yes": true, "a_on": true, "a_off": false, "a_n": false,
                "quoted": "0755", "double": "yes", "float": 1.5, "exp": 1000, "whole": 2,
                "nothing": null, "tilde": null, "stamp": "2001-12-14", "notoctal": 8,
                "zero_o": 15, "bin": 5, "dotted": "1.2.3", "large_float": "1e400",
                "str_tag": "0755", "float_tag": 3, "plus": 12, "version": "v1.0"
            })
        );
    }

    #[test]
    fn keys_become_strings_as_kubernetes_makes_them() {
        let v = read_one("yes: 1\n8080: 2\n0x10: 3\nplain: 4\n\"0755\": 5\n");
        assert_eq!(
            v,
            json!({"true": 1, "8080": 2, "16": 3, "plain": 4, "0755": 5})
        );
    }

    #[test]
    fn anchors_aliases_merges_and_blocks() {
        let v = read_one(
            "base: &base {a: 1, b: 2}\n\
             copy: *base\n\
             merged:\n  <<: *base\n  b: 3\n\
             list_merge:\n  c: 0\n  <<: [{c: 1, d: 1}, {d: 2, e: 2}]\n\
             script: |\n  #!/bin/sh\n  echo hi\n\
             folded: >-\n  one\n  two\n\
             keep: |+\n  x\n\n\
             end: true\n",
        );
        assert_eq!(v["copy"], json!({"a": 1, "b": 2}));
        assert_eq!(v["merged"], json!({"a": 1, "b": 3}));
        // go-yaml applies a merge where it stands: it overrides the `c` before it, and the
        // first mapping of the list wins over the second.
        assert_eq!(v["list_merge"], json!({"c": 1, "d": 1, "e": 2}));
        assert_eq!(v["script"], "#!/bin/sh\necho hi\n");
        assert_eq!(v["folded"], "one two");
        assert_eq!(v["keep"], "x\n\n");
    }

    #[test]
    fn empty_documents_are_left_out_and_errors_have_positions() {
        let docs =
            read_documents("---\n---\nkind: A\n---\n# only a comment\n---\nnull\n").expect("reads");
        assert_eq!(docs, vec![json!({"kind": "A"})]);
        let err = read_documents("a: [1, 2\n").expect_err("unclosed");
        assert!(err.line >= 1, "{err}");
        let err = read_documents("a: .inf\n").expect_err("infinity");
        assert!(err.to_string().contains("line 1, column 4"), "{err}");
        let err = read_documents("a: 0x1FFFFFFFFFFFFFFFFFFFF\n").expect_err("too wide");
        assert!(err.to_string().contains("64 bits"), "{err}");
    }

    #[test]
    fn every_tricky_string_is_written_so_it_reads_back_the_same() {
        let strings = [
            "0755",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "Y",
            "NO",
            "True",
            "null",
            "~",
            "",
            "1_000",
            "0x1F",
            "0o17",
            "0b101",
            ".5",
            "1e3",
            "1.0",
            "+1",
            "-1",
            ".inf",
            "-.inf",
            ".nan",
            "2001-12-14",
            "12:30",
            "1:20",
            "a: b",
            "- x",
            "-",
            "--",
            "---",
            "...",
            "--config=/etc/x",
            "-v",
            "#comment",
            "a #b",
            "a#b",
            "<<",
            "=",
            "*alias",
            "&anchor",
            "!tag",
            "|",
            ">",
            "'q'",
            "\"dq\"",
            "%x",
            "@x",
            "`x`",
            "trail ",
            " lead",
            "tab\there",
            "multi\nline\n",
            "multi\nline",
            "keep\n\n",
            "  indented\nblock\n",
            "a\r\nb",
            "nul\u{0}byte",
            "bell\u{7}",
            "line\u{2028}sep",
            "bom\u{feff}",
            "héllo wörld",
            "http://example.com:8080/path?q=1#frag",
            "key=value,other=x",
            "[a]",
            "{a}",
            "a, b",
            "C:\\path",
            "spaces  double",
            "ends:",
            "日本語",
            "\u{85}nel",
            "\n",
            "\n\n",
            "trailing space \nline",
            "   \nws-line",
            "x\n   \ny",
        ];
        let mut doc = Map::new();
        for (i, s) in strings.iter().enumerate() {
            doc.insert(format!("k{i}"), Value::String((*s).to_string()));
            doc.insert((*s).to_string(), json!(i));
        }
        doc.insert("list".into(), json!(strings.as_slice()));
        doc.insert(
            "nested".into(),
            json!([[1, 2], [], {}, {"a": [{"b": null}]}, 1.5, -2, 1e300, u64::MAX, i64::MIN]),
        );
        let docs = vec![Value::Object(doc), json!({"second": "doc"})];
        let text = write_documents(&docs).expect("round trip");
        assert!(text.contains("k0: \"0755\""), "{text}");
        assert!(text.contains("k1: \"yes\""), "{text}");
        assert!(text.contains("--config=/etc/x\n"), "{text}");
        assert!(
            text.contains("k40: \"=\""),
            "YAML 1.1's value indicator is quoted: {text}"
        );
    }
}
