//! Property tests of the control-request decoder: the node reads one JSON object per line of
//! `ctl.sock` into a [`CtlRequest`]. Whatever the line holds (random bytes, or a valid request
//! bent out of shape), decoding returns a value or an error and never panics; every valid
//! request comes back the same from its own encoding.

use dvs_node::ctl::CtlRequest;
use proptest::prelude::*;

/// Any request, with values over each field's whole range.
fn request() -> impl Strategy<Value = CtlRequest> {
    prop_oneof![
        Just(CtlRequest::Status),
        Just(CtlRequest::Ps),
        Just(CtlRequest::Shutdown),
        Just(CtlRequest::Doctor),
        (
            any::<u16>(),
            any::<i32>(),
            proptest::collection::vec(".{0,16}", 0..4),
            any::<bool>()
        )
            .prop_map(|(dc, ep, cmd, wait)| CtlRequest::Run {
                dc,
                ep,
                cmd,
                wait,
                workdir: (ep % 2 == 0).then(|| format!("/srv/app{ep}")),
            }),
        (
            any::<u16>(),
            any::<i32>(),
            any::<u16>(),
            proptest::option::of(prop_oneof![
                Just(dvs_wire::peer::Backend::Criu),
                Just(dvs_wire::peer::Backend::Cooperative)
            ]),
            proptest::option::of(prop_oneof![
                Just(dvs_wire::peer::FailAt::Checkpoint),
                Just(dvs_wire::peer::FailAt::Transfer),
                Just(dvs_wire::peer::FailAt::Restore)
            ]),
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(dc, ep, to, backend, fail_at, quiesce_ms)| CtlRequest::Migrate {
                    dc,
                    ep,
                    to,
                    backend,
                    fail_at,
                    quiesce_ms,
                }
            ),
        (any::<u16>(), any::<i32>(), any::<u16>(), any::<bool>())
            .prop_map(|(dc, ep, at, backup)| CtlRequest::Register { dc, ep, at, backup }),
    ]
}

/// The request as the CLI sends it (one JSON line, without the newline).
fn line(r: &CtlRequest) -> String {
    serde_json::to_string(r).expect("requests serialize")
}

/// Values a field may be replaced with: other types, out-of-range numbers, odd strings.
const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "-1",
    "65536",
    "4294967296",
    "18446744073709551616",
    "-9223372036854775809",
    "1e400",
    "1.5",
    "\"\"",
    "\"../../etc/passwd\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"é𝄞\u{202e}\"",
    "[]",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "{}",
    "{\"op\":\"status\"}",
];

