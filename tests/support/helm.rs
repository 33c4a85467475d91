//! Renders a Helm chart the way `helm install` would, for the part of
//! Helm's template language the Keyway chart uses: no registry reachable
//! from CI or the development machines ships the `helm` binary, and the
//! chart must be tested against a real apiserver all the same.
//!
//! Faithful to Go's text/template and Helm for what it supports, and loud
//! about the rest: an unknown function, action or construct is an error,
//! never silently skipped.
//!
//! Supported:
//! - actions `{{ }}` with `{{-`/`-}}` trimming (all of " \t\r\n", like Go),
//!   comments `{{/* */}}`, `if`/`else if`/`else`/`end`, `with`/`else`,
//!   `range` (lists, and maps in sorted key order; `$i, $v :=`; `else`),
//!   `define`/`template`, variables (`$x :=`, `$x =`, `$`), pipelines,
//!   parenthesised pipelines with field chains, string/raw string/number/
//!   bool/nil literals;
//! - Go's truthiness (false, 0, "", nil, empty list/map are false), its
//!   missing-key behaviour under Helm's `missingkey=zero` (a missing value
//!   prints as nothing; a field of a missing value is a "nil pointer" error),
//!   its argument type checks (`nindent 4 .Values.x` with a number is an
//!   error) and its comparison errors (`eq` of a number from values, a Go
//!   float64, and a literal `1`, a Go int, fails as it does in Helm);
//! - the functions `and or not eq ne gt` (Go builtins), `default quote
//!   toYaml nindent indent trunc trimSuffix printf required fail int`
//!   (Sprig/Helm) and `include`;
//! - `.Values` (values.yaml deep-merged with overrides: maps merge, anything
//!   else replaces, `null` deletes a default; every number is a Go float64,
//!   as Helm decodes values through JSON), `.Release.{Name,Namespace,
//!   Service,IsInstall,IsUpgrade,Revision}`, `.Chart.*` (a Go struct: an
//!   unknown field is an error), `.Template.{Name,BasePath}`;
//! - `toYaml` as Helm's (sigs.k8s.io/yaml: through JSON, then yaml.v2 with
//!   its key order, quoting rules, literal blocks for multi-line strings and
//!   folding of long strings at 80 columns; no trailing newline);
//! - Helm's post-processing: "<no value>" is removed from the output,
//!   partials (`_*`) are not rendered, files that render to whitespace are
//!   dropped, NOTES.txt is rendered (its errors count) but not returned,
//!   and the files in `crds/` come first, verbatim.
//!
//! Not supported (an error where it matters): `.Capabilities`, `.Files`,
//! subcharts, `block`, `break`/`continue`, char constants, `range` over an
//! integer, printf flags/widths and verbs other than `%s %v %d %q %t %%`,
//! `toYaml` of `.Chart` or of a map key that is multi-line or longer than
//! 128 bytes. Values files are parsed as YAML 1.2 (serde_yaml) where Helm
//! uses YAML 1.1: the YAML 1.1 booleans (`yes`, `on`, ...) are refused
//! rather than guessed at.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::rc::Rc;

/// One file Helm would send to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// As Helm names it: `<chart>/crds/<file>` or `<chart>/templates/<file>`.
    pub template: String,
    pub manifest: String,
}

/// Renders `chart_dir` for release `release_name` in `namespace`, with
/// `overrides` merged over the chart's values.yaml (what `-f` does): the
/// CRDs in `crds/` first (Helm installs them before anything else), then
/// every file in `templates/` that is not a partial and not empty, by name.
pub fn render(
    chart_dir: &Path,
    release_name: &str,
    namespace: &str,
    overrides: &serde_yaml::Value,
) -> Result<Vec<Rendered>, String> {
    let chart_yaml = read_to_string(&chart_dir.join("Chart.yaml"))?;
    let metadata: serde_yaml::Value =
        serde_yaml::from_str(&chart_yaml).map_err(|e| format!("Chart.yaml: {e}"))?;
    let chart = chart_struct(&metadata)?;
    let chart_name = match &chart {
        Value::Struct(_, fields) => match fields.get("Name") {
            Some(Value::Str(name)) if !name.is_empty() => name.clone(),
            _ => return Err("Chart.yaml: `name` is required".into()),
        },
        _ => unreachable!("chart_struct returns a struct"),
    };

    let values_path = chart_dir.join("values.yaml");
    let defaults = if values_path.exists() {
        let text = read_to_string(&values_path)?;
        let parsed: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| format!("values.yaml: {e}"))?;
        values_map(&parsed, "values.yaml")?
    } else {
        BTreeMap::new()
    };
    let overrides = values_map(overrides, "overrides")?;
    let values = coalesce(defaults, overrides);

    let mut files = Vec::new();
    let templates_dir = chart_dir.join("templates");
    if templates_dir.exists() {
        collect_files(&templates_dir, &format!("{chart_name}/templates"), &mut files)?;
    }
    let set = TemplateSet::parse(&files)?;

    let release = Value::Map(BTreeMap::from([
        ("Name".to_string(), Value::Str(release_name.to_string())),
        ("Namespace".to_string(), Value::Str(namespace.to_string())),
        ("IsInstall".to_string(), Value::Bool(true)),
        ("IsUpgrade".to_string(), Value::Bool(false)),
        ("Revision".to_string(), Value::Int(1)),
        ("Service".to_string(), Value::Str("Helm".to_string())),
    ]));

    let mut out = Vec::new();
    let crds_dir = chart_dir.join("crds");
    if crds_dir.exists() {
        let mut crds = Vec::new();
        collect_files(&crds_dir, &format!("{chart_name}/crds"), &mut crds)?;
        for (name, text) in crds {
            if [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext)) {
                out.push(Rendered {
                    template: name,
                    manifest: text,
                });
            }
        }
    }

    let mut names: Vec<&String> = files.iter().map(|(name, _)| name).collect();
    names.sort();
    for name in names {
        let base = name.rsplit('/').next().unwrap_or(name);
        if base.starts_with('_') {
            continue;
        }
        let base_path = format!("{chart_name}/templates");
        let top = Value::Map(BTreeMap::from([
            ("Values".to_string(), Value::Map(values.clone())),
            ("Release".to_string(), release.clone()),
            ("Chart".to_string(), chart.clone()),
            (
                "Template".to_string(),
                Value::Map(BTreeMap::from([
                    ("Name".to_string(), Value::Str(name.clone())),
                    ("BasePath".to_string(), Value::Str(base_path)),
                ])),
            ),
        ]));
        let text = set.execute(name, top)?.replace("<no value>", "");
        if name.ends_with("NOTES.txt") || text.trim().is_empty() {
            continue;
        }
        out.push(Rendered {
            template: name.clone(),
            manifest: text,
        });
    }
    Ok(out)
}

/// Every object of the rendered manifests, one per YAML document; empty
/// documents (a template's leading `---`, a disabled block) are dropped.
/// Panics, naming the template, on a document that is not YAML.
pub fn objects(rendered: &[Rendered]) -> Vec<serde_yaml::Value> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for r in rendered {
        for doc in serde_yaml::Deserializer::from_str(&r.manifest) {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}\n{}", r.template, r.manifest));
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    out
}

