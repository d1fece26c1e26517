//! Access log formats (`Proxy.spec.telemetry.accessLog`): Envoy's format strings, parsed once at
//! load into pieces, and Istio's default text and JSON formats.

/// Istio's default text access log format (meshConfig `accessLogFormat` unset).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON access log fields (meshConfig `accessLogEncoding: JSON`).
pub const ISTIO_JSON_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// What a format operator prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    StartTime,
    /// `REQ(name?alternative)`: a request header (lower-case), `:method`, `:path`, `:authority`,
    /// `:scheme` included.
    Req(String, Option<String>),
    Resp(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    /// Milliseconds from the first byte of the request to the last of the response.
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamPeerUriSan,
    RequestedServerName,
    RouteName,
}

impl Field {
    /// Whether the field prints a number (unquoted in JSON).
    pub fn is_number(&self) -> bool {
        matches!(
            self,
            Field::ResponseCode | Field::BytesReceived | Field::BytesSent | Field::Duration
        )
    }
}

/// A piece of a text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    /// A field, cut to at most this many characters when given (`%REQ(USER-AGENT):10%`).
    Field(Field, Option<usize>),
}

/// How access log lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Text(Vec<Piece>),
    /// One JSON object per line: key → field.
    Json(Vec<(String, Field)>),
}

impl Format {
    /// The request and response header names (lower-case) the format prints: a logged request
    /// keeps only these, not its whole header sets. Pseudo-headers and the fields the record
    /// holds anyway (`host`, `x-envoy-original-path`) are left out.
    pub fn headers(&self) -> (Vec<String>, Vec<String>) {
        let fields: Vec<&Field> = match self {
            Format::Text(pieces) => pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Field(f, _) => Some(f),
                    Piece::Literal(_) => None,
                })
                .collect(),
            Format::Json(fields) => fields.iter().map(|(_, f)| f).collect(),
        };
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        let add = |to: &mut Vec<String>, name: &str| {
            let own = name.starts_with(':') || name == "host" || name == "x-envoy-original-path";
            if !own && !to.iter().any(|n| n == name) {
                to.push(name.to_string());
            }
        };
        for f in fields {
            match f {
                Field::Req(name, alt) => {
                    add(&mut req, name);
                    if let Some(a) = alt {
                        add(&mut req, a);
                    }
                }
                Field::Resp(name, alt) => {
                    add(&mut resp, name);
                    if let Some(a) = alt {
                        add(&mut resp, a);
                    }
                }
                _ => {}
            }
        }
        (req, resp)
    }
}

