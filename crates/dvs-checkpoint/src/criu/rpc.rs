//! The part of criu's RPC protocol (`criu swrk`, protobuf 2 messages, one per
//! `SOCK_SEQPACKET` packet) that dvs uses. Field numbers and types follow criu's
//! `images/rpc.proto`; only the fields dvs sets or reads are declared (protobuf skips the
//! others).

/// `criu_req_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum ReqType {
    /// No request (criu's default).
    Empty = 0,
    /// Checkpoint a tree.
    Dump = 1,
    /// Restore a tree.
    Restore = 2,
    /// A notification (only when `notify_scripts` is set; dvs never sets it).
    Notify = 6,
    /// Ask criu's version (answered without touching any process).
    Version = 10,
}

/// `criu_page_server_info`: where the dump sends its pages.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PageServerInfo {
    #[prost(string, optional, tag = "1")]
    pub address: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub port: Option<i32>,
    #[prost(int32, optional, tag = "3")]
    pub pid: Option<i32>,
    /// A connected socket in the worker to send the pages on, instead of dialing.
    #[prost(int32, optional, tag = "4")]
    pub fd: Option<i32>,
}

/// `inherit_fd`: a descriptor of the worker that takes the place of an external resource.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InheritFd {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// `criu_opts`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Opts {
    /// -1: use `images_dir`.
    #[prost(int32, required, tag = "1", default = "-1")]
    pub images_dir_fd: i32,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
    /// Dump (and restore) established TCP connections with TCP repair.
    #[prost(bool, optional, tag = "5")]
    pub tcp_established: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    pub log_level: Option<i32>,
    /// A file name (no '/') in the work folder.
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    #[prost(message, optional, tag = "11")]
    pub ps: Option<PageServerInfo>,
    /// What criu does with the tree's cgroups (`CgroupMode`).
    #[prost(enumeration = "CgroupMode", optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    /// A descriptor of the caller (criu opens it through `/proc/CALLER/fd`).
    #[prost(int32, optional, tag = "17")]
    pub work_dir_fd: Option<i32>,
    /// Restore the tree as the caller's child instead of criu's.
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    /// Largest deleted file copied into the image, in bytes (criu's default: 1 MiB).
    #[prost(uint32, optional, tag = "35")]
    pub ghost_limit: Option<u32>,
    /// `--external` values, e.g. `unix[INODE]`.
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    #[prost(string, optional, tag = "68")]
    pub images_dir: Option<String>,
    /// How TCP connections are kept quiet while dumped (`NetworkLock`).
    #[prost(enumeration = "NetworkLock", optional, tag = "64")]
    pub network_lock: Option<i32>,
    #[prost(bool, optional, tag = "69")]
    pub leave_stopped: Option<bool>,
}

/// `criu_cg_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum CgroupMode {
    /// Neither dump nor restore cgroups: a restored tree joins the cgroup of the criu that
    /// restores it, the destination node's, as a process the node launches does. (Restoring
    /// the source's cgroup paths would recreate the source node's cgroups on the destination,
    /// and on cgroup v1 it costs a mount per controller on every restore.)
    Ignore = 0,
}

/// `criu_network_lock_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum NetworkLock {
    /// iptables rules (criu's default).
    Iptables = 1,
    /// nftables rules.
    Nftables = 2,
    /// No lock: dvs dumps only connections whose both ends are in the frozen tree.
    Skip = 3,
}

/// `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Req {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub opts: Option<Opts>,
}

/// `criu_dump_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DumpResp {
    #[prost(bool, optional, tag = "1")]
    pub restored: Option<bool>,
}

/// `criu_restore_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RestoreResp {
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// `criu_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Version {
    #[prost(int32, required, tag = "1")]
    pub major_number: i32,
    #[prost(int32, required, tag = "2")]
    pub minor_number: i32,
    #[prost(int32, optional, tag = "4")]
    pub sublevel: Option<i32>,
}

/// `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Resp {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    #[prost(message, optional, tag = "3")]
    pub dump: Option<DumpResp>,
    #[prost(message, optional, tag = "4")]
    pub restore: Option<RestoreResp>,
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
    #[prost(message, optional, tag = "10")]
    pub version: Option<Version>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_dump_request_encodes_the_fields_criu_reads() {
        let req = Req {
            r#type: ReqType::Dump as i32,
            opts: Some(Opts {
                images_dir_fd: -1,
                pid: Some(42),
                images_dir: Some("/x".into()),
                external: vec!["unix[7]".into()],
                leave_stopped: Some(true),
                ..Default::default()
            }),
        };
        let bytes = req.encode_to_vec();
        let back = Req::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
        // type = 1 (field 1, varint), then opts (field 2, length-delimited).
        assert_eq!(&bytes[..2], &[0x08, 0x01]);
        assert_eq!(bytes[2], 0x12);
    }

    #[test]
    fn a_failed_answer_decodes() {
        let resp = Resp {
            r#type: ReqType::Restore as i32,
            success: false,
            cr_errno: Some(2),
            cr_errmsg: Some("no such file".into()),
            ..Default::default()
        };
        let back = Resp::decode(resp.encode_to_vec().as_slice()).unwrap();
        assert!(!back.success);
        assert_eq!(back.cr_errmsg.as_deref(), Some("no such file"));
    }
}