fn read_to_string(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Files under `dir`, recursively, named `prefix/<relative path>`.
fn collect_files(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        if path.is_dir() {
            collect_files(&path, &name, out)?;
        } else {
            out.push((name, read_to_string(&path)?));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Values

/// A template value, typed the way Go sees Helm's data.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// nil (a missing key, a YAML null).
    Nil,
    Bool(bool),
    /// A Go `int`: number literals in templates, the result of `int`.
    Int(i64),
    /// A Go `float64`: every number that comes from values.
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
    /// A Go struct (`.Chart` is a `*chart.Metadata`): its fields by Go name.
    Struct(&'static str, BTreeMap<String, Value>),
}

impl Value {
    fn go_type(&self) -> &'static str {
        match self {
            Value::Nil => "<nil>",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float64",
            Value::Str(_) => "string",
            Value::List(_) => "[]interface {}",
            Value::Map(_) => "map[string]interface {}",
            Value::Struct(name, _) => name,
        }
    }

    /// Go template truthiness (and Sprig's `empty`, negated).
    fn truth(&self) -> bool {
        match self {
            Value::Nil => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Map(m) => !m.is_empty(),
            Value::Struct(..) => true,
        }
    }
}

const YAML11_BOOLEANS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF",
];

/// A values document as Helm decodes it (through JSON: numbers are float64).
fn from_yaml(v: &serde_yaml::Value, at: &str) -> Result<Value, String> {
    Ok(match v {
        serde_yaml::Value::Null => Value::Nil,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            let f = n.as_f64().ok_or_else(|| format!("{at}: {n} is not a number"))?;
            if !f.is_finite() {
                return Err(format!("{at}: {n} cannot be represented in JSON, as Helm needs"));
            }
            Value::Float(f)
        }
        serde_yaml::Value::String(s) => {
            if YAML11_BOOLEANS.contains(&s.as_str()) {
                return Err(format!(
                    "{at}: {s:?} is a boolean in YAML 1.1 (Helm) but a string in YAML 1.2 (this renderer); \
                     write true/false, or use another word"
                ));
            }
            Value::Str(s.clone())
        }
        serde_yaml::Value::Sequence(items) => Value::List(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| from_yaml(item, &format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(map) => {
            let mut out = BTreeMap::new();
            for (k, v) in map {
                let key = match k {
                    serde_yaml::Value::String(s) if YAML11_BOOLEANS.contains(&s.as_str()) => {
                        return Err(format!(
                            "{at}: the key {s:?} is a boolean in YAML 1.1 (Helm reads it as \"true\" or \"false\") \
                             but a string in YAML 1.2 (this renderer); use another key"
                        ));
                    }
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    other => return Err(format!("{at}: unsupported map key {other:?}")),
                };
                let value = from_yaml(v, &format!("{at}.{key}"))?;
                out.insert(key, value);
            }
            Value::Map(out)
        }
        serde_yaml::Value::Tagged(t) => return Err(format!("{at}: YAML tags are not supported ({})", t.tag)),
    })
}

fn values_map(v: &serde_yaml::Value, at: &str) -> Result<BTreeMap<String, Value>, String> {
    match from_yaml(v, at)? {
        Value::Nil => Ok(BTreeMap::new()),
        Value::Map(m) => Ok(m),
        other => Err(format!("{at}: values must be a map, not {}", other.go_type())),
    }
}

/// Helm's coalescing of user values over chart defaults: maps merge key by
/// key, anything else in `user` wins, and a user `null` deletes the default.
fn coalesce(defaults: BTreeMap<String, Value>, mut user: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    for (key, default) in defaults {
        match user.get_mut(&key) {
            None => {
                user.insert(key, default);
            }
            Some(Value::Nil) => {
                user.remove(&key);
            }
            Some(Value::Map(mine)) => {
                if let Value::Map(theirs) = default {
                    *mine = coalesce(theirs, std::mem::take(mine));
                }
            }
            Some(_) => {}
        }
    }
    user
}

/// `.Chart`: a `*chart.Metadata`, fields by their Go names.
fn chart_struct(metadata: &serde_yaml::Value) -> Result<Value, String> {
    const FIELDS: &[(&str, &str, bool)] = &[
        ("name", "Name", false),
        ("home", "Home", false),
        ("sources", "Sources", true),
        ("version", "Version", false),
        ("description", "Description", false),
        ("keywords", "Keywords", true),
        ("maintainers", "Maintainers", true),
        ("icon", "Icon", false),
        ("apiVersion", "APIVersion", false),
        ("condition", "Condition", false),
        ("tags", "Tags", false),
        ("appVersion", "AppVersion", false),
        ("deprecated", "Deprecated", false),
        ("annotations", "Annotations", false),
        ("kubeVersion", "KubeVersion", false),
        ("dependencies", "Dependencies", true),
        ("type", "Type", false),
    ];
    let mut fields = BTreeMap::new();
    for (yaml_name, go_name, list) in FIELDS {
        let value = match metadata.get(*yaml_name) {
            None | Some(serde_yaml::Value::Null) => match (*go_name, list) {
                ("Deprecated", _) => Value::Bool(false),
                ("Annotations", _) => Value::Nil,
                (_, true) => Value::List(Vec::new()),
                _ => Value::Str(String::new()),
            },
            Some(serde_yaml::Value::String(s)) => Value::Str(s.clone()),
            Some(serde_yaml::Value::Number(n)) => Value::Str(n.to_string()),
            Some(serde_yaml::Value::Bool(b)) => Value::Bool(*b),
            Some(other) => from_yaml(other, &format!("Chart.yaml {yaml_name}"))?,
        };
        fields.insert(go_name.to_string(), value);
    }
    Ok(Value::Struct("*chart.Metadata", fields))
}

// ---------------------------------------------------------------------------
// Lexer (Go's text/template lexer, for the items this renderer parses)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    If,
    Else,
    End,
    Range,
    With,
    Define,
    Template,
    Block,
    Break,
    Continue,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Text(String),
    Open,
    Close,
    Space,
    Dot,
    /// `.name` (without the dot).
    Field(String),
    /// `$name` (with the `$`).
    Var(String),
    Ident(String),
    Str(String),
    Num(String),
    Bool(bool),
    Nil,
    Pipe,
    LParen,
    RParen,
    Declare,
    Assign,
    Comma,
    Kw(Kw),
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    pos: usize,
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn is_alnum(c: char) -> bool {
    c == '_' || c.is_alphabetic() || c.is_numeric()
}

/// `" -}}"` (trim) or `"}}"` at the start of `s`: (trim, length).
fn at_right_delim(s: &str) -> Option<(bool, usize)> {
    let b = s.as_bytes();
    if b.len() >= 4 && is_space(b[0] as char) && b[1] == b'-' && &b[2..4] == b"}}" {
        return Some((true, 4));
    }
    s.starts_with("}}").then_some((false, 2))
}

fn left_trim_len(s: &str) -> usize {
    s.len() - s.trim_start_matches(is_space).len()
}

fn char_at(s: &str, i: usize) -> Option<char> {
    s.get(i..).and_then(|rest| rest.chars().next())
}

fn at_terminator(s: &str, i: usize) -> bool {
    match char_at(s, i) {
        None => true,
        Some(c) if is_space(c) => true,
        Some('.' | ',' | '|' | ':' | ')' | '(') => true,
        Some(_) => s[i..].starts_with("}}"),
    }
}

fn lex(src: &str) -> Result<Vec<Token>, (usize, String)> {
    let mut toks = Vec::new();
    let mut p = 0;
    loop {
        let Some(off) = src[p..].find("{{") else {
            if p < src.len() {
                toks.push(Token {
                    tok: Tok::Text(src[p..].to_string()),
                    pos: p,
                });
            }
            break;
        };
        let open = p + off;
        let after = open + 2;
        let rest = &src.as_bytes()[after..];
        let trim_left = rest.len() >= 2 && rest[0] == b'-' && is_space(rest[1] as char);
        let mut text = &src[p..open];
        if trim_left {
            text = text.trim_end_matches(is_space);
        }
        if !text.is_empty() {
            toks.push(Token {
                tok: Tok::Text(text.to_string()),
                pos: p,
            });
        }
        let mut q = after + if trim_left { 2 } else { 0 };
        if src[q..].starts_with("/*") {
            let body = q + 2;
            let end = src[body..]
                .find("*/")
                .map(|i| body + i + 2)
                .ok_or((open, "unclosed comment".to_string()))?;
            let (trim_right, len) = at_right_delim(&src[end..])
                .ok_or((open, "comment ends before closing delimiter".to_string()))?;
            p = end + len;
            if trim_right {
                p += left_trim_len(&src[p..]);
            }
            continue;
        }
        toks.push(Token {
            tok: Tok::Open,
            pos: open,
        });
        let mut depth = 0usize;
        loop {
            if let Some((trim_right, len)) = at_right_delim(&src[q..]) {
                if depth > 0 {
                    return Err((q, "unclosed left paren".into()));
                }
                toks.push(Token {
                    tok: Tok::Close,
                    pos: q,
                });
                q += len;
                if trim_right {
                    q += left_trim_len(&src[q..]);
                }
                break;
            }
            let start = q;
            let Some(c) = char_at(src, q) else {
                return Err((open, "unclosed action".into()));
            };
            let tok = match c {
                c if is_space(c) => {
                    while char_at(src, q).is_some_and(is_space) && at_right_delim(&src[q..]).is_none() {
                        q += 1;
                    }
                    if q == start {
                        continue;
                    }
                    Tok::Space
                }
                '=' => {
                    q += 1;
                    Tok::Assign
                }
                ':' => {
                    if char_at(src, q + 1) != Some('=') {
                        return Err((q, "expected :=".into()));
                    }
                    q += 2;
                    Tok::Declare
                }
                '|' => {
                    q += 1;
                    Tok::Pipe
                }
                ',' => {
                    q += 1;
                    Tok::Comma
                }
                '(' => {
                    q += 1;
                    depth += 1;
                    Tok::LParen
                }
                ')' => {
                    if depth == 0 {
                        return Err((q, "unexpected right paren".into()));
                    }
                    q += 1;
                    depth -= 1;
                    Tok::RParen
                }
                '"' => {
                    let mut i = q + 1;
                    loop {
                        match char_at(src, i) {
                            None | Some('\n') => return Err((q, "unterminated quoted string".into())),
                            Some('\\') => {
                                i += 1;
                                i += char_at(src, i).map_or(0, char::len_utf8);
                            }
                            Some('"') => break,
                            Some(c) => i += c.len_utf8(),
                        }
                    }
                    let s = unquote(&src[q + 1..i]).map_err(|e| (q, e))?;
                    q = i + 1;
                    Tok::Str(s)
                }
                '`' => {
                    let end = src[q + 1..]
                        .find('`')
                        .ok_or((q, "unterminated raw quoted string".to_string()))?;
                    let s = src[q + 1..q + 1 + end].replace('\r', "");
                    q = q + 1 + end + 1;
                    Tok::Str(s)
                }
                '\'' => return Err((q, "character constants are not supported by this renderer".into())),
                '$' => {
                    q += 1;
                    while char_at(src, q).is_some_and(is_alnum) {
                        q += c_len(src, q);
                    }
                    if !at_terminator(src, q) {
                        return Err((q, format!("bad character {:?}", char_at(src, q).unwrap_or(' '))));
                    }
                    Tok::Var(src[start..q].to_string())
                }
                '.' if !char_at(src, q + 1).is_some_and(|c| c.is_ascii_digit()) => {
                    q += 1;
                    while char_at(src, q).is_some_and(is_alnum) {
                        q += c_len(src, q);
                    }
                    if !at_terminator(src, q) {
                        return Err((q, format!("bad character {:?}", char_at(src, q).unwrap_or(' '))));
                    }
                    if q == start + 1 {
                        Tok::Dot
                    } else {
                        Tok::Field(src[start + 1..q].to_string())
                    }
                }
                '.' | '+' | '-' | '0'..='9' => {
                    q = scan_number(src, q);
                    if char_at(src, q).is_some_and(is_alnum) {
                        return Err((start, format!("bad number syntax: {:?}", &src[start..q])));
                    }
                    Tok::Num(src[start..q].to_string())
                }
                c if is_alnum(c) => {
                    while char_at(src, q).is_some_and(is_alnum) {
                        q += c_len(src, q);
                    }
                    if !at_terminator(src, q) {
                        return Err((q, format!("bad character {:?}", char_at(src, q).unwrap_or(' '))));
                    }
                    match &src[start..q] {
                        "if" => Tok::Kw(Kw::If),
                        "else" => Tok::Kw(Kw::Else),
                        "end" => Tok::Kw(Kw::End),
                        "range" => Tok::Kw(Kw::Range),
                        "with" => Tok::Kw(Kw::With),
                        "define" => Tok::Kw(Kw::Define),
                        "template" => Tok::Kw(Kw::Template),
                        "block" => Tok::Kw(Kw::Block),
                        "break" => Tok::Kw(Kw::Break),
                        "continue" => Tok::Kw(Kw::Continue),
                        "true" => Tok::Bool(true),
                        "false" => Tok::Bool(false),
                        "nil" => Tok::Nil,
                        word => Tok::Ident(word.to_string()),
                    }
                }
                c => return Err((q, format!("unrecognized character in action: {c:?}"))),
            };
            toks.push(Token { tok, pos: start });
        }
        p = q;
    }
    toks.push(Token {
        tok: Tok::Eof,
        pos: src.len(),
    });
    Ok(toks)
}

fn c_len(s: &str, i: usize) -> usize {
    char_at(s, i).map_or(1, char::len_utf8)
}

/// Go's `scanNumber`: where the number starting at `i` ends.
fn scan_number(src: &str, mut i: usize) -> usize {
    let b = src.as_bytes();
    let accept = |i: &mut usize, set: &str| {
        if *i < b.len() && set.as_bytes().contains(&b[*i]) {
            *i += 1;
            true
        } else {
            false
        }
    };
    let accept_run = |i: &mut usize, set: &str| {
        while *i < b.len() && set.as_bytes().contains(&b[*i]) {
            *i += 1;
        }
    };
    accept(&mut i, "+-");
    let mut digits = "0123456789_";
    if accept(&mut i, "0") {
        if accept(&mut i, "xX") {
            digits = "0123456789abcdefABCDEF_";
        } else if accept(&mut i, "oO") {
            digits = "01234567_";
        } else if accept(&mut i, "bB") {
            digits = "01_";
        }
    }
    accept_run(&mut i, digits);
    if accept(&mut i, ".") {
        accept_run(&mut i, digits);
    }
    if digits.len() == 11 && accept(&mut i, "eE") {
        accept(&mut i, "+-");
        accept_run(&mut i, "0123456789_");
    }
    i
}

/// Go's `strconv.Unquote` for the body of a double-quoted string.
fn unquote(body: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let e = chars.next().ok_or("bad escape at end of string")?;
        let mut hex = |n: usize| -> Result<u32, String> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .ok_or_else(|| format!("bad escape \\{e}{digits}"))
        };
        let ch = match e {
            'a' => '\x07',
            'b' => '\x08',
            'f' => '\x0c',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\x0b',
            '\\' => '\\',
            '"' => '"',
            'x' => char::from_u32(hex(2)?).ok_or("bad \\x escape")?,
            'u' => char::from_u32(hex(4)?).ok_or("bad \\u escape")?,
            'U' => char::from_u32(hex(8)?).ok_or("bad \\U escape")?,
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    let d = chars
                        .next()
                        .and_then(|c| c.to_digit(8))
                        .ok_or("bad octal escape")?;
                    v = v * 8 + d;
                }
                char::from_u32(v).ok_or("bad octal escape")?
            }
            other => return Err(format!("unknown escape sequence \\{other}")),
        };
        out.push(ch);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Parse tree

/// Where a node starts, for error messages (`file:line:col`, col from 0 as Go).
#[derive(Debug, Clone)]
struct Loc {
    file: Rc<str>,
    line: usize,
    col: usize,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

#[derive(Debug, Clone)]
struct Number {
    text: String,
    int: Option<i64>,
    float: Option<f64>,
}

#[derive(Debug, Clone)]
enum Arg {
    Dot,
    /// `.A.B` from dot.
    Field(Vec<String>),
    /// `$x.A.B`.
    Var(String, Vec<String>),
    /// A function name.
    Func(String),
    /// `(pipeline).A.B` or `func.A` (a chain on a term).
    Chain(Box<Arg>, Vec<String>),
    Pipe(Box<Pipe>),
    Str(String),
    Num(Number),
    Bool(bool),
    Nil,
}

#[derive(Debug, Clone)]
struct Cmd {
    args: Vec<Arg>,
    loc: Loc,
    text: String,
}

#[derive(Debug, Clone)]
struct Pipe {
    decl: Vec<String>,
    assign: bool,
    cmds: Vec<Cmd>,
    loc: Loc,
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(Pipe),
    If(Pipe, Vec<Node>, Vec<Node>),
    With(Pipe, Vec<Node>, Vec<Node>),
    Range(Pipe, Vec<Node>, Vec<Node>),
    Template(String, Option<Pipe>, Loc),
}

/// What ended a list: `{{end}}`, `{{else}}` (with whether `if` follows) or EOF.
enum ListEnd {
    End,
    Else,
    Eof,
}

/// The functions this renderer implements; any other name is a parse error.
const FUNCTIONS: &[&str] = &[
    "and",
    "or",
    "not",
    "eq",
    "ne",
    "gt",
    "default",
    "quote",
    "toYaml",
    "nindent",
    "indent",
    "trunc",
    "trimSuffix",
    "upper",
    "replace",
    "printf",
    "required",
    "fail",
    "include",
    "int",
];

struct Parser<'a> {
    toks: Vec<Token>,
    i: usize,
    src: &'a str,
    file: Rc<str>,
    vars: Vec<String>,
    defines: Vec<(String, Vec<Node>)>,
}

impl<'a> Parser<'a> {
    fn new(file: &str, src: &'a str) -> Result<Self, String> {
        let file: Rc<str> = Rc::from(file);
        let toks = lex(src).map_err(|(pos, msg)| {
            let line = 1 + src[..pos.min(src.len())].matches('\n').count();
            format!("parse error at ({file}:{line}): {msg}")
        })?;
        Ok(Self {
            toks,
            i: 0,
            src,
            file,
            vars: vec!["$".into()],
            defines: Vec::new(),
        })
    }

    fn loc(&self, pos: usize) -> Loc {
        let before = &self.src[..pos.min(self.src.len())];
        let line = 1 + before.matches('\n').count();
        let col = before.rfind('\n').map_or(pos, |nl| pos - nl - 1);
        Loc {
            file: self.file.clone(),
            line,
            col,
        }
    }

    fn error(&self, pos: usize, msg: impl std::fmt::Display) -> String {
        let loc = self.loc(pos);
        format!("parse error at ({}:{}): {msg}", loc.file, loc.line)
    }

