//! Injected faults: requests matching a method, a path prefix and optionally watch or not are
//! answered with an error Status, as a real API server under load or in trouble would, a
//! number of times or until cleared.
//!
//! The answers carry the real server's Status bodies (`apimachinery/pkg/api/errors`):
//! `NewTooManyRequests` (429, reason `TooManyRequests`, `details.retryAfterSeconds` and a
//! `Retry-After` header, which the real server sets from it), `NewInternalError` (500,
//! `Internal error occurred: ...` with the cause in `details.causes`),
//! `NewServiceUnavailable` (503) and `NewUnauthorized` (401, `Unauthorized`). One difference:
//! a real server's *rate limiter* (max-in-flight, priority and fairness) answers its 429 as
//! plain text (`Too many requests, please try again later.`) with `Retry-After: 1`, not as a
//! Status; kube's client turns both into an `Error::Api` with code 429. These bodies follow
//! apimachinery's constructors; they were not compared with a live server, which cannot be
//! made to produce them on demand.
//!
//! kube's default client (`Config::default_retry`) itself retries 429, 503 and 504 up to 15
//! times, waiting `Retry-After` when the server gives one: to see those errors, a client needs
//! `default_retry = false`, or a fault that outlasts its retries.
//!
//! A fault answers before authentication and authorization (such requests are not in the RBAC
//! report), after the outage of [`FakeApi::set_down`](super::FakeApi::set_down).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use serde_json::{Value, json};

/// What a fault answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAnswer {
    /// 429 `TooManyRequests`, `Retry-After: S` and `details.retryAfterSeconds: S`.
    TooManyRequests { retry_after_seconds: u32 },
    /// 500 `InternalError`.
    InternalError,
    /// 503 `ServiceUnavailable`.
    ServiceUnavailable,
    /// 401 `Unauthorized`, as for an expired token.
    Unauthorized,
}

/// A fault to [`inject`](super::FakeApi::inject): by default it answers every request, for
/// ever; narrow it with [`on`](Fault::on), [`watch`](Fault::watch) and
/// [`times`](Fault::times).
#[derive(Clone, Debug)]
pub struct Fault {
    answer: FaultAnswer,
    method: Option<Method>,
    path_prefix: String,
    watch: Option<bool>,
    times: Option<usize>,
    message: Option<String>,
}

impl Fault {
    pub fn new(answer: FaultAnswer) -> Fault {
        Fault {
            answer,
            method: None,
            path_prefix: "/".to_owned(),
            watch: None,
            times: None,
            message: None,
        }
    }

    /// 429 with `Retry-After: retry_after_seconds`.
    pub fn too_many_requests(retry_after_seconds: u32) -> Fault {
        Fault::new(FaultAnswer::TooManyRequests {
            retry_after_seconds,
        })
    }

    /// 500 `InternalError`.
    pub fn internal_error() -> Fault {
        Fault::new(FaultAnswer::InternalError)
    }

    /// 503 `ServiceUnavailable`.
    pub fn service_unavailable() -> Fault {
        Fault::new(FaultAnswer::ServiceUnavailable)
    }

    /// 401 `Unauthorized`.
    pub fn unauthorized() -> Fault {
        Fault::new(FaultAnswer::Unauthorized)
    }

    /// Only requests with this method and a path (without the query) starting with
    /// `path_prefix`, e.g. `(Method::GET, "/api/v1/services")`.
    pub fn on(mut self, method: Method, path_prefix: &str) -> Fault {
        self.method = Some(method);
        self.path_prefix = path_prefix.to_owned();
        self
    }

    /// Only watches (`true`: `?watch=true` or a `/watch/` path) or only other requests
    /// (`false`).
    pub fn watch(mut self, watch: bool) -> Fault {
        self.watch = Some(watch);
        self
    }

    /// Answers `n` requests, then no more.
    pub fn times(mut self, n: usize) -> Fault {
        self.times = Some(n);
        self
    }

