//! A guard that takes a lab a command built down again, also on error, panic, SIGINT or
//! SIGTERM: the lab's processes run in their own sessions and would outlive the command.

use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::Result;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::LabState;

/// Takes lab `name` down when dropped or on SIGINT/SIGTERM (see [`LabGuard::new`]).
pub struct LabGuard {
    /// The lab's name once [`LabGuard::up`] started building it.
    built: Arc<Mutex<Option<String>>>,
    old_mask: SigSet,
}

impl LabGuard {
    /// Blocks SIGINT and SIGTERM in the calling thread and leaves them to a watcher thread,
    /// which takes the lab down and exits 130. Create it before any other thread starts
    /// (threads inherit the mask) and drop it on the same thread.
    pub fn new() -> Result<Self> {
        let mut sigs = SigSet::empty();
        sigs.add(Signal::SIGINT);
        sigs.add(Signal::SIGTERM);
        let old_mask = sigs.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let built: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let watched = built.clone();
        thread::spawn(move || {
            if let Ok(sig) = sigs.wait() {
                // Waits for an `up` under way: the lab is whole (or gone) once it returns. The
                // lock is held until the exit: the main thread, which the `down` may wake
                // (its child killed), must not return and end the process before `down` ends.
                let mut built = watched.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(name) = built.take() {
                    eprintln!("dvs: {sig}, taking lab {name} down");
                    if let Err(e) = super::down(&name) {
                        eprintln!("dvs: lab down {name}: {e:#}");
                    }
                }
                std::process::exit(130);
            }
        });
        Ok(LabGuard { built, old_mask })
    }

    /// `dvs lab up --name NAME --hosts N`, guarded. A signal arriving meanwhile is handled
    /// once `up` returns.
    pub fn up(&self, name: &str, hosts: u16) -> Result<LabState> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        *built = Some(name.to_string());
        super::up(name, hosts)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let name = self.built.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(name) = name {
            match super::down(&name) {
                Ok(killed) => eprintln!("lab {name} down ({killed} processes killed)"),
                Err(e) => eprintln!("dvs: lab down {name}: {e:#}"),
            }
        }
        let _ = self.old_mask.thread_set_mask();
    }
}