    fn peek(&self) -> &Token {
        &self.toks[self.i.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.i < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn next_non_space(&mut self) -> Token {
        loop {
            let t = self.next();
            if t.tok != Tok::Space {
                return t;
            }
        }
    }

    fn peek_non_space(&mut self) -> Token {
        while self.peek().tok == Tok::Space {
            self.i += 1;
        }
        self.peek().clone()
    }

    fn expect_close(&mut self, context: &str) -> Result<(), String> {
        let t = self.next_non_space();
        if t.tok != Tok::Close {
            return Err(self.error(t.pos, format!("unexpected {:?} in {context}", t.tok)));
        }
        Ok(())
    }

    /// The whole file: text and actions, with `define`s taken out.
    fn parse_file(&mut self) -> Result<Vec<Node>, String> {
        let mut root = Vec::new();
        loop {
            let t = self.peek().clone();
            match t.tok {
                Tok::Eof => return Ok(root),
                Tok::Open => {
                    let save = self.i;
                    self.next();
                    if self.peek_non_space().tok == Tok::Kw(Kw::Define) {
                        self.next();
                        self.parse_define()?;
                        continue;
                    }
                    self.i = save;
                }
                _ => {}
            }
            match self.text_or_action()? {
                Ok(node) => root.push(node),
                Err((ListEnd::Eof, _)) => return Ok(root),
                Err((_, pos)) => return Err(self.error(pos, "unexpected {{end}} or {{else}}")),
            }
        }
    }

    fn parse_define(&mut self) -> Result<(), String> {
        let t = self.next_non_space();
        let Tok::Str(name) = t.tok else {
            return Err(self.error(t.pos, "define clause: expected a template name string"));
        };
        self.expect_close("define clause")?;
        let outer = std::mem::replace(&mut self.vars, vec!["$".into()]);
        let (list, end) = self.item_list()?;
        self.vars = outer;
        match end {
            ListEnd::End => {}
            _ => return Err(self.error(t.pos, "unexpected {{else}} or EOF in define clause")),
        }
        self.defines.push((name, list));
        Ok(())
    }

    /// One node, or what ended the list (with its position).
    #[allow(clippy::type_complexity, reason = "a private parser step")]
    fn text_or_action(&mut self) -> Result<Result<Node, (ListEnd, usize)>, String> {
        let t = self.next_non_space();
        match t.tok {
            Tok::Text(s) => Ok(Ok(Node::Text(s))),
            Tok::Eof => Ok(Err((ListEnd::Eof, t.pos))),
            Tok::Open => self.action(),
            other => Err(self.error(t.pos, format!("unexpected {other:?}"))),
        }
    }

    #[allow(clippy::type_complexity, reason = "a private parser step")]
    fn action(&mut self) -> Result<Result<Node, (ListEnd, usize)>, String> {
        let t = self.peek_non_space();
        match t.tok {
            Tok::Kw(Kw::End) => {
                self.next();
                self.expect_close("end")?;
                Ok(Err((ListEnd::End, t.pos)))
            }
            Tok::Kw(Kw::Else) => {
                self.next();
                // `{{else if ...}}` is `{{else}}{{if ...}}`: leave the `if` for the caller.
                if self.peek_non_space().tok != Tok::Kw(Kw::If) {
                    self.expect_close("else")?;
                }
                Ok(Err((ListEnd::Else, t.pos)))
            }
            Tok::Kw(Kw::If) => {
                self.next();
                self.control("if").map(Ok)
            }
            Tok::Kw(Kw::With) => {
                self.next();
                self.control("with").map(Ok)
            }
            Tok::Kw(Kw::Range) => {
                self.next();
                self.control("range").map(Ok)
            }
            Tok::Kw(Kw::Template) => {
                self.next();
                let name_tok = self.next_non_space();
                let Tok::Str(name) = name_tok.tok else {
                    return Err(self.error(name_tok.pos, "template clause: expected a template name string"));
                };
                let pipe = if self.peek_non_space().tok == Tok::Close {
                    self.next();
                    None
                } else {
                    Some(self.pipeline("template clause", false)?)
                };
                Ok(Ok(Node::Template(name, pipe, self.loc(name_tok.pos))))
            }
            Tok::Kw(kw @ (Kw::Block | Kw::Break | Kw::Continue | Kw::Define)) => Err(self.error(
                t.pos,
                format!("{{{{{kw:?}}}}} is not supported by this renderer").to_lowercase(),
            )),
            _ => Ok(Ok(Node::Action(self.pipeline("command", false)?))),
        }
    }

    fn item_list(&mut self) -> Result<(Vec<Node>, ListEnd), String> {
        let mut list = Vec::new();
        loop {
            match self.text_or_action()? {
                Ok(node) => list.push(node),
                Err((ListEnd::Eof, pos)) => return Err(self.error(pos, "unexpected EOF")),
                Err((end, _)) => return Ok((list, end)),
            }
        }
    }

    fn control(&mut self, context: &str) -> Result<Node, String> {
        let mark = self.vars.len();
        let pipe = self.pipeline(context, context == "range")?;
        let (list, end) = self.item_list()?;
        let mut else_list = Vec::new();
        if let ListEnd::Else = end {
            if context == "if" && self.peek_non_space().tok == Tok::Kw(Kw::If) {
                self.next();
                else_list.push(self.control("if")?);
            } else {
                let (l, end) = self.item_list()?;
                if !matches!(end, ListEnd::End) {
                    return Err(
                        self.error(pipe_pos(&self.toks, self.i), format!("expected end in {context}"))
                    );
                }
                else_list = l;
            }
        }
        self.vars.truncate(mark);
        Ok(match context {
            "if" => Node::If(pipe, list, else_list),
            "with" => Node::With(pipe, list, else_list),
            _ => Node::Range(pipe, list, else_list),
        })
    }

    /// A pipeline up to `}}` (consumed), with its declarations.
    fn pipeline(&mut self, context: &str, range: bool) -> Result<Pipe, String> {
        self.pipeline_until(context, range, &Tok::Close)
    }

    fn pipeline_until(&mut self, context: &str, range: bool, end: &Tok) -> Result<Pipe, String> {
        let start = self.peek_non_space();
        let mut pipe = Pipe {
            decl: Vec::new(),
            assign: false,
            cmds: Vec::new(),
            loc: self.loc(start.pos),
        };
        // Declarations: `$x :=`, `$x =`, `$i, $v :=` (range only).
        if let Tok::Var(first) = start.tok.clone() {
            let save = self.i;
            self.next();
            let t = self.next_non_space();
            match t.tok {
                Tok::Declare | Tok::Assign => {
                    pipe.assign = t.tok == Tok::Assign;
                    if pipe.assign {
                        self.use_var(&first, start.pos)?;
                    } else {
                        self.vars.push(first.clone());
                    }
                    pipe.decl.push(first);
                }
                Tok::Comma if range => {
                    let second = self.next_non_space();
                    let Tok::Var(second_name) = second.tok else {
                        return Err(self.error(second.pos, "range can only initialize variables"));
                    };
                    let t = self.next_non_space();
                    if t.tok != Tok::Declare {
                        return Err(self.error(t.pos, "range variables must be declared with := here"));
                    }
                    self.vars.push(first.clone());
                    self.vars.push(second_name.clone());
                    pipe.decl.push(first);
                    pipe.decl.push(second_name);
                }
                _ => self.i = save,
            }
        }
        loop {
            let t = self.next_non_space();
            if &t.tok == end {
                if pipe.cmds.is_empty() {
                    return Err(self.error(t.pos, format!("missing value for {context}")));
                }
                for (i, cmd) in pipe.cmds.iter().enumerate().skip(1) {
                    if matches!(
                        cmd.args[0],
                        Arg::Bool(_) | Arg::Dot | Arg::Nil | Arg::Num(_) | Arg::Str(_)
                    ) {
                        return Err(self.error(
                            t.pos,
                            format!("non executable command in pipeline stage {}", i + 1),
                        ));
                    }
                }
                return Ok(pipe);
            }
            match t.tok {
                Tok::Bool(_)
                | Tok::Dot
                | Tok::Field(_)
                | Tok::Ident(_)
                | Tok::Num(_)
                | Tok::Nil
                | Tok::Str(_)
                | Tok::Var(_)
                | Tok::LParen => {
                    self.i -= 1;
                    let cmd = self.command(end)?;
                    pipe.cmds.push(cmd);
                }
                other => return Err(self.error(t.pos, format!("unexpected {other:?} in {context}"))),
            }
        }
    }

    fn command(&mut self, end: &Tok) -> Result<Cmd, String> {
        let start = self.peek_non_space().pos;
        let mut args = Vec::new();
        let stop;
        loop {
            self.peek_non_space();
            if let Some(operand) = self.operand()? {
                args.push(operand);
            }
            let t = self.next();
            match t.tok {
                Tok::Space => continue,
                ref tok if tok == end => {
                    self.i -= 1;
                    stop = t.pos;
                }
                Tok::Pipe => stop = t.pos,
                other => return Err(self.error(t.pos, format!("unexpected {other:?} in operand"))),
            }
            break;
        }
        if args.is_empty() {
            return Err(self.error(start, "empty command"));
        }
        Ok(Cmd {
            args,
            loc: self.loc(start),
            text: self.src[start..stop.max(start)].trim().to_string(),
        })
    }

    fn operand(&mut self) -> Result<Option<Arg>, String> {
        let Some(term) = self.term()? else {
            return Ok(None);
        };
        let mut fields = Vec::new();
        while let Tok::Field(f) = &self.peek().tok {
            fields.push(f.clone());
            self.next();
        }
        if fields.is_empty() {
            return Ok(Some(term));
        }
        Ok(Some(match term {
            Arg::Field(mut base) => {
                base.extend(fields);
                Arg::Field(base)
            }
            Arg::Var(name, mut base) => {
                base.extend(fields);
                Arg::Var(name, base)
            }
            Arg::Bool(_) | Arg::Str(_) | Arg::Num(_) | Arg::Nil | Arg::Dot => {
                return Err(self.error(self.toks[self.i - 1].pos, "unexpected . after term"));
            }
            other => Arg::Chain(Box::new(other), fields),
        }))
    }

    fn term(&mut self) -> Result<Option<Arg>, String> {
        let t = self.next_non_space();
        Ok(Some(match t.tok {
            Tok::Ident(name) => {
                if !FUNCTIONS.contains(&name.as_str()) {
                    return Err(self.error(
                        t.pos,
                        format!(
                            "function {name:?} not defined (this renderer implements: {})",
                            FUNCTIONS.join(" ")
                        ),
                    ));
                }
                Arg::Func(name)
            }
            Tok::Dot => Arg::Dot,
            Tok::Nil => Arg::Nil,
            Tok::Var(name) => {
                self.use_var(&name, t.pos)?;
                Arg::Var(name, Vec::new())
            }
            Tok::Field(f) => Arg::Field(vec![f]),
            Tok::Bool(b) => Arg::Bool(b),
            Tok::Num(text) => Arg::Num(number(&text).map_err(|e| self.error(t.pos, e))?),
            Tok::Str(s) => Arg::Str(s),
            Tok::LParen => Arg::Pipe(Box::new(self.pipeline_until(
                "parenthesized pipeline",
                false,
                &Tok::RParen,
            )?)),
            _ => {
                self.i -= 1;
                return Ok(None);
            }
        }))
    }

    fn use_var(&self, name: &str, pos: usize) -> Result<(), String> {
        if self.vars.iter().any(|v| v == name) {
            Ok(())
        } else {
            Err(self.error(pos, format!("undefined variable {name:?}")))
        }
    }
}

fn pipe_pos(toks: &[Token], i: usize) -> usize {
    toks.get(i.saturating_sub(1)).map_or(0, |t| t.pos)
}

/// A number literal, as Go's parser reads it.
fn number(text: &str) -> Result<Number, String> {
    let int = parse_go_int(text);
    let looks_float = !is_prefixed(text) && text.contains(['.', 'e', 'E']);
    let float = if looks_float {
        text.replace('_', "").parse::<f64>().ok()
    } else {
        int.map(|i| i as f64)
    };
    if int.is_none() && !looks_float {
        return Err(format!("bad number syntax or integer overflow: {text:?}"));
    }
    let float = float.ok_or_else(|| format!("bad number syntax: {text:?}"))?;
    let int = int.or_else(|| (float.fract() == 0.0 && float.abs() < 9.2e18).then_some(float as i64));
    Ok(Number {
        text: text.to_string(),
        int,
        float: Some(float),
    })
}

fn is_prefixed(text: &str) -> bool {
    let body = text.trim_start_matches(['+', '-']);
    body.len() > 1
        && body.starts_with('0')
        && matches!(body.as_bytes()[1], b'x' | b'X' | b'o' | b'O' | b'b' | b'B')
}

/// Go's `strconv.ParseInt(s, 0, 64)` (base prefixes, underscores, octal `0`).
fn parse_go_int(text: &str) -> Option<i64> {
    let (neg, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(rest) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        (16, rest)
    } else if let Some(rest) = body.strip_prefix("0o").or_else(|| body.strip_prefix("0O")) {
        (8, rest)
    } else if let Some(rest) = body.strip_prefix("0b").or_else(|| body.strip_prefix("0B")) {
        (2, rest)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..])
    } else {
        (10, body)
    };
    let digits = digits.replace('_', "");
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let magnitude = u64::from_str_radix(&digits, radix).ok()?;
    if neg {
        if magnitude <= i64::MAX as u64 + 1 {
            Some((magnitude as i128).wrapping_neg() as i64)
        } else {
            None
        }
    } else {
        i64::try_from(magnitude).ok()
    }
}

