//! Assertions on the responses processes got, for tests.

use dvs_wire::local::LocalResponse;
use dvs_wire::{Ep, Errno, Message};

use crate::{Proc, Sim};

impl Sim {
    /// The oldest response to `p` is `want`.
    #[track_caller]
    pub fn expect(&mut self, p: Proc, want: LocalResponse) {
        assert_eq!(self.resp(p), Some(want), "response to {p:?}");
    }

    /// The oldest response to `p` is the error `e`.
    #[track_caller]
    pub fn expect_err(&mut self, p: Proc, e: Errno) {
        self.expect(p, LocalResponse::Err(e));
    }

    /// The oldest response to `p` is `Done`.
    #[track_caller]
    pub fn expect_done(&mut self, p: Proc) {
        self.expect(p, LocalResponse::Done);
    }

    /// The oldest response to `p` is a message: returns it.
    #[track_caller]
    pub fn expect_msg(&mut self, p: Proc) -> Message {
        match self.resp(p) {
            Some(LocalResponse::Msg(m)) => m,
            other => panic!("{p:?} expected a message, got {other:?}"),
        }
    }

    /// The oldest response to `p` is a message from `source` of type `mtype`.
    #[track_caller]
    pub fn expect_msg_from(&mut self, p: Proc, source: Ep, mtype: i32) -> Message {
        let m = self.expect_msg(p);
        assert_eq!((m.source, m.mtype), (source, mtype), "message to {p:?}");
        m
    }

    /// `p` has no response (it is still blocked, or never asked).
    #[track_caller]
    pub fn idle(&mut self, p: Proc) {
        assert_eq!(self.resp(p), None, "{p:?} should have no response");
    }

    /// A new process on `node` bound to `{dc, ep}` (the directory must accept).
    #[track_caller]
    pub fn bind(&mut self, node: dvs_wire::NodeId, dc: dvs_wire::DcId, ep: Ep) -> Proc {
        let p = self.connect(node);
        self.call(p, crate::req::bind(dc, ep));
        self.expect(p, LocalResponse::Ep { dc, ep, node });
        p
    }
}
