//! The backend-independent directory tests (`common/conformance.rs`) on the embedded
//! directory. Its own internals (the change log, the watcher thread, a corrupt state file)
//! are tested in `src/embedded/tests.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::conformance::Store;
use dvs_directory::{Directory, EmbeddedDirectory};

/// A fresh directory folder; each handle opens it anew, as another process would.
struct Embedded(tempfile::TempDir);

impl Store for Embedded {
    fn handle(&self) -> Arc<dyn Directory> {
        Arc::new(EmbeddedDirectory::open(self.0.path()).unwrap())
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_millis(500)
    }
}

fn embedded(_test: &str) -> Option<Embedded> {
    Some(Embedded(tempfile::tempdir().unwrap()))
}

conformance_tests!(embedded);
