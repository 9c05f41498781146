//! Property tests of the config parser: random text and valid configs bent out of shape
//! (values flipped, keys dropped or renamed, unicode, `..` in paths, huge numbers) never panic
//! `ClusterConfig::parse`, and every error names the file it was given and, for a refused
//! value, a key of the config.

use std::path::Path;

use dvs_config::{ClusterConfig, ConfigError};
use proptest::prelude::*;

/// The path every error must name (spaces and non-ASCII included on purpose).
const PATH: &str = "/etc/dvs/fuzz cfg ü.toml";

/// A valid config with every section.
const GOOD: &str = r#"cluster_id = "fuzz"

[directory]
kind = "embedded"
path = "/tmp/dvs/directory"

[link]
compression = "lz4"
heartbeat_ms = 250
dead_after_ms = 1500
reconnect_ms = 50
tls = true

[tls]
dir = "/etc/dvs/tls"
revoked = ["5a1f", "00ff"]

[access]
admin_group = "dvs"

[[node]]
id = 0
name = "node0"
peer_addr = "127.0.0.1:7400"
runtime_dir = "/tmp/dvs/node0"

[[node]]
id = 1
name = "node1"
peer_addr = "127.0.0.1:7401"
runtime_dir = "/tmp/dvs/node1"

[[dc]]
id = 0
name = "dc0"
nodes = [0, "node1"]
max_endpoints = 256
max_queue = 64
bind_uids = [0, 1000]
"#;

/// Top-level names an `Invalid` key may start with.
const SECTIONS: &[&str] = &[
    "cluster_id",
    "directory",
    "link",
    "tls",
    "access",
    "node",
    "dc",
];

/// Values put in place of a value of the config.
const ODD_VALUES: &[&str] = &[
    "0",
    "-1",
    "65535",
    "65536",
    "4294967296",
    "9223372036854775807",
    "99999999999999999999999999",
    "-9223372036854775808",
    "1e308",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"..\"",
    "\"../../etc\"",
    "\"/tmp/../../etc/dvs\"",
    "\"relative/dir\"",
    "\"/tmp/a\\u0000b\"",
    "\"caf\u{e9} \u{1f980} \u{202e}\"",
    "\"node0\"",
    "\"127.0.0.1:99999\"",
    "\"[::1]:7400\"",
    "[]",
    "[0, 0]",
    "[\"nope\"]",
    "{}",
    "{ kind = \"etcd\", endpoints = [] }",
    "1979-05-27T07:32:00Z",
];

/// One change to the config text.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value on the `n`th `key = value` line.
    Value(usize, usize),
    /// Drop the `n`th line.
    DropLine(usize),
    /// Rename the key on the `n`th `key = value` line.
    Rename(usize, String),
    /// Duplicate the `n`th line.
    Duplicate(usize),
    /// Insert text at a byte position (rounded down to a char boundary).
    Insert(usize, String),
    /// Cut the text at a byte position.
    Truncate(usize),
    /// Append a whole section.
    Section(usize),
}

const EXTRA_SECTIONS: &[&str] = &[
    "[[node]]\nid = 0\nname = \"node0\"\npeer_addr = \"127.0.0.1:7400\"\nruntime_dir = \"/tmp/x\"\n",
    "[[node]]\nid = 7\nname = \"7\"\npeer_addr = \"127.0.0.1:7407\"\nruntime_dir = \"/tmp/x\"\n",
    "[[dc]]\nid = 0\nname = \"dc0\"\nnodes = [0]\n",
    "[[dc]]\nid = 9\nname = \"dc9\"\nnodes = [\"zz\", 0]\n",
    "[[dc]]\nid = 9\nname = \"dc9\"\nnodes = []\n",
    "[directory]\nkind = \"etcd\"\nendpoints = [\"http://x\"]\n",
    "[unknown]\nx = 1\n",
    "[tls]\nrevoked = [\"xyz\"]\n",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 0..ODD_VALUES.len()).prop_map(|(l, v)| Mutation::Value(l, v)),
        2 => any::<usize>().prop_map(Mutation::DropLine),
        1 => (any::<usize>(), "[a-z_]{1,12}|\\PC{1,4}").prop_map(|(l, k)| Mutation::Rename(l, k)),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => (any::<usize>(), "\\PC{0,6}|[\\[\\]=\"',.{}\n]{1,3}")
            .prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (0..EXTRA_SECTIONS.len()).prop_map(Mutation::Section),
    ]
}

fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let assignments: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].contains(" = "))
        .collect();
    match m {
        Mutation::Value(l, v) if !assignments.is_empty() => {
            let i = assignments[l % assignments.len()];
            let key = lines[i].split(" = ").next().unwrap_or_default().to_string();
            lines[i] = format!("{key} = {}", ODD_VALUES[*v]);
        }
        Mutation::Rename(l, k) if !assignments.is_empty() => {
            let i = assignments[l % assignments.len()];
            let value = lines[i].split_once(" = ").map(|(_, v)| v.to_string());
            lines[i] = format!("{k} = {}", value.unwrap_or_default());
        }
        Mutation::DropLine(l) if !lines.is_empty() => {
            let n = lines.len();
            lines.remove(l % n);
        }
        Mutation::Duplicate(l) if !lines.is_empty() => {
            let i = l % lines.len();
            let copy = lines[i].clone();
            lines.insert(i, copy);
        }
        Mutation::Insert(i, s) => {
            let mut t = text.to_string();
            t.insert_str(floor_boundary(&t, *i), s);
            return t;
        }
        Mutation::Truncate(i) => return text[..floor_boundary(text, *i)].to_string(),
        Mutation::Section(s) => return format!("{text}\n{}", EXTRA_SECTIONS[*s]),
        _ => {}
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Parses `text` and checks what an error says.
fn check(text: &str) -> Result<(), TestCaseError> {
    let path = Path::new(PATH);
    match ClusterConfig::parse(text, path) {
        Ok(cfg) => {
            // A config that parses also survives its own serialization.
            let again = ClusterConfig::parse(&cfg.to_toml(), path)
                .map_err(|e| TestCaseError::fail(format!("re-parse of a valid config: {e}")))?;
            prop_assert_eq!(again, cfg);
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.contains(PATH), "the path is not named: {}", msg);
            match &e {
                ConfigError::Invalid { key, path: p, .. } => {
                    prop_assert_eq!(p.as_path(), path);
                    prop_assert!(
                        msg.contains(&format!("`{key}`")),
                        "the key is not named: {}",
                        msg
                    );
                    let section = key.split(['.', '[']).next().unwrap_or_default();
                    prop_assert!(
                        SECTIONS.contains(&section),
                        "{:?} is not a key of the config: {}",
                        key,
                        msg
                    );
                }
                ConfigError::Parse { path: p, message } => {
                    prop_assert_eq!(p.as_path(), path);
                    prop_assert!(
                        !message.contains('\n'),
                        "a multi-line message: {:?}",
                        message
                    );
                }
                ConfigError::Io { .. } => prop_assert!(false, "parse did I/O: {}", msg),
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,300}") {
        check(&text)?;
    }

    /// Text made of TOML's own characters and words, to get past the first token.
    #[test]
    fn toml_like_text_never_panics(
        text in "([a-z_]{1,10} = (\"[^\"\n]{0,12}\"|-?[0-9]{1,25}|true|\\[[0-9, \"a-z]{0,10}\\])\n|\\[\\[?(node|dc|link|tls|access|directory)\\]\\]?\n){0,20}"
    ) {
        check(&text)?;
    }

    #[test]
    fn mutated_configs_never_panic(ms in proptest::collection::vec(mutation(), 1..5)) {
        let mut text = GOOD.to_string();
        for m in &ms {
            text = mutate(&text, m);
        }
        check(&text)?;
    }
}

#[test]
fn the_base_config_is_valid() {
    let cfg = ClusterConfig::parse(GOOD, Path::new(PATH)).expect("GOOD parses");
    assert_eq!(cfg.nodes.len(), 2);
    assert_eq!(cfg.dcs[0].max_endpoints, 256);
}

/// Specific shapes of the mutations above, each refused with the key named.
#[test]
fn hostile_values_name_their_key() {
    let long_dc_name = format!("name = \"{}\"", "d".repeat(65));
    for (from, to, key) in [
        ("cluster_id = \"fuzz\"", "cluster_id = \"..\"", "cluster_id"),
        ("name = \"node1\"", "name = \"../node1\"", "node[1].name"),
        (
            "runtime_dir = \"/tmp/dvs/node1\"",
            "runtime_dir = \"tmp/../node1\"",
            "node[1].runtime_dir",
        ),
        ("dir = \"/etc/dvs/tls\"", "dir = \"etc/dvs/tls\"", "tls.dir"),
        (
            "max_endpoints = 256",
            "max_endpoints = 4294967295",
            "dc[0].max_endpoints",
        ),
        ("max_queue = 64", "max_queue = 0", "dc[0].max_queue"),
        (
            "dead_after_ms = 1500",
            "dead_after_ms = 250",
            "link.dead_after_ms",
        ),
        (
            "admin_group = \"dvs\"",
            "admin_group = \"1000\"",
            "access.admin_group",
        ),
        ("\"5a1f\"", "\"5a1g\"", "tls.revoked[0]"),
        ("name = \"dc0\"", &long_dc_name, "dc[0].name"),
    ] {
        let text = GOOD.replacen(from, to, 1);
        assert_ne!(text, GOOD, "{from} not in the base config");
        match ClusterConfig::parse(&text, Path::new(PATH)) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{to}"),
            other => panic!("{to}: {other:?}"),
        }
    }
    // Numbers beyond a field's type are parse errors, naming the file.
    for (from, to) in [
        ("id = 1\n", "id = 65536\n"),
        (
            "heartbeat_ms = 250",
            "heartbeat_ms = 99999999999999999999999",
        ),
        ("bind_uids = [0, 1000]", "bind_uids = [-1]"),
    ] {
        let e = ClusterConfig::parse(&GOOD.replacen(from, to, 1), Path::new(PATH)).unwrap_err();
        assert!(
            matches!(e, ConfigError::Parse { .. }) && e.to_string().contains(PATH),
            "{to}: {e}"
        );
    }
}