// ---------------------------------------------------------------------------
// Execution

struct TemplateSet {
    trees: HashMap<String, Rc<Vec<Node>>>,
}

fn is_empty_tree(nodes: &[Node]) -> bool {
    nodes
        .iter()
        .all(|n| matches!(n, Node::Text(t) if t.trim().is_empty()))
}

impl TemplateSet {
    /// Parses every file in Helm's order (deepest paths first, then by
    /// name, descending): a later `define` of a name replaces an earlier
    /// one, unless its body is empty, as in Go.
    fn parse(files: &[(String, String)]) -> Result<Self, String> {
        let mut order: Vec<&(String, String)> = files.iter().collect();
        order.sort_by(|(a, _), (b, _)| {
            let (da, db) = (a.matches('/').count(), b.matches('/').count());
            db.cmp(&da).then_with(|| b.cmp(a))
        });
        let mut trees: HashMap<String, Rc<Vec<Node>>> = HashMap::new();
        for (name, text) in order {
            let mut parser = Parser::new(name, text)?;
            let root = parser.parse_file()?;
            for (define, body) in std::mem::take(&mut parser.defines) {
                if trees.contains_key(&define) && is_empty_tree(&body) {
                    continue;
                }
                trees.insert(define, Rc::new(body));
            }
            trees.insert(name.clone(), Rc::new(root));
        }
        Ok(Self { trees })
    }

    fn execute(&self, name: &str, data: Value) -> Result<String, String> {
        let mut exec = Exec {
            set: self,
            vars: Vec::new(),
            name: name.to_string(),
            includes: HashMap::new(),
            depth: 0,
        };
        let mut out = String::new();
        match exec.run(name, Cell::value(data), &mut out) {
            Ok(()) => Ok(out),
            Err(Fail::At(msg)) => Err(msg),
            Err(Fail::Msg(msg) | Fail::User(msg)) => Err(format!("template: {name}: {msg}")),
        }
    }
}

/// An error on its way up: located once, by the innermost command.
#[derive(Debug)]
enum Fail {
    /// Final message, with its location.
    At(String),
    /// To be located by the command that raised it.
    Msg(String),
    /// From `fail`/`required`: Helm reports it as "execution error at".
    User(String),
}

impl From<String> for Fail {
    fn from(msg: String) -> Self {
        Fail::Msg(msg)
    }
}

/// A value as a template variable or dot holds it. `nil_iface` marks a nil
/// that is a typed `interface{}` (a map entry, a range element): taking a
/// field of it is Go's "nil pointer evaluating interface {}.X" error, where
/// a field of an untyped nil (a pipeline result) is silently nothing.
#[derive(Debug, Clone)]
struct Cell {
    v: Value,
    nil_iface: bool,
}

impl Cell {
    fn value(v: Value) -> Self {
        Self { v, nil_iface: false }
    }
}

struct Var {
    name: String,
    cell: Cell,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Param {
    /// `interface{}`.
    Any,
    /// `reflect.Value` (the comparison builtins): anything, nil included.
    Reflect,
    Str,
    Int,
}

struct Signature {
    params: &'static [Param],
    variadic: Option<Param>,
}

fn signature(name: &str) -> Signature {
    use Param::*;
    let (params, variadic): (&'static [Param], Option<Param>) = match name {
        "not" => (&[Reflect], None),
        "eq" => (&[Reflect], Some(Reflect)),
        "ne" | "gt" => (&[Reflect, Reflect], None),
        "default" => (&[Any], Some(Any)),
        "quote" => (&[], Some(Any)),
        "toYaml" | "int" => (&[Any], None),
        "nindent" | "indent" | "trunc" => (&[Int, Str], None),
        "trimSuffix" => (&[Str, Str], None),
        "upper" => (&[Str], None),
        "replace" => (&[Str, Str, Str], None),
        "printf" => (&[Str], Some(Any)),
        "required" | "include" => (&[Str, Any], None),
        "fail" => (&[Str], None),
        _ => (&[], None),
    };
    Signature { params, variadic }
}

const MAX_INCLUDE_DEPTH: usize = 1000;
const MAX_TEMPLATE_DEPTH: usize = 10_000;

struct Exec<'s> {
    set: &'s TemplateSet,
    vars: Vec<Var>,
    /// The template being executed, for error messages.
    name: String,
    includes: HashMap<String, usize>,
    depth: usize,
}

