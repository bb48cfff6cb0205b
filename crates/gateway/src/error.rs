//! Errors of the HTTP API: a JSON body in the OpenAI shape (`{"error": {"message", "type",
//! "code"}}`) with a stable code and the HTTP status that fits.
use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ragfleet_client::ClientError;
use ragfleet_proto::WireError;
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`bad_request`, `too_large`, `unauthorized`, `overloaded`,
    /// `no_coverage`, `unavailable`, `deadline`, `model_mismatch`, `not_found`, `internal`).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
    /// More detail (e.g. the coverage of a query no shard answered).
    pub detail: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with no retry hint.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }

    /// The error of a JSON body that did not parse or was too large.
    pub fn from_rejection(r: JsonRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        // 415 (no JSON content type) and 422 (wrong shape) stay what they are
        Self::new(status, code, r.body_text())
    }

    fn body(&self) -> serde_json::Value {
        let mut e = json!({
            "message": self.message,
            "type": self.code,
            "code": self.code,
            "param": null,
        });
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        json!({ "error": e })
    }

    /// The `data:` payload of a server-sent event reporting this error mid-stream.
    pub fn event_data(&self) -> String {
        self.body().to_string()
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let m = e.to_string();
        match e {
            WireError::BadRequest(_) => Self::bad_request(m),
            WireError::Overloaded(_) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", m)
            },
            WireError::Unavailable(_) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            },
            WireError::Deadline => Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline", m),
            WireError::ModelMismatch { .. } => Self::new(StatusCode::CONFLICT, "model_mismatch", m),
            WireError::Unsupported(_) | WireError::Internal(_) | WireError::Frame(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let m = e.to_string();
        match e {
            ClientError::Rejected(w) => w.into(),
            ClientError::Unreachable(_) => ApiError {
                retry_after: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            },
            ClientError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline", m),
            ClientError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m)
            }
            ClientError::Transport(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// An optional request field parsed by `FromStr` (a search mode, an answer mode), a bad value
/// refused naming `field`.
pub(crate) fn parse_field<T: std::str::FromStr>(
    value: Option<&str>,
    field: &str,
) -> Result<Option<T>, ApiError>
where
    T::Err: std::fmt::Display,
{
    value
        .map(str::parse::<T>)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_errors_map_to_fitting_statuses_and_stable_codes() {
        let cases = [
            (WireError::BadRequest("x".into()), 400, "bad_request"),
            (WireError::Overloaded("x".into()), 429, "overloaded"),
            (WireError::Unavailable("x".into()), 503, "unavailable"),
            (WireError::Deadline, 504, "deadline"),
            (
                WireError::ModelMismatch {
                    index: "a".into(),
                    request: "b".into(),
                },
                409,
                "model_mismatch",
            ),
            (WireError::Internal("x".into()), 500, "internal"),
        ];
        for (w, status, code) in cases {
            let e = ApiError::from(w);
            assert_eq!(e.status.as_u16(), status);
            assert_eq!(e.code, code);
        }
        let e = ApiError::from(ClientError::TooLarge { bytes: 9, limit: 1 });
        assert_eq!((e.status.as_u16(), e.code), (413, "too_large"));
        let e = ApiError::from(ClientError::Timeout);
        assert_eq!((e.status.as_u16(), e.code), (504, "deadline"));
    }

    #[test]
    fn overload_carries_retry_after_and_the_body_is_openai_shaped() {
        let r = ApiError::from(WireError::Overloaded("queue full".into())).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::bad_request("no messages");
        let v: serde_json::Value = serde_json::from_str(&e.event_data()).unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "no messages");
        let r = ApiError::unauthorized().into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