/// One mutation of a request line.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value of the `n`th key with an odd value.
    Replace(usize, usize),
    /// Drop the `n`th key and its value.
    Drop(usize),
    /// Repeat the `n`th key (with an odd value the second time).
    Repeat(usize, usize),
    /// Insert text at a byte position (rounded down to a char boundary).
    Insert(usize, String),
    /// Cut the line at a byte position.
    Truncate(usize),
    /// Change the `op` to another (maybe unknown) name.
    Op(String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let odd = 0..ODD_VALUES.len();
    prop_oneof![
        (0..8usize, odd.clone()).prop_map(|(k, v)| Mutation::Replace(k, v)),
        (0..8usize).prop_map(Mutation::Drop),
        (0..8usize, odd).prop_map(|(k, v)| Mutation::Repeat(k, v)),
        (any::<usize>(), "\\PC{0,8}|[\\[\\]{}\",:\\\\]{1,4}")
            .prop_map(|(i, s)| Mutation::Insert(i, s)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop_oneof![
            Just("status".to_string()),
            Just("migrate".to_string()),
            Just("Run".to_string()),
            Just("".to_string()),
            ".{0,10}"
        ]
        .prop_map(Mutation::Op),
    ]
}

fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Applies `m` to the JSON object of `line`, working on its parsed form where it can.
fn mutate(line: &str, m: &Mutation) -> String {
    let mut obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(line).expect("a request line is a JSON object");
    let keys: Vec<String> = obj.keys().cloned().collect();
    let odd = |v: usize| ODD_VALUES[v];
    // Text of an object with `fields` (raw JSON values), so that odd values go in verbatim.
    let render = |fields: &[(String, String)]| {
        let inner: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::String(k.clone())))
            .collect();
        format!("{{{}}}", inner.join(","))
    };
    let mut fields: Vec<(String, String)> = obj
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    if keys.is_empty() && matches!(m, Mutation::Replace(..) | Mutation::Drop(_)) {
        return line.to_string();
    }
    if keys.is_empty() {
        fields.push(("op".into(), "\"status\"".into()));
    }
    match m {
        Mutation::Replace(k, v) => {
            let n = fields.len();
            fields[k % n].1 = odd(*v).to_string();
            render(&fields)
        }
        Mutation::Drop(k) => {
            obj.remove(&keys[k % keys.len()]);
            serde_json::Value::Object(obj).to_string()
        }
        Mutation::Repeat(k, v) => {
            let key = fields[k % fields.len()].0.clone();
            fields.push((key, odd(*v).to_string()));
            render(&fields)
        }
        Mutation::Insert(i, s) => {
            let mut l = line.to_string();
            l.insert_str(floor_boundary(&l, *i), s);
            l
        }
        Mutation::Truncate(i) => line[..floor_boundary(line, *i)].to_string(),
        Mutation::Op(op) => {
            obj.insert("op".into(), serde_json::Value::String(op.clone()));
            serde_json::Value::Object(obj).to_string()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random bytes, as the node reads them off the socket.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<CtlRequest>(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = serde_json::from_str::<CtlRequest>(text);
        }
    }

    /// Random text made of JSON's own characters (more likely to get deep into the parser).
    #[test]
    fn json_like_text_never_panics(text in "[\\[\\]{}\",:0-9a-z_ .\\-\\\\eE+]{0,200}") {
        let _ = serde_json::from_str::<CtlRequest>(&text);
    }

    /// Every request decodes back to itself.
    #[test]
    fn valid_requests_round_trip(r in request()) {
        let l = line(&r);
        let back: CtlRequest = serde_json::from_str(&l)
            .map_err(|e| TestCaseError::fail(format!("{l}: {e}")))?;
        prop_assert_eq!(line(&back), l);
        // With the newline the CLI sends, as the node reads it.
        let back: CtlRequest = serde_json::from_slice(format!("{}\n", line(&r)).as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(line(&back), line(&r));
    }

    /// Valid requests with up to three mutations never panic the decoder; what still decodes
    /// encodes to a line that decodes to the same request.
    #[test]
    fn mutated_requests_never_panic(
        r in request(),
        ms in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut l = line(&r);
        for m in &ms {
            // Later mutations work on the object; once the text is no longer one, insert
            // and truncate still apply.
            l = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&l) {
                Ok(_) => mutate(&l, m),
                Err(_) => match m {
                    Mutation::Insert(i, s) => {
                        let mut t = l.clone();
                        t.insert_str(floor_boundary(&t, *i), s);
                        t
                    }
                    Mutation::Truncate(i) => l[..floor_boundary(&l, *i)].to_string(),
                    _ => l,
                },
            };
        }
        if let Ok(decoded) = serde_json::from_str::<CtlRequest>(&l) {
            let again: CtlRequest = serde_json::from_str(&line(&decoded))
                .map_err(|e| TestCaseError::fail(format!("{l}: {e}")))?;
            prop_assert_eq!(line(&again), line(&decoded));
        }
    }
}

/// A few lines the node must refuse, named explicitly (sanity of the properties above).
#[test]
fn hostile_lines_are_errors() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for l in [
        "",
        "{}",
        "{\"op\":\"nope\"}",
        "{\"op\":\"run\",\"dc\":0,\"ep\":1,\"cmd\":\"sh\",\"wait\":false}",
        "{\"op\":\"run\",\"dc\":65536,\"ep\":1,\"cmd\":[],\"wait\":false}",
        "{\"op\":\"migrate\",\"dc\":0,\"ep\":1,\"to\":-1}",
        "{\"op\":\"register\",\"dc\":0,\"ep\":2147483648,\"at\":0,\"backup\":true}",
        "{\"op\":\"status\"",
        "\"status\"",
        &deep,
    ] {
        assert!(
            serde_json::from_str::<CtlRequest>(l).is_err(),
            "{} decoded",
            &l[..l.len().min(80)]
        );
    }
    // Unknown fields are ignored, as the CLI of a newer version may send them.
    assert!(matches!(
        serde_json::from_str::<CtlRequest>("{\"op\":\"status\",\"extra\":1}"),
        Ok(CtlRequest::Status)
    ));
}
