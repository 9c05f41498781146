//! Local access control: who is at the other end of a Unix socket (SO_PEERCRED), whether it
//! may send control requests (root or the configured admin group), and which endpoint the
//! node launched it for.

use std::io;

use dvs_wire::{DcId, Ep};

/// Credentials of a connected process, captured by the kernel when it called `connect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerCred {
    /// Pid in the node kernel's pid namespace (0 if the kernel did not report one).
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// The credentials of the process at the other end of `stream`.
pub(crate) fn peer_cred(stream: &tokio::net::UnixStream) -> io::Result<PeerCred> {
    let c = stream.peer_cred()?;
    Ok(PeerCred {
        pid: c.pid().unwrap_or(0),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// The admin group of the config, resolved to a gid once at start-up.
#[derive(Clone, Debug, Default)]
pub(crate) struct AdminGroup {
    /// Group name and id; `None`: root only.
    pub group: Option<(String, u32)>,
}

impl AdminGroup {
    /// Looks up `name` in the group database.
    pub fn resolve(name: Option<&str>) -> Result<AdminGroup, String> {
        let Some(name) = name else {
            return Ok(AdminGroup::default());
        };
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(AdminGroup {
                group: Some((name.to_string(), g.gid.as_raw())),
            }),
            Ok(None) => Err(format!(
                "access.admin_group: no group {name:?} on this machine"
            )),
            Err(e) => Err(format!("access.admin_group: cannot look up {name:?}: {e}")),
        }
    }

    /// The gid, if a group is configured.
    pub fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|(_, g)| *g)
    }

    /// `Ok` if `peer` may send control requests: uid 0, or a member of the admin group (its
    /// gid or one of its supplementary groups). `Err` is the message for the client.
    pub fn check_control(&self, peer: &PeerCred) -> Result<(), String> {
        if peer.uid == 0 {
            return Ok(());
        }
        if let Some((_, gid)) = &self.group {
            if peer.gid == *gid {
                return Ok(());
            }
            // The socket does not carry supplementary groups; /proc does, for a live pid.
            if peer.pid > 0 && supplementary_groups(peer.pid).is_ok_and(|g| g.contains(gid)) {
                return Ok(());
            }
        }
        Err(match &self.group {
            Some((name, gid)) => format!(
                "permission denied: control requests need root or group {name} (gid {gid}); uid {} is neither",
                peer.uid
            ),
            None => format!(
                "permission denied: control requests need root (no [access] admin_group is configured); caller has uid {}",
                peer.uid
            ),
        })
    }
}

/// The supplementary groups of process `pid` (the `Groups:` line of /proc/PID/status).
pub(crate) fn supplementary_groups(pid: i32) -> io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_groups(&status))
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The parent of process `pid`, from /proc/PID/stat.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) is in parentheses and may hold spaces; the ppid is the second
    // field after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Most ancestors looked at: launched programs sit a few levels below the node.
const MAX_DEPTH: usize = 32;

/// `pid` and its ancestors, nearest first (up to [`MAX_DEPTH`] of them, and not init): the
/// processes [`launched_for`] asks about. Reads `/proc`, so the node calls it off its loop.
pub(crate) fn ancestors(pid: i32) -> Vec<i32> {
    let mut seen = Vec::new();
    launched_for(pid, |p| {
        seen.push(p);
        None
    });
    seen
}

/// The endpoint `pid` was launched for: `launched(p)` names the endpoint of a process the
/// node launched or restored; `pid` counts if it or one of its ancestors is such a process.
pub(crate) fn launched_for(
    pid: i32,
    mut launched: impl FnMut(i32) -> Option<(DcId, Ep)>,
) -> Option<(DcId, Ep)> {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        if p <= 1 {
            return None;
        }
        if let Some(x) = launched(p) {
            return Some(x);
        }
        p = parent_pid(p)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_is_parsed() {
        let status = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 1000 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), vec![4, 24, 1000]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
    }

    #[test]
    fn root_passes_and_others_are_refused_by_default() {
        let g = AdminGroup::default();
        let root = PeerCred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        assert!(g.check_control(&root).is_ok());
        let nobody = PeerCred {
            pid: 0,
            uid: 65534,
            gid: 65534,
        };
        let e = g.check_control(&nobody).unwrap_err();
        assert!(e.starts_with("permission denied"), "{e}");
        let g = AdminGroup {
            group: Some(("ops".into(), 65534)),
        };
        assert!(g.check_control(&nobody).is_ok());
        let other = PeerCred { gid: 7, ..nobody };
        let e = g.check_control(&other).unwrap_err();
        assert!(e.contains("group ops"), "{e}");
    }

    #[test]
    fn this_process_descends_from_its_parent() {
        let me = std::process::id() as i32;
        let parent = parent_pid(me).expect("a parent");
        assert_eq!(
            launched_for(me, |p| (p == parent).then_some((0, 7))),
            Some((0, 7))
        );
        assert_eq!(launched_for(me, |_| None), None);
    }
}
