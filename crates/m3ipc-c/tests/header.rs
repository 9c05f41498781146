//! Checks `include/m3ipc.h` against the Rust side: a C program compiled against the header
//! and linked with the static library prints the size and offset of every message field, the
//! value and text of every error code and the constants; each must be what the Rust library
//! uses. The header must also declare every exported function and name no code or field the
//! Rust side does not know.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use m3ipc_c::codes::CODES;
use m3ipc_c::message::{FIELDS, M3_STRING, MESSAGE_SIZE};

const HEADER: &str = include_str!("../include/m3ipc.h");
const LIB_RS: &str = include_str!("../src/lib.rs");

/// The static library cargo built for this test (the crate's own artifacts).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps folder");
    let lib = deps.join("libm3ipc_c.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    lib
}

/// Compiles `source` against the header and the static library, runs it and returns what
/// it printed.
fn run_c(dir: &Path, source: &str) -> String {
    let src = dir.join("check.c");
    std::fs::write(&src, source).expect("write C source");
    let exe = dir.join("check");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg(&src)
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run the C program");
    assert!(run.status.success(), "the C program failed");
    String::from_utf8(run.stdout).expect("UTF-8 output")
}

fn c_program() -> String {
    let mut body = String::new();
    body += "    printf(\"size %zu\\n\", sizeof(message));\n";
    for f in FIELDS {
        body += &format!(
            "    printf(\"field {0} %zu %zu\\n\", offsetof(message, {0}), sizeof(m.{0}));\n",
            f.name
        );
    }
    for c in CODES {
        body += &format!(
            "    printf(\"code {0} %d %s\\n\", {0}, dvk_strerror({0}));\n",
            c.name
        );
    }
    for k in [
        "ANY",
        "NONE",
        "SELF",
        "NOTIFY_MTYPE",
        "M3_STRING",
        "M3IPC_PAYLOAD",
        "OK",
    ] {
        body += &format!("    printf(\"const {k} %ld\\n\", (long)({k}));\n");
    }
    body += "    printf(\"const TIMEOUT_FOREVER %ld\\n\", TIMEOUT_FOREVER);\n";
    body += "    printf(\"const TIMEOUT_NOWAIT %ld\\n\", TIMEOUT_NOWAIT);\n";
    body += "    printf(\"words %zu\\n\", offsetof(message, m_word));\n";
    format!(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"m3ipc.h\"\n\nint main(void) {{\n    message m;\n    (void)m;\n{body}    return 0;\n}}\n"
    )
}

#[test]
fn the_header_matches_the_rust_layout_codes_and_constants() {
    let dir = tempfile::tempdir().expect("temp dir");
    let printed = run_c(dir.path(), &c_program());
    let mut lines = printed.lines();
    assert_eq!(lines.next(), Some(format!("size {MESSAGE_SIZE}").as_str()));
    for f in FIELDS {
        let want = format!("field {} {} {}", f.name, f.offset, f.size);
        assert_eq!(
            lines.next(),
            Some(want.as_str()),
            "C and Rust disagree on {}",
            f.name
        );
    }
    for c in CODES {
        let want = format!(
            "code {} {} {}",
            c.name,
            c.value,
            c.text.trim_end_matches('\0')
        );
        assert_eq!(lines.next(), Some(want.as_str()));
    }
    let consts = [
        ("ANY", m3ipc_c::ANY as i64),
        ("NONE", m3ipc_c::NONE as i64),
        ("SELF", m3ipc_c::SELF as i64),
        ("NOTIFY_MTYPE", m3ipc::NOTIFY_MTYPE as i64),
        ("M3_STRING", M3_STRING as i64),
        ("M3IPC_PAYLOAD", m3ipc::MSG_PAYLOAD as i64),
        ("OK", 0),
        ("TIMEOUT_FOREVER", m3ipc_c::TIMEOUT_FOREVER),
        ("TIMEOUT_NOWAIT", m3ipc_c::TIMEOUT_NOWAIT),
    ];
    for (k, v) in consts {
        assert_eq!(lines.next(), Some(format!("const {k} {v}").as_str()));
    }
    let words = format!("words {}", m3ipc_c::message::WORDS_OFFSET);
    assert_eq!(lines.next(), Some(words.as_str()));
    assert_eq!(lines.next(), None);
}

/// Names defined by `#define PREFIX...` lines of the header.
fn defines(prefix: &str) -> BTreeSet<String> {
    HEADER
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_header_names_exactly_the_rust_codes_and_fields() {
    let codes: BTreeSet<String> = CODES.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(defines("EDVS"), codes);
    let fields: BTreeSet<String> = FIELDS
        .iter()
        .map(|f| f.name.to_string())
        .filter(|n| n != "m_source" && n != "m_type")
        .collect();
    let mut header_fields = BTreeSet::new();
    for d in 1..=9 {
        header_fields.extend(defines(&format!("m{d}_")));
    }
    assert_eq!(header_fields, fields);
}

#[test]
fn the_header_declares_every_exported_function() {
    let exported: Vec<&str> = LIB_RS
        .lines()
        .filter_map(|l| l.split("extern \"C\" fn ").nth(1))
        .filter_map(|l| l.split('(').next())
        .collect();
    assert!(exported.len() >= 18, "found only {exported:?}");
    for f in exported {
        let declared = HEADER
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains(&format!(" {f}(")) || l.contains(&format!("*{f}(")));
        assert!(declared, "m3ipc.h does not declare {f}");
    }
}
