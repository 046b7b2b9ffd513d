//! The agent API on a Unix socket (`crate::api`): one request per
//! connection, handled off the async runtime, one at a time against the
//! registry.
use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::service::Agent;
use crate::{
    agent::error::{Error, Result},
    api::{self, MAX_MESSAGE, Request, Response, code},
};

/// Binds `path`, a socket of mode 0600 from the moment it exists (no
/// window between bind and chmod in which anyone could connect), in a
/// directory created 0700 if missing; an existing directory that others
/// may write to (without the sticky bit) is refused, as they could swap
/// the socket. A socket file left there is stale: the caller holds the
/// agent lock, so no other agent serves it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mode = std::fs::metadata(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(Error::SocketDir {
                dir: dir.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    let _ = std::fs::remove_file(path);
    let l =
        bind_0600(path).map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    l.set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))
}

/// bind(2) under umask 0177, so the socket is born 0600. The umask is the
/// process's (threads share it): a thread with a copy of its own
/// (unshare(CLONE_FS)) sets it, leaving the other threads' files alone.
fn bind_0600(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
            // SAFETY: umask(2) cannot fail; it affects only this thread's copy.
            unsafe { libc::umask(0o177) };
            std::os::unix::net::UnixListener::bind(path)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent).await {
                        debug!("agent API connection: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("agent API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, agent: Arc<Agent>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = Vec::new();
    let mut r = BufReader::new(r.take(MAX_MESSAGE as u64 + 1));
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_until(b'\n', &mut line)).await;
    let resp = match read {
        Err(_) => Response::error(code::OTHER, "no request within 10 s"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_MESSAGE => {
            Response::error(code::INVALID_CONFIG, api::ApiError::TooLong.to_string())
        }
        Ok(Ok(_)) => match api::parse_request(&line) {
            Err(e) => Response::error(code::INVALID_CONFIG, e.to_string()),
            Ok(req) => tokio::task::spawn_blocking(move || answer(&agent, req))
                .await
                .unwrap_or_else(|e| {
                    Response::error(code::OTHER, format!("agent task failed: {e}"))
                }),
        },
    };
    w.write_all(&api::encode_response(&resp)).await?;
    w.shutdown().await
}

fn answer(agent: &Agent, req: Request) -> Response {
    debug!(?req, "agent API request");
    match req {
        Request::Add { id, target } => match agent.add(&id, &target) {
            Ok(()) => Response::ok(),
            Err(f) => Response::error(f.code, f.error),
        },
        Request::Del { id } => match agent.del(&id) {
            Ok(()) => Response::ok(),
            Err(f) => Response::error(f.code, f.error),
        },
        Request::Check { id } => {
            let reg = agent.lock();
            match reg.check(&id).or_else(|| agent.waiting().state(&id)) {
                None => Response::error(code::NOT_FOUND, format!("no target {id} on this agent")),
                Some(state) if state == "OK" => Response {
                    state: Some(state),
                    ..Response::ok()
                },
                Some(state) => Response {
                    state: Some(state.clone()),
                    ..Response::error(code::OTHER, format!("target {id} is {state}"))
                },
            }
        }
        Request::List => {
            let mut all = agent.lock().statuses();
            all.extend(agent.waiting().statuses());
            Response::targets(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        os::unix::fs::MetadataExt as _,
        sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        },
    };

    use super::*;

    /// Runs `f` in a thread whose umask is 0 (a copy of its own), as a
    /// careless service manager could start the agent.
    fn with_umask_0<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).unwrap();
                // SAFETY: umask(2) cannot fail; this thread's copy only.
                unsafe { libc::umask(0) };
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// Under umask 0 the socket still never exists with another mode than
    /// 0600 (a thread stats it all along, over 3000 binds, which in a trial
    /// run caught the old bind-then-chmod's 0777), and missing
    /// directories are made 0700.
    #[test]
    fn the_socket_is_born_0600_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("run/tproxy/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = Mutex::new(BTreeSet::new());
        let stop = AtomicBool::new(false);
        with_umask_0(|| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(m) = std::fs::symlink_metadata(&sock) {
                            seen.lock().unwrap().insert(m.mode() & 0o7777);
                        }
                    }
                });
                for _ in 0..3000 {
                    let _rt = rt.enter();
                    let l = bind(&sock).unwrap();
                    assert_eq!(mode(&sock), 0o600);
                    drop(l);
                }
                stop.store(true, Ordering::Relaxed);
            });
        });
        let seen = seen.into_inner().unwrap();
        assert_eq!(
            seen.iter().map(|m| format!("{m:o}")).collect::<Vec<_>>(),
            ["600"],
            "modes the socket had"
        );
        assert_eq!(mode(&tmp.path().join("run")), 0o700);
        assert_eq!(mode(&tmp.path().join("run/tproxy")), 0o700);
    }

    /// A directory others may write to is refused (they could replace the
    /// socket), unless sticky as /tmp; one line naming it and the fix.
    #[test]
    fn a_directory_others_may_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _rt = rt.enter();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&open.join("agent.sock")).unwrap_err().to_string();
        assert!(
            e.contains(&open.display().to_string()) && e.contains("777") && e.contains("--socket"),
            "{e}"
        );
        assert!(!open.join("agent.sock").exists());
        let sticky = tmp.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        bind(&sticky.join("agent.sock")).unwrap();
        assert_eq!(mode(&sticky.join("agent.sock")), 0o600);
    }
}