impl Exec<'_> {
    /// Runs template `name` with `$` and dot set to `data`.
    fn run(&mut self, name: &str, data: Cell, out: &mut String) -> Result<(), Fail> {
        let tree = self
            .set
            .trees
            .get(name)
            .cloned()
            .ok_or_else(|| Fail::Msg(format!("template {name:?} not defined")))?;
        if self.depth >= MAX_TEMPLATE_DEPTH {
            return Err(Fail::Msg(format!(
                "exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})"
            )));
        }
        self.depth += 1;
        let vars = std::mem::replace(
            &mut self.vars,
            vec![Var {
                name: "$".into(),
                cell: data.clone(),
            }],
        );
        let outer = std::mem::replace(&mut self.name, name.to_string());
        let result = self.walk(&data, &tree, out);
        self.name = outer;
        self.vars = vars;
        self.depth -= 1;
        result
    }

    fn walk(&mut self, dot: &Cell, nodes: &[Node], out: &mut String) -> Result<(), Fail> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Action(pipe) => {
                    let v = self.pipeline(dot, pipe)?;
                    if pipe.decl.is_empty() {
                        print_value(&v, out);
                    }
                }
                Node::If(pipe, list, else_list) | Node::With(pipe, list, else_list) => {
                    let mark = self.vars.len();
                    let v = self.pipeline(dot, pipe)?;
                    if v.truth() {
                        if matches!(node, Node::With(..)) {
                            self.walk(&Cell::value(v), list, out)?;
                        } else {
                            self.walk(dot, list, out)?;
                        }
                    } else {
                        self.walk(dot, else_list, out)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::Range(pipe, list, else_list) => {
                    let mark = self.vars.len();
                    self.range(dot, pipe, list, else_list, out)?;
                    self.vars.truncate(mark);
                }
                Node::Template(name, pipe, loc) => {
                    let data = match pipe {
                        Some(p) => self.pipeline(dot, p)?,
                        None => Value::Nil,
                    };
                    self.run(name, Cell::value(data), out)
                        .map_err(|e| self.locate(e, loc, name))?;
                }
            }
        }
        Ok(())
    }

    fn range(
        &mut self,
        dot: &Cell,
        pipe: &Pipe,
        list: &[Node],
        else_list: &[Node],
        out: &mut String,
    ) -> Result<(), Fail> {
        let v = self.commands(dot, pipe)?;
        for name in &pipe.decl {
            self.vars.push(Var {
                name: name.clone(),
                cell: Cell::value(v.clone()),
            });
        }
        let items: Vec<(Value, Value)> = match v {
            Value::Nil => Vec::new(),
            Value::List(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (Value::Int(i as i64), v))
                .collect(),
            Value::Map(map) => map.into_iter().map(|(k, v)| (Value::Str(k), v)).collect(),
            other => {
                let msg = format!("range can't iterate over {}", sprint_v(&other));
                return Err(self.locate(Fail::Msg(msg), &pipe.loc, &pipe_text(pipe)));
            }
        };
        if items.is_empty() {
            return self.walk(dot, else_list, out);
        }
        let top = self.vars.len();
        for (index, elem) in items {
            let elem = Cell {
                v: elem,
                nil_iface: true,
            };
            match pipe.decl.len() {
                1 => self.vars[top - 1].cell = elem.clone(),
                2 => {
                    self.vars[top - 1].cell = elem.clone();
                    self.vars[top - 2].cell = Cell::value(index);
                }
                _ => {}
            }
            self.walk(&elem, list, out)?;
            self.vars.truncate(top);
        }
        Ok(())
    }

    /// Evaluates a pipeline and binds its declared variables.
    fn pipeline(&mut self, dot: &Cell, pipe: &Pipe) -> Result<Value, Fail> {
        let v = self.commands(dot, pipe)?;
        for name in &pipe.decl {
            if pipe.assign {
                if let Some(var) = self.vars.iter_mut().rev().find(|var| &var.name == name) {
                    var.cell = Cell::value(v.clone());
                }
            } else {
                self.vars.push(Var {
                    name: name.clone(),
                    cell: Cell::value(v.clone()),
                });
            }
        }
        Ok(v)
    }

    fn commands(&mut self, dot: &Cell, pipe: &Pipe) -> Result<Value, Fail> {
        let mut value = None;
        for cmd in &pipe.cmds {
            let v = self
                .command(dot, cmd, value.take())
                .map_err(|e| self.locate(e, &cmd.loc, &cmd.text))?;
            value = Some(v);
        }
        Ok(value.unwrap_or(Value::Nil))
    }

    fn locate(&self, e: Fail, loc: &Loc, text: &str) -> Fail {
        match e {
            Fail::At(_) => e,
            Fail::User(msg) => Fail::At(format!("execution error at ({loc}): {msg}")),
            Fail::Msg(msg) => Fail::At(format!(
                "template: {loc}: executing {:?} at <{text}>: {msg}",
                self.name
            )),
        }
    }

    fn command(&mut self, dot: &Cell, cmd: &Cmd, final_: Option<Value>) -> Result<Value, Fail> {
        let first = &cmd.args[0];
        let has_args = cmd.args.len() > 1 || final_.is_some();
        match first {
            Arg::Func(name) => self.call(dot, name, &cmd.args[1..], final_),
            Arg::Nil => Err(Fail::Msg("nil is not a command".into())),
            Arg::Field(fields) | Arg::Var(_, fields) | Arg::Chain(_, fields)
                if has_args && !fields.is_empty() =>
            {
                Err(Fail::Msg(format!(
                    "{} is not a method but has arguments",
                    fields.last().map_or("", String::as_str)
                )))
            }
            _ if has_args => Err(Fail::Msg(format!(
                "can't give argument to non-function {}",
                cmd.text
            ))),
            Arg::Str(s) => Ok(Value::Str(s.clone())),
            Arg::Bool(b) => Ok(Value::Bool(*b)),
            Arg::Num(n) => Ok(ideal(n)),
            _ => Ok(self.operand(dot, first)?.v),
        }
    }

    /// An operand that is evaluated (not a literal).
    fn operand(&mut self, dot: &Cell, arg: &Arg) -> Result<Cell, Fail> {
        match arg {
            Arg::Dot => Ok(dot.clone()),
            Arg::Field(fields) => field_chain(dot.clone(), fields),
            Arg::Var(name, fields) => {
                let cell = self
                    .vars
                    .iter()
                    .rev()
                    .find(|v| &v.name == name)
                    .map(|v| v.cell.clone())
                    .ok_or_else(|| Fail::Msg(format!("undefined variable: {name}")))?;
                field_chain(cell, fields)
            }
            Arg::Pipe(pipe) => Ok(Cell::value(self.pipeline(dot, pipe)?)),
            Arg::Chain(term, fields) => {
                let base = self.operand(dot, term)?;
                field_chain(Cell::value(base.v), fields)
            }
            Arg::Func(name) => Ok(Cell::value(self.call(dot, name, &[], None)?)),
            Arg::Str(s) => Ok(Cell::value(Value::Str(s.clone()))),
            Arg::Bool(b) => Ok(Cell::value(Value::Bool(*b))),
            Arg::Num(n) => Ok(Cell::value(ideal(n))),
            Arg::Nil => Ok(Cell::value(Value::Nil)),
        }
    }

    /// An argument converted to a parameter's Go type.
    fn arg(&mut self, dot: &Cell, arg: &Arg, param: Param) -> Result<Value, Fail> {
        match (arg, param) {
            (Arg::Nil, Param::Any | Param::Reflect) => Ok(Value::Nil),
            (Arg::Nil, Param::Str) => Err(Fail::Msg("cannot assign nil to string".into())),
            (Arg::Nil, Param::Int) => Err(Fail::Msg("cannot assign nil to int".into())),
            (Arg::Str(s), Param::Int) => Err(Fail::Msg(format!("expected integer; found {}", go_quote(s)))),
            (Arg::Str(s), _) => Ok(Value::Str(s.clone())),
            (Arg::Num(n), Param::Int) => n
                .int
                .map(Value::Int)
                .ok_or_else(|| Fail::Msg(format!("expected integer; found {}", n.text))),
            (Arg::Num(n), Param::Str) => Err(Fail::Msg(format!("expected string; found {}", n.text))),
            (Arg::Num(n), _) => Ok(ideal(n)),
            (Arg::Bool(b), Param::Str) => Err(Fail::Msg(format!("expected string; found {b}"))),
            (Arg::Bool(b), Param::Int) => Err(Fail::Msg(format!("expected integer; found {b}"))),
            (Arg::Bool(b), _) => Ok(Value::Bool(*b)),
            _ => {
                let cell = self.operand(dot, arg)?;
                validate(cell, param)
            }
        }
    }

    fn call(&mut self, dot: &Cell, name: &str, args: &[Arg], final_: Option<Value>) -> Result<Value, Fail> {
        if name == "and" || name == "or" {
            return self.and_or(dot, name, args, final_);
        }
        let sig = signature(name);
        let n = args.len() + usize::from(final_.is_some());
        let fixed = sig.params.len();
        if (sig.variadic.is_none() && n != fixed) || n < fixed {
            let want = if sig.variadic.is_some() {
                format!("at least {fixed}")
            } else {
                fixed.to_string()
            };
            return Err(Fail::Msg(format!(
                "wrong number of args for {name}: want {want} got {n}"
            )));
        }
        let param = |i: usize| sig.params.get(i).copied().or(sig.variadic).unwrap_or(Param::Any);
        let mut vals = Vec::with_capacity(n);
        for (i, a) in args.iter().enumerate() {
            vals.push(self.arg(dot, a, param(i))?);
        }
        if let Some(f) = final_ {
            vals.push(validate(Cell::value(f), param(n - 1))?);
        }
        self.apply(name, vals).map_err(|e| match e {
            Fail::Msg(msg) => Fail::Msg(format!("error calling {name}: {msg}")),
            other => other,
        })
    }

    /// `and`/`or`: evaluate arguments in order, stop at the first that decides.
    fn and_or(&mut self, dot: &Cell, name: &str, args: &[Arg], final_: Option<Value>) -> Result<Value, Fail> {
        let n = args.len() + usize::from(final_.is_some());
        if n == 0 {
            return Err(Fail::Msg(format!(
                "wrong number of args for {name}: want at least 1 got 0"
            )));
        }
        let stop_when = name == "or";
        let mut last = Value::Nil;
        for a in args {
            last = self.arg(dot, a, Param::Reflect)?;
            if last.truth() == stop_when {
                return Ok(last);
            }
        }
        if let Some(f) = final_ {
            last = f;
        }
        Ok(last)
    }

    fn apply(&mut self, name: &str, mut vals: Vec<Value>) -> Result<Value, Fail> {
        let s = |v: &Value| match v {
            Value::Str(s) => s.clone(),
            _ => unreachable!("validated as a string"),
        };
        let i = |v: &Value| match v {
            Value::Int(i) => *i,
            _ => unreachable!("validated as an int"),
        };
        Ok(match name {
            "not" => Value::Bool(!vals[0].truth()),
            "eq" => Value::Bool(eq(&vals[0], &vals[1..])?),
            "ne" => Value::Bool(!eq(&vals[0], &vals[1..])?),
            "gt" => Value::Bool(!(lt(&vals[0], &vals[1])? || eq(&vals[0], &vals[1..])?)),
            "default" => {
                if vals.len() < 2 || !vals[1].truth() {
                    vals.swap_remove(0)
                } else {
                    vals.swap_remove(1)
                }
            }
            "quote" => Value::Str(
                vals.iter()
                    .filter(|v| **v != Value::Nil)
                    .map(|v| go_quote(&strval(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            "toYaml" => Value::Str(to_yaml(&vals[0])?),
            "indent" | "nindent" => {
                let n = i(&vals[0]);
                if n < 0 {
                    return Err(Fail::Msg("strings: negative Repeat count".into()));
                }
                let pad = " ".repeat(n as usize);
                let body = format!("{pad}{}", s(&vals[1]).replace('\n', &format!("\n{pad}")));
                Value::Str(if name == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "trunc" => {
                let (c, text) = (i(&vals[0]), s(&vals[1]));
                let len = text.len() as i64;
                let bytes = text.as_bytes();
                let cut = if c < 0 && len + c > 0 {
                    &bytes[(len + c) as usize..]
                } else if c >= 0 && len > c {
                    &bytes[..c as usize]
                } else {
                    bytes
                };
                Value::Str(String::from_utf8_lossy(cut).into_owned())
            }
            "trimSuffix" => {
                let (suffix, text) = (s(&vals[0]), s(&vals[1]));
                Value::Str(text.strip_suffix(suffix.as_str()).unwrap_or(&text).to_string())
            }
            "upper" => Value::Str(s(&vals[0]).to_uppercase()),
            // sprig: replace OLD NEW STRING (every occurrence).
            "replace" => Value::Str(s(&vals[2]).replace(s(&vals[0]).as_str(), &s(&vals[1]))),
            "printf" => Value::Str(sprintf(&s(&vals[0]), &vals[1..])?),
            "required" => match &vals[1] {
                Value::Nil => return Err(Fail::User(s(&vals[0]))),
                Value::Str(v) if v.is_empty() => return Err(Fail::User(s(&vals[0]))),
                _ => vals.swap_remove(1),
            },
            "fail" => return Err(Fail::User(s(&vals[0]))),
            "int" => Value::Int(to_int(&vals[0])),
            "include" => {
                let name = s(&vals[0]);
                let data = vals.swap_remove(1);
                let count = self.includes.entry(name.clone()).or_insert(0);
                *count += 1;
                if *count > MAX_INCLUDE_DEPTH {
                    return Err(Fail::Msg(format!(
                        "rendering template has a nested reference name: {name}: unable to execute template"
                    )));
                }
                let mut buf = String::new();
                let result = self.run(&name, Cell::value(data), &mut buf);
                if let Some(count) = self.includes.get_mut(&name) {
                    *count -= 1;
                }
                result?;
                Value::Str(buf)
            }
            other => return Err(Fail::Msg(format!("function {other:?} not defined"))),
        })
    }
}

fn pipe_text(pipe: &Pipe) -> String {
    pipe.cmds
        .iter()
        .map(|c| c.text.as_str())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A number literal as an `interface{}` argument: float64 if written as one.
fn ideal(n: &Number) -> Value {
    match (n.int, n.float) {
        (_, Some(f)) if !is_prefixed(&n.text) && n.text.contains(['.', 'e', 'E']) => Value::Float(f),
        (Some(i), _) => Value::Int(i),
        (None, Some(f)) => Value::Float(f),
        (None, None) => Value::Nil,
    }
}

/// Go's `validateType`: an evaluated value passed to a typed parameter.
fn validate(cell: Cell, param: Param) -> Result<Value, Fail> {
    let want = match param {
        Param::Any | Param::Reflect => return Ok(cell.v),
        Param::Str => "string",
        Param::Int => "int",
    };
    match (&cell.v, param) {
        (Value::Str(_), Param::Str) | (Value::Int(_), Param::Int) => Ok(cell.v),
        (Value::Nil, _) if !cell.nil_iface => Err(Fail::Msg(format!("invalid value; expected {want}"))),
        (Value::Nil, _) => Err(Fail::Msg(format!(
            "wrong type for value; expected {want}; got interface {{}}"
        ))),
        (other, _) => Err(Fail::Msg(format!(
            "wrong type for value; expected {want}; got {}",
            other.go_type()
        ))),
    }
}

/// `.A.B` on a value, with Go's rules for maps, structs and nils.
fn field_chain(mut recv: Cell, fields: &[String]) -> Result<Cell, Fail> {
    for f in fields {
        recv = match recv.v {
            Value::Nil if recv.nil_iface => {
                return Err(Fail::Msg(format!("nil pointer evaluating interface {{}}.{f}")));
            }
            Value::Nil => Cell::value(Value::Nil),
            Value::Map(mut m) => Cell {
                v: m.remove(f).unwrap_or(Value::Nil),
                nil_iface: true,
            },
            Value::Struct(ty, mut m) => match m.remove(f) {
                Some(v) => Cell::value(v),
                None => return Err(Fail::Msg(format!("can't evaluate field {f} in type {ty}"))),
            },
            other => {
                return Err(Fail::Msg(format!(
                    "can't evaluate field {f} in type {}",
                    other.go_type()
                )));
            }
        };
    }
    Ok(recv)
}

#[derive(PartialEq, Eq)]
enum Kind {
    Invalid,
    Bool,
    Int,
    Float,
    Str,
}

fn basic_kind(v: &Value) -> Kind {
    match v {
        Value::Bool(_) => Kind::Bool,
        Value::Int(_) => Kind::Int,
        Value::Float(_) => Kind::Float,
        Value::Str(_) => Kind::Str,
        _ => Kind::Invalid,
    }
}

/// Go's `eq`: true if `a` equals any of `bs`; mixed basic kinds are an error.
fn eq(a: &Value, bs: &[Value]) -> Result<bool, String> {
    if bs.is_empty() {
        return Err("missing argument for comparison".into());
    }
    for b in bs {
        let (ka, kb) = (basic_kind(a), basic_kind(b));
        let truth = if ka != kb {
            if *a != Value::Nil && *b != Value::Nil {
                return Err("incompatible types for comparison".into());
            }
            false
        } else {
            match (a, b) {
                (Value::Bool(x), Value::Bool(y)) => x == y,
                (Value::Int(x), Value::Int(y)) => x == y,
                (Value::Float(x), Value::Float(y)) => x == y,
                (Value::Str(x), Value::Str(y)) => x == y,
                (Value::Nil, _) | (_, Value::Nil) => *a == Value::Nil && *b == Value::Nil,
                _ => {
                    return Err(format!("non-comparable type {}: {}", sprint_v(a), a.go_type()));
                }
            }
        };
        if truth {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Go's `lt`.
fn lt(a: &Value, b: &Value) -> Result<bool, String> {
    let (ka, kb) = (basic_kind(a), basic_kind(b));
    if ka == Kind::Invalid || kb == Kind::Invalid {
        return Err("invalid type for comparison".into());
    }
    if ka != kb {
        return Err("incompatible types for comparison".into());
    }
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Ok(x < y),
        (Value::Float(x), Value::Float(y)) => Ok(x < y),
        (Value::Str(x), Value::Str(y)) => Ok(x < y),
        _ => Err("invalid type for comparison".into()),
    }
}

/// Sprig's `int` (cast.ToInt): numbers truncate, strings parse, else 0.
fn to_int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Float(f) => *f as i64,
        Value::Bool(b) => i64::from(*b),
        Value::Str(s) => {
            let trimmed = match s.rfind('.') {
                Some(dot) if !s[dot + 1..].is_empty() && s[dot + 1..].bytes().all(|b| b == b'0') => &s[..dot],
                _ => s.as_str(),
            };
            parse_go_int(trimmed).unwrap_or(0)
        }
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Go's fmt

/// How an action prints a value (`fmt.Fprint`, nil as "<no value>").
fn print_value(v: &Value, out: &mut String) {
    match v {
        Value::Nil => out.push_str("<no value>"),
        other => out.push_str(&sprint_v(other)),
    }
}

/// Sprig's `strval`: strings as they are, anything else `%v`.
fn strval(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        other => sprint_v(other),
    }
}

/// `%v`.
fn sprint_v(v: &Value) -> String {
    fmt_verb('v', v)
}

fn fmt_verb(verb: char, v: &Value) -> String {
    let bad = |v: &Value| format!("%!{verb}({}={})", v.go_type(), sprint_v(v));
    match v {
        Value::Nil if verb == 'v' => "<nil>".into(),
        Value::Nil => format!("%!{verb}(<nil>)"),
        Value::List(items) => format!(
            "[{}]",
            items
                .iter()
                .map(|i| fmt_verb(verb, i))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Value::Map(m) => format!(
            "map[{}]",
            m.iter()
                .map(|(k, v)| format!("{}:{}", fmt_verb(verb, &Value::Str(k.clone())), fmt_verb(verb, v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Value::Struct(_, fields) => format!(
            "&{{{}}}",
            fields
                .values()
                .map(|v| fmt_verb(verb, v))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Value::Str(s) => match verb {
            's' | 'v' => s.clone(),
            'q' => go_quote(s),
            _ => bad(v),
        },
        Value::Bool(b) => match verb {
            't' | 'v' => b.to_string(),
            _ => format!("%!{verb}(bool={b})"),
        },
        Value::Int(i) => match verb {
            'd' | 'v' => i.to_string(),
            'q' => match u32::try_from(*i).ok().and_then(char::from_u32) {
                Some(c) => format!("'{}'", go_quote(&c.to_string()).trim_matches('"')),
                None => "'\u{FFFD}'".into(),
            },
            _ => bad(v),
        },
        Value::Float(f) => match verb {
            'v' => go_float(*f),
            _ => format!("%!{verb}(float64={})", go_float(*f)),
        },
    }
}

/// `fmt.Sprintf` for the verbs `%s %v %d %q %t %%` without flags.
fn sprintf(format: &str, args: &[Value]) -> Result<String, Fail> {
    let mut out = String::new();
    let mut next = 0;
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(verb @ ('s' | 'v' | 'd' | 'q' | 't')) => {
                match args.get(next) {
                    Some(v) => out.push_str(&fmt_verb(verb, v)),
                    None => {
                        let _ = write!(out, "%!{verb}(MISSING)");
                    }
                }
                next += 1;
            }
            Some(other) => {
                return Err(Fail::Msg(format!(
                    "printf: %{other} (flags, widths, other verbs) is not supported by this renderer"
                )));
            }
            None => out.push_str("%!(NOVERB)"),
        }
    }
    if next < args.len() {
        let extra: Vec<String> = args[next..]
            .iter()
            .map(|v| match v {
                Value::Nil => "<nil>".to_string(),
                v => format!("{}={}", v.go_type(), sprint_v(v)),
            })
            .collect();
        let _ = write!(out, "%!(EXTRA {})", extra.join(", "));
    }
    Ok(out)
}

/// `%v` of a float64: strconv's 'g' with the shortest precision, which
/// switches to exponent form below 1e-4 and from 1e6 (`1e+06`).
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf".into() } else { "-Inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

/// Go's `unicode.IsPrint`, near enough: no controls, no spaces but ASCII
/// space, no format or private-use characters.
fn go_is_print(c: char) -> bool {
    let u = c as u32;
    if u < 0x80 {
        return (0x20..0x7f).contains(&u);
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E
        | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xFFFE | 0xFFFF | 0xE000..=0xF8FF | 0xF0000..)
}

/// Go's `strconv.Quote` (what `%q` and `quote` print).
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if go_is_print(c) => out.push(c),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// toYaml: sigs.k8s.io/yaml (JSON, then gopkg.in/yaml.v2's emitter)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

#[derive(Debug)]
enum YNode {
    Scalar(String, Style),
    Seq(Vec<YNode>),
    Map(Vec<(String, YNode)>),
}

/// Helm's `toYaml`: YAML without the trailing newline; "" when the value
/// cannot be marshalled to JSON (Helm swallows that error).
fn to_yaml(v: &Value) -> Result<String, String> {
    let Some(node) = json_node(v)? else {
        return Ok(String::new());
    };
    let mut e = Emitter::new();
    e.node(&node, false, false)?;
    e.write_indent();
    let mut out = e.out;
    if out.ends_with('\n') {
        out.pop();
    }
    Ok(out)
}

/// The value as yaml.v2 sees it after the JSON round trip: keys sorted the
/// yaml.v2 way, numbers as JSON wrote them and yaml.v2 read them back.
fn json_node(v: &Value) -> Result<Option<YNode>, String> {
    Ok(Some(match v {
        Value::Nil => YNode::Scalar("null".into(), Style::Plain),
        Value::Bool(b) => YNode::Scalar(b.to_string(), Style::Plain),
        Value::Int(i) => YNode::Scalar(i.to_string(), Style::Plain),
        Value::Float(f) if !f.is_finite() => return Ok(None),
        Value::Float(f) => YNode::Scalar(yaml_number(*f), Style::Plain),
        Value::Str(s) => YNode::Scalar(s.clone(), string_style(s)),
        Value::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match json_node(item)? {
                    Some(n) => out.push(n),
                    None => return Ok(None),
                }
            }
            YNode::Seq(out)
        }
        Value::Map(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| {
                if yaml_key_less(a, b) {
                    std::cmp::Ordering::Less
                } else if yaml_key_less(b, a) {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            });
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                match json_node(&m[k])? {
                    Some(n) => out.push((k.clone(), n)),
                    None => return Ok(None),
                }
            }
            YNode::Map(out)
        }
        Value::Struct(..) => return Err("toYaml of a Go struct is not supported by this renderer".into()),
    }))
}

/// A float64 after JSON and back: integral values below 1e21 become
/// integers (JSON writes no fraction), the rest strconv 'g' shortest.
fn yaml_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        let digits = format!("{f:.0}");
        if let Ok(i) = digits.parse::<i64>() {
            return i.to_string();
        }
        if !digits.starts_with('-') {
            return digits;
        }
    }
    go_float(f)
}

/// yaml.v2's map key order: digit runs compare as numbers, and a letter
/// sorts after a non-letter.
fn yaml_key_less(a: &str, b: &str) -> bool {
    let ar: Vec<char> = a.chars().collect();
    let br: Vec<char> = b.chars().collect();
    for i in 0..ar.len().min(br.len()) {
        if ar[i] == br[i] {
            continue;
        }
        let (al, bl) = (ar[i].is_alphabetic(), br[i].is_alphabetic());
        if al && bl {
            return ar[i] < br[i];
        }
        if al || bl {
            return bl;
        }
        let (mut an, mut bn) = (0i64, 0i64);
        if ar[i] == '0' || br[i] == '0' {
            for j in (0..i).rev() {
                if !ar[j].is_ascii_digit() {
                    break;
                }
                if ar[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let mut ai = i;
        while ai < ar.len() && ar[ai].is_ascii_digit() {
            an = an.wrapping_mul(10).wrapping_add(i64::from(ar[ai] as u8 - b'0'));
            ai += 1;
        }
        let mut bi = i;
        while bi < br.len() && br[bi].is_ascii_digit() {
            bn = bn.wrapping_mul(10).wrapping_add(i64::from(br[bi] as u8 - b'0'));
            bi += 1;
        }
        if an != bn {
            return an < bn;
        }
        if ai != bi {
            return ai < bi;
        }
        return ar[i] < br[i];
    }
    ar.len() < br.len()
}

/// yaml.v2's `stringv`: literal if multi-line, plain if it reads back as a
/// string, double-quoted otherwise.
fn string_style(s: &str) -> Style {
    if s.contains('\n') {
        Style::Literal
    } else if !resolves_non_string(s) && !is_base60_float(s) {
        Style::Plain
    } else {
        Style::Double
    }
}

/// yaml.v2's `resolve`: would this plain scalar read back as something
/// other than a string?
fn resolves_non_string(s: &str) -> bool {
    const MAP: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "n", "N", "no", "No", "NO",
        "false", "False", "FALSE", "off", "Off", "OFF", "", "~", "null", "Null", "NULL", ".nan", ".NaN",
        ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", "<<",
    ];
    let hint = match s.as_bytes().first() {
        None => b'N',
        Some(b'+' | b'-') => b'S',
        Some(b'0'..=b'9') => b'D',
        Some(b'y' | b'Y' | b'n' | b'N' | b't' | b'T' | b'f' | b'F' | b'o' | b'O' | b'~') => b'M',
        Some(b'.') => b'.',
        Some(_) => 0,
    };
    if hint == 0 {
        return false;
    }
    if MAP.contains(&s) {
        return true;
    }
    match hint {
        b'.' => {
            let rest = &s[1..];
            let (digits, exp) = match rest.find(['e', 'E']) {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && exp.is_none_or(|e| {
                    let e = e.strip_prefix(['+', '-']).unwrap_or(e);
                    !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
                })
        }
        b'D' | b'S' => {
            if is_timestamp(s) {
                return true;
            }
            let plain = s.replace('_', "");
            resolves_int(&plain)
                || (yaml_style_float(&plain) && plain.parse::<f64>().is_ok_and(f64::is_finite))
        }
        _ => false,
    }
}

/// ParseInt/ParseUint/big.Int with base 0, as yaml.v2 tries them.
fn resolves_int(plain: &str) -> bool {
    let (neg, body) = match plain.as_bytes().first() {
        Some(b'-') => (true, &plain[1..]),
        Some(b'+') => (false, &plain[1..]),
        _ => (false, plain),
    };
    if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        // An int, a big int, or (a leading 0 with 8s and 9s, or a huge
        // negative) a float: never a string.
        return true;
    }
    let (radix, digits) = match body.get(..2) {
        Some("0x" | "0X") => (16, &body[2..]),
        Some("0o" | "0O") => (8, &body[2..]),
        Some("0b" | "0B") => (2, &body[2..]),
        _ => return false,
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return false;
    }
    if !neg {
        return true;
    }
    u128::from_str_radix(digits, radix).is_ok_and(|m| m <= 1u128 << 63)
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn yaml_style_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit()),
        Some((int, frac)) => {
            int.bytes().all(|b| b.is_ascii_digit()) && frac.bytes().all(|b| b.is_ascii_digit())
        }
        None => !mantissa.is_empty() && mantissa.bytes().all(|b| b.is_ascii_digit()),
    };
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    });
    mantissa_ok && exp_ok
}

/// yaml.v2's timestamp formats: `2006-1-2`, `2006-1-2T15:4:5.999999999Z07:00`
/// (also with `t`), `2006-1-2 15:4:5.999999999`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let year: u32 = s[..4].parse().unwrap_or(0);
    let mut i = 5;
    let num = |i: &mut usize, max_len: usize| -> Option<u32> {
        let start = *i;
        while *i < b.len() && *i - start < max_len && b[*i].is_ascii_digit() {
            *i += 1;
        }
        (*i > start).then(|| s[start..*i].parse().unwrap_or(0))
    };
    let Some(month) = num(&mut i, 2) else { return false };
    if i >= b.len() || b[i] != b'-' {
        return false;
    }
    i += 1;
    let Some(day) = num(&mut i, 2) else { return false };
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days {
        return false;
    }
    if i == b.len() {
        return true;
    }
    let zoned = match b[i] {
        b'T' | b't' => true,
        b' ' => false,
        _ => return false,
    };
    i += 1;
    let Some(h) = num(&mut i, 2) else { return false };
    for limit in [59, 59] {
        if i >= b.len() || b[i] != b':' {
            return false;
        }
        i += 1;
        match num(&mut i, 2) {
            Some(v) if v <= limit => {}
            _ => return false,
        }
    }
    if h > 23 {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if num(&mut i, 9).is_none() {
            return false;
        }
    }
    if !zoned {
        return i == b.len();
    }
    match &s[i..] {
        "Z" => true,
        zone => {
            let z = zone.as_bytes();
            z.len() == 6
                && (z[0] == b'+' || z[0] == b'-')
                && z[1..3].iter().all(u8::is_ascii_digit)
                && z[3] == b':'
                && z[4..6].iter().all(u8::is_ascii_digit)
        }
    }
}

/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$`
fn is_base60_float(s: &str) -> bool {
    if !s.contains(':') {
        return false;
    }
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    if frac.is_some_and(|f| !f.bytes().all(|b| b.is_ascii_digit() || b == b'_')) {
        return false;
    }
    let mut parts = main.split(':');
    let first = parts.next().unwrap_or("");
    if !first.as_bytes().first().is_some_and(u8::is_ascii_digit)
        || !first.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return false;
    }
    let mut any = false;
    for p in parts {
        any = true;
        let ok = match p.as_bytes() {
            [d] => d.is_ascii_digit(),
            [t, d] => (b'0'..=b'5').contains(t) && d.is_ascii_digit(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    any
}

fn yaml_is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// libyaml's `is_printable` (4-byte UTF-8 characters are not).
fn yaml_is_printable(c: char) -> bool {
    let u = c as u32;
    u == 0x0A
        || (0x20..=0x7E).contains(&u)
        || (0xA0..=0xD7FF).contains(&u)
        || ((0xE000..=0xFFFD).contains(&u) && u != 0xFEFF)
}

/// libyaml's `yaml_emitter_analyze_scalar`: which styles a scalar allows.
struct Analysis {
    multiline: bool,
    flow_plain: bool,
    block_plain: bool,
    single_quoted: bool,
    block: bool,
}

fn analyze(value: &str) -> Analysis {
    if value.is_empty() {
        return Analysis {
            multiline: false,
            flow_plain: false,
            block_plain: true,
            single_quoted: true,
            block: false,
        };
    }
    let chars: Vec<char> = value.chars().collect();
    let (mut block_ind, mut flow_ind) = (false, false);
    if value.starts_with("---") || value.starts_with("...") {
        block_ind = true;
        flow_ind = true;
    }
    let (mut line_breaks, mut special) = (false, false);
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break) = (false, false);
    let (mut prev_space, mut prev_break) = (false, false);
    let mut preceded_by_ws = true;
    let n = chars.len();
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_ws = i + 1 >= n || matches!(chars[i + 1], ' ' | '\t');
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"' | '%' | '@'
                | '`' => {
                    flow_ind = true;
                    block_ind = true;
                }
                '?' | ':' => {
                    flow_ind = true;
                    if followed_by_ws {
                        block_ind = true;
                    }
                }
                '-' if followed_by_ws => {
                    flow_ind = true;
                    block_ind = true;
                }
                _ => {}
            }
        } else {
            match c {
                ',' | '?' | '[' | ']' | '{' | '}' => flow_ind = true,
                ':' => {
                    flow_ind = true;
                    if followed_by_ws {
                        block_ind = true;
                    }
                }
                '#' if preceded_by_ws => {
                    flow_ind = true;
                    block_ind = true;
                }
                _ => {}
            }
        }
        if !yaml_is_printable(c) {
            special = true;
        }
        if c == ' ' {
            if i == 0 {
                leading_space = true;
            }
            if i + 1 == n {
                trailing_space = true;
            }
            if prev_break {
                break_space = true;
            }
            prev_space = true;
            prev_break = false;
        } else if yaml_is_break(c) {
            line_breaks = true;
            if i == 0 {
                leading_break = true;
            }
            if i + 1 == n {
                trailing_break = true;
            }
            if prev_space {
                space_break = true;
            }
            prev_space = false;
            prev_break = true;
        } else {
            prev_space = false;
            prev_break = false;
        }
        preceded_by_ws = matches!(c, ' ' | '\t' | '\0') || yaml_is_break(c);
    }
    let mut a = Analysis {
        multiline: line_breaks,
        flow_plain: true,
        block_plain: true,
        single_quoted: true,
        block: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        a.flow_plain = false;
        a.block_plain = false;
    }
    if trailing_space {
        a.block = false;
    }
    if break_space {
        a.flow_plain = false;
        a.block_plain = false;
        a.single_quoted = false;
    }
    if space_break || special {
        a.flow_plain = false;
        a.block_plain = false;
        a.single_quoted = false;
        a.block = false;
    }
    if line_breaks {
        a.flow_plain = false;
        a.block_plain = false;
    }
    if flow_ind {
        a.flow_plain = false;
    }
    if block_ind {
        a.block_plain = false;
    }
    a
}