/// Parses an Envoy format string.
pub fn parse(format: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        // `%%` is a literal percent sign.
        if let Some(stripped) = after.strip_prefix('%') {
            literal.push('%');
            rest = stripped;
            continue;
        }
        let end = after
            .find('%')
            .ok_or_else(|| format!("unterminated operator at `%{after}`"))?;
        let op = &after[..end];
        rest = &after[end + 1..];
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        let (op, max) = match op.rsplit_once("):") {
            Some((head, n)) => (
                &op[..head.len() + 1],
                Some(
                    n.parse::<usize>()
                        .map_err(|_| format!("`{n}` is not a length in `%{op}%`"))?,
                ),
            ),
            None => (op, None),
        };
        pieces.push(Piece::Field(field(op)?, max));
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

/// One operator, without its `%`s and length.
fn field(op: &str) -> Result<Field, String> {
    let header = |arg: &str| -> (String, Option<String>) {
        match arg.split_once('?') {
            Some((a, b)) => (a.to_ascii_lowercase(), Some(b.to_ascii_lowercase())),
            None => (arg.to_ascii_lowercase(), None),
        }
    };
    if let Some(arg) = op.strip_prefix("REQ(").and_then(|a| a.strip_suffix(')')) {
        let (a, b) = header(arg);
        return Ok(Field::Req(a, b));
    }
    if let Some(arg) = op.strip_prefix("RESP(").and_then(|a| a.strip_suffix(')')) {
        let (a, b) = header(arg);
        return Ok(Field::Resp(a, b));
    }
    Ok(match op {
        "START_TIME" => Field::StartTime,
        "PROTOCOL" => Field::Protocol,
        "RESPONSE_CODE" => Field::ResponseCode,
        "RESPONSE_FLAGS" => Field::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Field::ResponseCodeDetails,
        "CONNECTION_TERMINATION_DETAILS" => Field::ConnectionTerminationDetails,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Field::UpstreamTransportFailureReason,
        "BYTES_RECEIVED" => Field::BytesReceived,
        "BYTES_SENT" => Field::BytesSent,
        "DURATION" => Field::Duration,
        "UPSTREAM_HOST" => Field::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Field::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => Field::UpstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => Field::DownstreamLocalAddress,
        "DOWNSTREAM_REMOTE_ADDRESS" => Field::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Field::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_PEER_URI_SAN" => Field::DownstreamPeerUriSan,
        "REQUESTED_SERVER_NAME" => Field::RequestedServerName,
        "ROUTE_NAME" => Field::RouteName,
        other => {
            let known = [
                "START_TIME",
                "REQ(...)",
                "RESP(...)",
                "PROTOCOL",
                "RESPONSE_CODE",
                "RESPONSE_FLAGS",
                "RESPONSE_CODE_DETAILS",
                "CONNECTION_TERMINATION_DETAILS",
                "UPSTREAM_TRANSPORT_FAILURE_REASON",
                "BYTES_RECEIVED",
                "BYTES_SENT",
                "DURATION",
                "UPSTREAM_HOST",
                "UPSTREAM_CLUSTER",
                "UPSTREAM_CLUSTER_RAW",
                "UPSTREAM_LOCAL_ADDRESS",
                "DOWNSTREAM_LOCAL_ADDRESS",
                "DOWNSTREAM_REMOTE_ADDRESS",
                "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
                "DOWNSTREAM_PEER_URI_SAN",
                "REQUESTED_SERVER_NAME",
                "ROUTE_NAME",
            ];
            let hint = crate::error::closest(other, known.iter().copied())
                .map(|h| format!(" (did you mean `{h}`?)"))
                .unwrap_or_default();
            return Err(format!("unknown access log operator `%{other}%`{hint}"));
        }
    })
}

/// Istio's JSON format, compiled.
pub fn istio_json() -> Format {
    Format::Json(
        ISTIO_JSON_FIELDS
            .iter()
            .filter_map(|(k, op)| {
                let f = field(op.trim_matches('%')).ok()?;
                Some((k.to_string(), f))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_names_the_headers_a_line_keeps() {
        let text = Format::Text(parse(ISTIO_TEXT_FORMAT).unwrap());
        let (req, resp) = text.headers();
        assert_eq!(req, ["x-forwarded-for", "user-agent", "x-request-id"]);
        assert_eq!(resp, ["x-envoy-upstream-service-time"]);
        assert_eq!(istio_json().headers(), text.headers());
        let own = Format::Text(parse("%REQ(X-TENANT?X-ORG)% %RESP(SERVER)% %REQ(:PATH)%").unwrap());
        assert_eq!(
            own.headers(),
            (
                vec!["x-tenant".into(), "x-org".into()],
                vec!["server".into()]
            )
        );
    }

    #[test]
    fn istio_formats_parse() {
        let text = parse(ISTIO_TEXT_FORMAT).unwrap();
        assert_eq!(text[0], Piece::Literal("[".into()));
        assert_eq!(text[1], Piece::Field(Field::StartTime, None));
        assert!(text.contains(&Piece::Field(
            Field::Req("x-envoy-original-path".into(), Some(":path".into())),
            None
        )));
        assert_eq!(text.last(), Some(&Piece::Literal("\n".into())));
        match istio_json() {
            Format::Json(fields) => assert_eq!(fields.len(), ISTIO_JSON_FIELDS.len()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn lengths_percent_and_errors() {
        assert_eq!(
            parse("%REQ(USER-AGENT):5% 100%%").unwrap(),
            vec![
                Piece::Field(Field::Req("user-agent".into(), None), Some(5)),
                Piece::Literal(" 100%".into())
            ]
        );
        assert!(parse("%RESPONSE_COD%")
            .unwrap_err()
            .contains("did you mean `RESPONSE_CODE`"));
        assert!(parse("%DURATION").is_err());
        assert!(parse("%REQ(A):x%").is_err());
    }
}
