//! The agent API on a Unix socket (`agent_api`): one request per
//! connection, handled off the async runtime, one at a time against the
//! registry.
use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::Agent;
use crate::{
    Error, Result,
    agent_api::{self, MAX_MESSAGE, Request, Response, code},
};

/// Binds `path` (mode 0600). A socket file left there is stale: the
/// caller holds the agent lock, so no other agent serves it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
    Ok(l)
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
        Ok(Ok(_)) if line.len() > MAX_MESSAGE => Response::error(
            code::INVALID_CONFIG,
            agent_api::ApiError::TooLong.to_string(),
        ),
        Ok(Ok(_)) => match agent_api::parse_request(&line) {
            Err(e) => Response::error(code::INVALID_CONFIG, e.to_string()),
            Ok(req) => tokio::task::spawn_blocking(move || answer(&agent, req))
                .await
                .unwrap_or_else(|e| {
                    Response::error(code::OTHER, format!("agent task failed: {e}"))
                }),
        },
    };
    w.write_all(&agent_api::encode_response(&resp)).await?;
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
            match reg.check(&id) {
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
        Request::List => Response::targets(agent.lock().statuses()),
    }
}