    /// The Status message (for a 500, the cause inside `Internal error occurred: ...`).
    pub fn message(mut self, message: &str) -> Fault {
        self.message = Some(message.to_owned());
        self
    }

    fn matches(&self, method: &Method, path: &str, watch: bool) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && path.starts_with(&self.path_prefix)
            && self.watch.is_none_or(|w| w == watch)
    }

    /// The status code, extra headers and Status body.
    fn response(&self) -> Answer {
        let message = self.message.as_deref();
        match self.answer {
            FaultAnswer::TooManyRequests {
                retry_after_seconds,
            } => {
                let mut status = status(
                    429,
                    "TooManyRequests",
                    message.unwrap_or("Too many requests, please try again later."),
                );
                status["details"] = json!({"retryAfterSeconds": retry_after_seconds});
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    vec![("retry-after", retry_after_seconds.to_string())],
                    status,
                )
            }
            FaultAnswer::InternalError => {
                let cause = message.unwrap_or("a fault injected by the test");
                let mut status = status(
                    500,
                    "InternalError",
                    &format!("Internal error occurred: {cause}"),
                );
                status["details"] = json!({"causes": [{"message": cause}]});
                (StatusCode::INTERNAL_SERVER_ERROR, Vec::new(), status)
            }
            FaultAnswer::ServiceUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                Vec::new(),
                status(
                    503,
                    "ServiceUnavailable",
                    message.unwrap_or("the server is currently unable to handle the request"),
                ),
            ),
            FaultAnswer::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                Vec::new(),
                status(401, "Unauthorized", message.unwrap_or("Unauthorized")),
            ),
        }
    }
}

/// A response: status code, extra headers and Status body.
pub(super) type Answer = (StatusCode, Vec<(&'static str, String)>, Value);

/// A failure Status as the real server writes it.
pub(super) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

struct Injected {
    fault: Fault,
    answered: AtomicUsize,
    cleared: AtomicBool,
}

/// A fault in place: how many requests it answered, and a way to clear it.
#[derive(Clone)]
pub struct InjectedFault {
    injected: Arc<Injected>,
}

impl InjectedFault {
    /// How many requests it answered so far.
    pub fn answered(&self) -> usize {
        self.injected.answered.load(Ordering::SeqCst)
    }

    /// Stops it answering.
    pub fn clear(&self) {
        self.injected.cleared.store(true, Ordering::SeqCst);
    }

    /// Whether it still answers: neither cleared nor used up.
    pub fn is_active(&self) -> bool {
        !self.injected.cleared.load(Ordering::SeqCst)
            && self
                .injected
                .fault
                .times
                .is_none_or(|n| self.answered() < n)
    }
}

impl std::fmt::Debug for InjectedFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectedFault")
            .field("fault", &self.injected.fault)
            .field("answered", &self.answered())
            .field("active", &self.is_active())
            .finish()
    }
}

/// The faults of one server, oldest first; the first that matches answers.
#[derive(Default)]
pub(super) struct Faults {
    list: Mutex<Vec<Arc<Injected>>>,
}

impl Faults {
    pub(super) fn inject(&self, fault: Fault) -> InjectedFault {
        let injected = Arc::new(Injected {
            fault,
            answered: AtomicUsize::new(0),
            cleared: AtomicBool::new(false),
        });
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.push(injected.clone());
        InjectedFault { injected }
    }

    pub(super) fn clear(&self) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        for injected in list.drain(..) {
            injected.cleared.store(true, Ordering::SeqCst);
        }
    }

    /// The answer of the first active fault that matches, counted.
    pub(super) fn answer(&self, method: &Method, path: &str, watch: bool) -> Option<Answer> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|i| !i.cleared.load(Ordering::SeqCst));
        let injected = list.iter().find(|i| {
            i.fault.matches(method, path, watch)
                && i.fault
                    .times
                    .is_none_or(|n| i.answered.load(Ordering::SeqCst) < n)
        })?;
        injected.answered.fetch_add(1, Ordering::SeqCst);
        Some(injected.fault.response())
    }
}