const BEST_INDENT: i32 = 2;
const BEST_WIDTH: usize = 80;

/// The part of libyaml's emitter (as in gopkg.in/yaml.v2) that block
/// mappings, block sequences, empty flow collections and scalars use.
struct Emitter {
    out: String,
    column: usize,
    indent: i32,
    indents: Vec<i32>,
    whitespace: bool,
    indention: bool,
    flow_level: usize,
    mapping_context: bool,
    simple_key_context: bool,
}

impl Emitter {
    fn new() -> Self {
        Self {
            out: String::new(),
            column: 0,
            indent: -1,
            indents: Vec::new(),
            whitespace: true,
            indention: true,
            flow_level: 0,
            mapping_context: false,
            simple_key_context: false,
        }
    }

    fn put(&mut self, c: char) {
        self.out.push(c);
        self.column += 1;
    }

    fn put_break(&mut self) {
        self.out.push('\n');
        self.column = 0;
    }

    fn write_break(&mut self, c: char) {
        if c == '\n' {
            self.put_break();
        } else {
            self.put(c);
            self.column = 0;
        }
    }

    fn write_indent(&mut self) {
        let indent = self.indent.max(0) as usize;
        if !self.indention || self.column > indent || (self.column == indent && !self.whitespace) {
            self.put_break();
        }
        while self.column < indent {
            self.put(' ');
        }
        self.whitespace = true;
        self.indention = true;
    }

    fn write_indicator(
        &mut self,
        indicator: &str,
        need_whitespace: bool,
        is_whitespace: bool,
        is_indention: bool,
    ) {
        if need_whitespace && !self.whitespace {
            self.put(' ');
        }
        for c in indicator.chars() {
            self.put(c);
        }
        self.whitespace = is_whitespace;
        self.indention = self.indention && is_indention;
    }

    fn increase_indent(&mut self, flow: bool, indentless: bool) {
        self.indents.push(self.indent);
        if self.indent < 0 {
            self.indent = if flow { BEST_INDENT } else { 0 };
        } else if !indentless {
            self.indent += BEST_INDENT;
        }
    }

    fn pop_indent(&mut self) {
        self.indent = self.indents.pop().unwrap_or(-1);
    }

    fn node(&mut self, n: &YNode, mapping: bool, simple_key: bool) -> Result<(), String> {
        self.mapping_context = mapping;
        self.simple_key_context = simple_key;
        match n {
            YNode::Scalar(v, style) => {
                self.scalar(v, *style);
                Ok(())
            }
            YNode::Seq(items) if items.is_empty() || self.flow_level > 0 => {
                self.empty_flow("[", "]");
                Ok(())
            }
            YNode::Map(entries) if entries.is_empty() || self.flow_level > 0 => {
                self.empty_flow("{", "}");
                Ok(())
            }
            YNode::Seq(items) => {
                let indentless = self.mapping_context && !self.indention;
                self.increase_indent(false, indentless);
                for item in items {
                    self.write_indent();
                    self.write_indicator("-", true, false, true);
                    self.node(item, false, false)?;
                }
                self.pop_indent();
                Ok(())
            }
            YNode::Map(entries) => {
                self.increase_indent(false, false);
                for (k, v) in entries {
                    self.write_indent();
                    if analyze(k).multiline || k.len() > 128 {
                        return Err(format!(
                            "toYaml: map key {k:?} needs a complex key, not supported by this renderer"
                        ));
                    }
                    self.node(&YNode::Scalar(k.clone(), string_style(k)), true, true)?;
                    self.write_indicator(":", false, false, false);
                    self.node(v, true, false)?;
                }
                self.pop_indent();
                Ok(())
            }
        }
    }

    fn empty_flow(&mut self, open: &str, close: &str) {
        self.write_indicator(open, true, true, false);
        self.increase_indent(true, false);
        self.pop_indent();
        self.write_indicator(close, false, false, false);
    }

    fn scalar(&mut self, value: &str, requested: Style) {
        let a = analyze(value);
        let mut style = requested;
        if self.simple_key_context && a.multiline {
            style = Style::Double;
        }
        if style == Style::Plain {
            if (self.flow_level > 0 && !a.flow_plain) || (self.flow_level == 0 && !a.block_plain) {
                style = Style::Single;
            }
            if value.is_empty() && (self.flow_level > 0 || self.simple_key_context) {
                style = Style::Single;
            }
        }
        if style == Style::Single && !a.single_quoted {
            style = Style::Double;
        }
        if style == Style::Literal && (!a.block || self.flow_level > 0 || self.simple_key_context) {
            style = Style::Double;
        }
        self.increase_indent(true, false);
        let allow_breaks = !self.simple_key_context;
        match style {
            Style::Plain => self.write_plain(value, allow_breaks),
            Style::Single => self.write_single(value, allow_breaks),
            Style::Double => self.write_double(value, allow_breaks),
            Style::Literal => self.write_literal(value),
        }
        self.pop_indent();
    }

    fn write_plain(&mut self, value: &str, allow_breaks: bool) {
        if !self.whitespace {
            self.put(' ');
        }
        let chars: Vec<char> = value.chars().collect();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                if allow_breaks && !spaces && self.column > BEST_WIDTH && chars.get(i + 1) != Some(&' ') {
                    self.write_indent();
                } else {
                    self.put(c);
                }
                spaces = true;
            } else {
                self.put(c);
                self.indention = false;
                spaces = false;
            }
        }
        self.whitespace = false;
        self.indention = false;
    }

    fn write_single(&mut self, value: &str, allow_breaks: bool) {
        self.write_indicator("'", true, false, false);
        let chars: Vec<char> = value.chars().collect();
        let n = chars.len();
        let (mut spaces, mut breaks) = (false, false);
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                if allow_breaks
                    && !spaces
                    && self.column > BEST_WIDTH
                    && i > 0
                    && i + 1 < n
                    && chars[i + 1] != ' '
                {
                    self.write_indent();
                } else {
                    self.put(c);
                }
                spaces = true;
            } else if yaml_is_break(c) {
                if !breaks && c == '\n' {
                    self.put_break();
                }
                self.write_break(c);
                self.indention = true;
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                if c == '\'' {
                    self.put('\'');
                }
                self.put(c);
                self.indention = false;
                spaces = false;
                breaks = false;
            }
        }
        self.write_indicator("'", false, false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn write_double(&mut self, value: &str, allow_breaks: bool) {
        self.write_indicator("\"", true, false, false);
        let chars: Vec<char> = value.chars().collect();
        let n = chars.len();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if !yaml_is_printable(c) || c == '\u{FEFF}' || yaml_is_break(c) || c == '"' || c == '\\' {
                self.put('\\');
                let short = match c {
                    '\0' => Some('0'),
                    '\x07' => Some('a'),
                    '\x08' => Some('b'),
                    '\t' => Some('t'),
                    '\n' => Some('n'),
                    '\x0b' => Some('v'),
                    '\x0c' => Some('f'),
                    '\r' => Some('r'),
                    '\x1b' => Some('e'),
                    '"' => Some('"'),
                    '\\' => Some('\\'),
                    '\u{85}' => Some('N'),
                    '\u{A0}' => Some('_'),
                    '\u{2028}' => Some('L'),
                    '\u{2029}' => Some('P'),
                    _ => None,
                };
                match short {
                    Some(s) => self.put(s),
                    None => {
                        let u = c as u32;
                        let (prefix, width) = if u <= 0xFF {
                            ('x', 2)
                        } else if u <= 0xFFFF {
                            ('u', 4)
                        } else {
                            ('U', 8)
                        };
                        self.put(prefix);
                        for ch in format!("{u:0width$X}").chars() {
                            self.put(ch);
                        }
                    }
                }
                spaces = false;
            } else if c == ' ' {
                if allow_breaks && !spaces && self.column > BEST_WIDTH && i > 0 && i + 1 < n {
                    self.write_indent();
                    if chars[i + 1] == ' ' {
                        self.put('\\');
                    }
                } else {
                    self.put(c);
                }
                spaces = true;
            } else {
                self.put(c);
                spaces = false;
            }
        }
        self.write_indicator("\"", false, false, false);
        self.whitespace = false;
        self.indention = false;
    }

    fn write_literal(&mut self, value: &str) {
        self.write_indicator("|", true, false, false);
        let chars: Vec<char> = value.chars().collect();
        if chars.first().is_some_and(|&c| c == ' ' || yaml_is_break(c)) {
            self.write_indicator(&BEST_INDENT.to_string(), false, false, false);
        }
        let chomp = match chars.as_slice() {
            [] => Some("-"),
            [.., last] if !yaml_is_break(*last) => Some("-"),
            [_] => Some("+"),
            [.., before, _] if yaml_is_break(*before) => Some("+"),
            _ => None,
        };
        if let Some(chomp) = chomp {
            self.write_indicator(chomp, false, false, false);
        }
        self.put_break();
        self.indention = true;
        self.whitespace = true;
        let mut breaks = true;
        for c in chars {
            if yaml_is_break(c) {
                self.write_break(c);
                self.indention = true;
                breaks = true;
            } else {
                if breaks {
                    self.write_indent();
                }
                self.put(c);
                self.indention = false;
                breaks = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> Result<TemplateSet, String> {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        TemplateSet::parse(&files)
    }

    /// Renders `template` with `.Values` from `values` (YAML) and the usual
    /// top-level objects; `<no value>` removed as Helm does.
    fn render_str(template: &str, values: &str) -> Result<String, String> {
        render_files(&[("c/templates/t.yaml", template)], values)
    }

    fn render_files(files: &[(&str, &str)], values: &str) -> Result<String, String> {
        let set = set(files)?;
        let values: serde_yaml::Value = serde_yaml::from_str(values).expect("values YAML");
        let top = Value::Map(BTreeMap::from([
            ("Values".to_string(), Value::Map(values_map(&values, "values")?)),
            (
                "Release".to_string(),
                Value::Map(BTreeMap::from([
                    ("Name".to_string(), Value::Str("rel".into())),
                    ("Namespace".to_string(), Value::Str("ns".into())),
                ])),
            ),
            (
                "Chart".to_string(),
                chart_struct(&serde_yaml::from_str("name: c\nversion: 0.1.0\nappVersion: 1.2.3").unwrap())?,
            ),
        ]));
        Ok(set.execute(files[0].0, top)?.replace("<no value>", ""))
    }

    fn ok(template: &str, values: &str) -> String {
        render_str(template, values).unwrap_or_else(|e| panic!("{template:?}: {e}"))
    }

    fn err(template: &str, values: &str) -> String {
        match render_str(template, values) {
            Ok(out) => panic!("{template:?} rendered {out:?}, expected an error"),
            Err(e) => e,
        }
    }

    fn yaml(values: &str) -> String {
        let v: serde_yaml::Value = serde_yaml::from_str(values).unwrap();
        to_yaml(&from_yaml(&v, "test").unwrap()).unwrap()
    }

    #[test]
    fn trim_markers_remove_all_whitespace_on_their_side_only() {
        assert_eq!(ok("a  \n\t {{- 1 -}} \n\n  b", "{}"), "a1b");
        assert_eq!(ok("a \n{{- 1 }} \nb", "{}"), "a1 \nb");
        assert_eq!(ok("a \n{{ 1 -}} \n b", "{}"), "a \n1b");
        // `-` must be followed (or, on the right, preceded) by a space to trim:
        // `{{-1}}` is the number -1.
        assert_eq!(ok("a {{-1}} b", "{}"), "a -1 b");
        assert_eq!(ok("x\n{{- /* a comment */ -}}\ny", "{}"), "xy");
        assert_eq!(ok("x\n{{/* a comment */}}\ny", "{}"), "x\n\ny");
    }

    #[test]
    fn if_else_if_else_follow_go_truthiness() {
        let t = "{{ if .Values.a }}A{{ else if .Values.b }}B{{ else }}C{{ end }}";
        assert_eq!(ok(t, "a: 1"), "A");
        assert_eq!(ok(t, "a: 0\nb: x"), "B");
        assert_eq!(ok(t, "a: ''\nb: []"), "C");
        assert_eq!(ok(t, "a: {}\nb: false"), "C");
        assert_eq!(ok(t, "b: [0]"), "B");
        assert_eq!(ok(t, "a: null\nb: {k: v}"), "B");
        assert_eq!(ok("{{ if not .Values.x }}none{{ end }}", "{}"), "none");
        assert_eq!(
            ok("{{ and 1 0 }} {{ or 0 \"\" 3 }} {{ or 0 false }}", "{}"),
            "0 3 false"
        );
    }

    #[test]
    fn range_visits_lists_in_order_and_maps_by_sorted_key() {
        let values = "m: {zeta: 1, alpha: 2, Mid: 3}\nl: [c, a, b]";
        assert_eq!(
            ok(
                "{{ range $k, $v := .Values.m }}{{ $k }}={{ $v }};{{ end }}",
                values
            ),
            "Mid=3;alpha=2;zeta=1;"
        );
        assert_eq!(
            ok("{{ range $i, $v := .Values.l }}{{ $i }}{{ . }}{{ end }}", values),
            "0c1a2b"
        );
        assert_eq!(ok("{{ range $v := .Values.l }}{{ $v }}{{ end }}", values), "cab");
        assert_eq!(
            ok("{{ range .Values.none }}x{{ else }}empty{{ end }}", values),
            "empty"
        );
        // Variables set inside a range body go out of scope at its end; an
        // assignment to an outer one sticks.
        assert_eq!(
            ok(
                "{{ $n := 0 }}{{ range .Values.l }}{{ $n = . }}{{ end }}{{ $n }}",
                values
            ),
            "b"
        );
        let e = err("{{ range .Values.s }}x{{ end }}", "s: text");
        assert!(e.contains("range can't iterate over text"), "{e}");
    }

    #[test]
    fn with_rebinds_dot_and_dollar_stays_the_root() {
        let t = "{{ with .Values.a }}{{ .b }}-{{ $.Release.Name }}{{ else }}none{{ end }}";
        assert_eq!(ok(t, "a: {b: x}"), "x-rel");
        assert_eq!(ok(t, "a: {}"), "none");
    }

    #[test]
    fn include_and_nindent_compose_like_helm_helpers() {
        let helpers = "{{- define \"labels\" -}}\napp: {{ .Chart.Name }}\nrelease: {{ .Release.Name | quote }}\n{{- end }}";
        let t = "metadata:\n  labels:\n    {{- include \"labels\" . | nindent 4 }}\n  name: x\n";
        let out = render_files(
            &[("c/templates/t.yaml", t), ("c/templates/_helpers.tpl", helpers)],
            "{}",
        )
        .unwrap();
        assert_eq!(
            out,
            "metadata:\n  labels:\n    app: c\n    release: \"rel\"\n  name: x\n"
        );
        // `template` writes the same text in place.
        let t2 = "{{ template \"labels\" . }}";
        let out = render_files(
            &[("c/templates/t.yaml", t2), ("c/templates/_helpers.tpl", helpers)],
            "{}",
        )
        .unwrap();
        assert_eq!(out, "app: c\nrelease: \"rel\"");
        assert_eq!(
            ok("{{ \"a\\nb\" | indent 2 }}|{{ \"a\" | nindent 3 }}", "{}"),
            "  a\n  b|\n   a"
        );
    }

    #[test]
    fn to_yaml_matches_sigs_k8s_yaml() {
        assert_eq!(
            yaml("b: {z: [1, 2.5, x], x: {}}\na: [{k: v, j: [w]}, []]\nc: null"),
            "a:\n- j:\n  - w\n  k: v\n- []\nb:\n  x: {}\n  z:\n  - 1\n  - 2.5\n  - x\nc: null"
        );
        // Strings that would read back as something else are double-quoted;
        // ones plain style cannot hold are single-quoted.
        assert_eq!(
            yaml(
                "a: 'true'\nb: '8080'\nc: ''\nd: '~'\ne: 'x: y'\nf: '- z'\ng: 1h\nh: '1e3'\ni: '2024-01-31'\nj: \"it's\"\nk: ' lead'"
            ),
            "a: \"true\"\nb: \"8080\"\nc: \"\"\nd: \"~\"\ne: 'x: y'\nf: '- z'\ng: 1h\nh: \"1e3\"\ni: \"2024-01-31\"\nj: it's\nk: ' lead'"
        );
        assert_eq!(to_yaml(&Value::Str("on".into())).unwrap(), "\"on\"");
        // Multi-line strings become literal blocks with chomping indicators.
        assert_eq!(yaml("a: \"x\\ny\"\nb: \"x\\n\""), "a: |-\n  x\n  y\nb: |\n  x");
        // Numbers went through JSON: integral floats lose their fraction.
        assert_eq!(
            yaml("a: 2.0\nb: 1000000\nc: 0.5\nd: 1234567.5\ne: 1.5e7"),
            "a: 2\nb: 1000000\nc: 0.5\nd: 1.2345675e+06\ne: 15000000"
        );
        // yaml.v2 key order: numbers inside keys compare as numbers.
        assert_eq!(yaml("a10: 1\na9: 2\nb: 3\nA: 4"), "A: 4\na9: 2\na10: 1\nb: 3");
        assert_eq!(yaml("[]"), "[]");
        assert_eq!(yaml("x"), "x");
        // Long strings fold at 80 columns, as yaml.v2 does.
        let long = "word ".repeat(20);
        let folded = yaml(&format!("k: {}", long.trim()));
        assert_eq!(
            folded,
            "k: word word word word word word word word word word word word word word word word\n  word word word word"
        );
    }

    #[test]
    fn to_yaml_in_a_template_with_nindent() {
        let t =
            "spec:\n  {{- with .Values.r }}\n  resources:\n    {{- toYaml . | nindent 4 }}\n  {{- end }}\n";
        assert_eq!(
            ok(t, "r: {limits: {memory: 1Gi}, requests: {cpu: 100m}}"),
            "spec:\n  resources:\n    limits:\n      memory: 1Gi\n    requests:\n      cpu: 100m\n"
        );
        assert_eq!(ok(t, "r: {}"), "spec:\n");
    }

    #[test]
    fn required_and_fail_report_their_message_and_location() {
        let e = err("a: {{ required \"x is required\" .Values.x }}", "{}");
        assert_eq!(e, "execution error at (c/templates/t.yaml:1:6): x is required");
        let e = err("{{ required \"x is required\" .Values.x }}", "x: ''");
        assert!(e.ends_with(": x is required"), "{e}");
        assert_eq!(ok("{{ required \"x\" .Values.x }}", "x: 0"), "0");
        let e = err("\n\n{{ if true }}{{ fail \"no\" }}{{ end }}", "{}");
        assert_eq!(e, "execution error at (c/templates/t.yaml:3:16): no");
    }

    #[test]
    fn unknown_functions_and_constructs_are_errors() {
        let e = err("{{ lower \"x\" }}", "{}");
        assert!(
            e.starts_with("parse error at (c/templates/t.yaml:1): function \"lower\" not defined"),
            "{e}"
        );
        // Even where it would never run, as in Go.
        assert!(err("{{ if false }}{{ nope }}{{ end }}", "{}").contains("function \"nope\" not defined"));
        assert!(err("{{ $x }}", "{}").contains("undefined variable \"$x\""));
        assert!(err("{{ if 1 }}", "{}").contains("unexpected EOF"));
        assert!(err("{{ end }}", "{}").contains("unexpected {{end}}"));
        assert!(err("{{ block \"x\" . }}{{ end }}", "{}").contains("not supported"));
        assert!(err("{{ printf \"%5s\" \"x\" }}", "{}").contains("not supported"));
        assert!(err("{{ template \"missing\" }}", "{}").contains("template \"missing\" not defined"));
    }

    #[test]
    fn missing_values_render_empty_but_their_fields_are_errors() {
        assert_eq!(ok("[{{ .Values.missing }}]", "{}"), "[]");
        assert_eq!(ok("[{{ .Values.nil }}]", "nil: null"), "[]");
        let e = err("{{ .Values.missing.deeper }}", "{}");
        assert!(e.contains("nil pointer evaluating interface {}.deeper"), "{e}");
        // A field of an untyped nil (a variable) is nothing, as in Go.
        assert_eq!(ok("{{ $m := .Values.missing }}[{{ $m.x }}]", "{}"), "[]");
        assert!(err("{{ .Chart.Nope }}", "{}").contains("can't evaluate field Nope in type *chart.Metadata"));
        assert!(err("{{ .Values.s.x }}", "s: str").contains("can't evaluate field x in type string"));
    }

    #[test]
    fn go_types_are_checked_like_go() {
        // Values numbers are float64, template literals int: Helm's `eq` fails.
        let e = err("{{ eq .Values.num 1 }}", "num: 1");
        assert!(
            e.contains("error calling eq: incompatible types for comparison"),
            "{e}"
        );
        assert_eq!(
            ok("{{ eq (int .Values.num) 1 }} {{ eq .Values.num 1.0 }}", "num: 1"),
            "true true"
        );
        assert_eq!(
            ok(
                "{{ gt (int .Values.num) 1 }} {{ gt 2 1 }} {{ eq .Values.s \"a\" \"b\" }}",
                "num: 2\ns: b"
            ),
            "true true true"
        );
        assert_eq!(ok("{{ eq .Values.missing \"x\" }}", "{}"), "false");
        let e = err("{{ nindent 2 .Values.num }}", "num: 3");
        assert!(
            e.contains("wrong type for value; expected string; got float64"),
            "{e}"
        );
        assert!(err("{{ trunc .Values.num \"abc\" }}", "num: 2").contains("expected int; got float64"));
        assert!(err("{{ .Values.num | nindent 2 }}", "{}").contains("invalid value; expected string"));
        assert!(
            err("{{ quote }}{{ trimSuffix \"x\" }}", "{}").contains("wrong number of args for trimSuffix")
        );
        // Numbers print as Go prints float64.
        assert_eq!(
            ok(
                "{{ .Values.a }} {{ .Values.b }} {{ .Values.c }} {{ 7 }}",
                "a: 2\nb: 1000000\nc: 0.25"
            ),
            "2 1e+06 0.25 7"
        );
    }

    #[test]
    fn string_functions_follow_sprig() {
        assert_eq!(
            ok("{{ \"abcdef\" | trunc 3 }} {{ trunc -2 \"abcdef\" }}", "{}"),
            "abc ef"
        );
        assert_eq!(ok("{{ \"a-\" | trimSuffix \"-\" }}", "{}"), "a");
        assert_eq!(
            ok("{{ \"kw-control-plane\" | upper | replace \"-\" \"_\" }}", "{}"),
            "KW_CONTROL_PLANE"
        );
        assert_eq!(
            ok("{{ quote .Values.s .Values.missing 3 }}", "s: 'a\"b'"),
            "\"a\\\"b\" \"3\""
        );
        assert_eq!(
            ok(
                "{{ .Values.x | default \"d\" }} {{ default \"d\" .Values.v }}",
                "v: set"
            ),
            "d set"
        );
        assert_eq!(ok("{{ default 5 0 }} {{ default 5 .Values.z }}", "z: []"), "5 5");
        assert_eq!(
            ok(
                "{{ printf \"%s-%d-%v-%q\" \"a\" 3 .Values.f \"q\" }} {{ printf \"%d\" .Values.f }}",
                "f: 1.5"
            ),
            "a-3-1.5-\"q\" %!d(float64=1.5)"
        );
        assert_eq!(
            ok("{{ int \"42\" }} {{ int 3.9 }} {{ int .Values.missing }}", "{}"),
            "42 3 0"
        );
        assert_eq!(
            ok(
                "{{ (include \"x\" .) | quote }}{{ define \"x\" }}in{{ end }}",
                "{}"
            ),
            "\"in\""
        );
    }

    #[test]
    fn values_merge_maps_and_replace_everything_else() {
        let defaults = values_map(
            &serde_yaml::from_str("a: {b: 1, c: 2}\nl: [1, 2]\ns: x\nd: keep").unwrap(),
            "d",
        )
        .unwrap();
        let user = values_map(
            &serde_yaml::from_str("a: {c: 3}\nl: [9]\ns: null\nm: new").unwrap(),
            "u",
        )
        .unwrap();
        let merged = coalesce(defaults, user);
        let expect = values_map(
            &serde_yaml::from_str("a: {b: 1, c: 3}\nl: [9]\nd: keep\nm: new").unwrap(),
            "e",
        )
        .unwrap();
        assert_eq!(merged, expect);
        assert!(values_map(&serde_yaml::from_str("x: yes").unwrap(), "v").is_err());
        assert!(values_map(&serde_yaml::from_str("on: 1").unwrap(), "v").is_err());
    }

    #[test]
    fn objects_split_documents_and_drop_empty_ones() {
        let r = vec![Rendered {
            template: "c/templates/t.yaml".into(),
            manifest: "---\n# only a comment\n---\na: 1\n---\nb: 2\n".into(),
        }];
        let objs = objects(&r);
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1]["b"], serde_yaml::Value::from(2));
    }
}
