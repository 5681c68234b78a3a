// Package http1 is Clovisor's HTTP/1.0 and HTTP/1.1 analyzer.
//
// It turns the captured bytes of one connection into one
// protocols.Transaction per request/response exchange, following the
// message framing of RFC 9112 (Content-Length, chunked transfer coding,
// bodies delimited by the connection's close, responses without a body) and
// naming what it finds per the OpenTelemetry HTTP semantic conventions.
//
// The parser copes with what a socket-level capture gives it: keep-alive and
// pipelined exchanges, messages split across send/recv calls at any byte,
// captured prefixes shorter than the true byte count (the gap is stepped
// over when the framing says how long it is; when it is not, the parser
// marks the exchange Truncated and resynchronises at the start of a later
// chunk), and bytes that are not HTTP at all (counted as garbage, never a
// transaction). Memory per connection is bounded: header sections are
// buffered up to a fixed size and only a fixed number of pipelined requests
// waits for its response.
//
// # Transactions
//
// Name is the method ("HTTP" for a method that is not known), Summary
// "METHOD target status" ("-" for the status when no response was read),
// with the query redacted. ReqBytes and RespBytes count whole messages
// (header section and body, interim 1xx responses included in RespBytes)
// by the true byte counts; empty lines between messages are not counted.
// ErrorType is the status code for 4xx and 5xx (ServerFault for 5xx),
// ErrorNoResponse or ErrorResponseTruncated when the connection closed
// early. Truncated says the capture or the parser lost part of the
// exchange; it is not an error of the exchange.
//
// # Attributes
//
// In this order, each when known: http.request.method (a known method or
// "_OTHER"), http.request.method_original (for "_OTHER"), url.path (absent
// for a CONNECT), url.query (not empty, redacted), url.scheme ("http", or
// "https" from an absolute-form target), http.response.status_code,
// network.protocol.name ("http"), network.protocol.version ("1.0", "1.1"
// from the request line), user_agent.original, server.address and
// server.port (from the Host field, or the authority of an absolute-form
// or CONNECT target; the port only when explicit), http.request.body.size
// and http.response.body.size (when the message has a body section: the
// payload bytes, i.e. Content-Length or the sum of the chunk sizes, by true
// counts), http.request.size and http.response.size (ReqBytes, RespBytes).
// error.type is not among them: it is Transaction.ErrorType.
//
// Only two header values are ever exported, User-Agent (user_agent.original)
// and Host (server.address, server.port), and never userinfo of a target;
// secrets carried in the query string (signatures, credentials) are
// replaced by "REDACTED".
package http1

import (
	"github.com/clovisor/clovisor/protocols"
)

// Name is the analyzer's (and the transactions' protocol) name.
const Name = "http"

// Defaults of the limits that keep a parser's memory bounded.
const (
	// DefaultMaxHeaderBytes bounds the header section (start line, fields
	// and the empty line) buffered when it is split across chunks. A
	// longer one gives a Truncated transaction with what was read.
	DefaultMaxHeaderBytes = 16 << 10
	// DefaultMaxPending bounds the pipelined requests waiting for their
	// response. A further request evicts the oldest one, which is
	// emitted with NoResponse and Truncated set (and no ErrorType: the
	// parser gave up on it, nothing says the exchange failed).
	DefaultMaxPending = 64
)

// Values of Transaction.ErrorType other than a status code.
const (
	// ErrorNoResponse: the connection closed (or the parser was flushed
	// by Close) before any byte of the response was seen. ServerFault is
	// set as well.
	ErrorNoResponse = "no_response"
	// ErrorResponseTruncated: the connection closed in the middle of a
	// response (a Content-Length or chunked body not complete, or the
	// header section not complete) whose status was not already an error.
	// ServerFault is set as well.
	ErrorResponseTruncated = "response_truncated"
)

// defaultRedacted are the query parameters whose values are replaced by
// "REDACTED" in url.query and in Summary: the list of the semantic
// conventions up to v1.37 and the one that replaced it (v1.38 onwards).
// Keys match case-sensitively, as the conventions say.
var defaultRedacted = []string{
	"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature",
	"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
}

// defaultKnown are the request methods the semantic conventions know: those
// of RFC 9110, PATCH (RFC 5789) and QUERY (known since semconv v1.38).
var defaultKnown = []string{
	"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
}

type config struct {
	maxHeader  int
	maxPending int
	redact     []string
	// known maps the known methods to themselves; nil means defaultKnown
	// (looked up with a switch, which is faster).
	known map[string]string
}

// Option configures the analyzer.
type Option func(*config)

// WithRedactedQueryParams adds query parameters whose values are replaced
// by "REDACTED", to the default ones (AWSAccessKeyId, Signature, sig,
// X-Goog-Signature, X-Amz-Signature, X-Amz-Credential,
// X-Amz-Security-Token). Names match case-sensitively.
func WithRedactedQueryParams(names ...string) Option {
	return func(c *config) {
		for _, n := range names {
			if n != "" {
				c.redact = append(c.redact, n)
			}
		}
	}
}

// WithKnownMethods replaces the list of known request methods (as
// OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS does): other methods are reported
// as http.request.method "_OTHER" with http.request.method_original. Detect
// accepts the known methods followed by a space without further checks.
func WithKnownMethods(methods ...string) Option {
	return func(c *config) {
		c.known = make(map[string]string, len(methods))
		for _, m := range methods {
			if m != "" {
				c.known[m] = m
			}
		}
	}
}

// WithMaxHeaderBytes sets the bound on a buffered header section (default
// DefaultMaxHeaderBytes). Values below 256 are raised to 256.
func WithMaxHeaderBytes(n int) Option {
	return func(c *config) { c.maxHeader = max(n, 256) }
}

// WithMaxPending sets how many requests may wait for their response
// (default DefaultMaxPending, at least 1).
func WithMaxPending(n int) Option {
	return func(c *config) { c.maxPending = max(n, 1) }
}

type analyzer struct {
	cfg config
}

// New returns the HTTP/1.x analyzer.
func New(opts ...Option) protocols.Analyzer {
	a := &analyzer{cfg: config{
		maxHeader:  DefaultMaxHeaderBytes,
		maxPending: DefaultMaxPending,
		redact:     append([]string(nil), defaultRedacted...),
	}}
	for _, o := range opts {
		o(&a.cfg)
	}
	return a
}

// Name returns "http".
func (a *analyzer) Name() string { return Name }

// Detect reports whether data starts an HTTP/1.x message: in the request
// direction a known method followed by a space, or another upper-case token
// followed by " /" or " http" on a line that holds " HTTP/1."; in the
// response direction "HTTP/1.0 " or "HTTP/1.1 ".
func (a *analyzer) Detect(dir protocols.Direction, data []byte) bool {
	return a.cfg.startsMessage(dir, data)
}

// NewParser returns a parser for one connection.
func (a *analyzer) NewParser() protocols.Parser {
	p := &parser{cfg: &a.cfg}
	p.s[protocols.Request].dir = protocols.Request
	p.s[protocols.Response].dir = protocols.Response
	return p
}

// maxMethod bounds the length of a method token.
const maxMethod = 32

func (c *config) startsMessage(dir protocols.Direction, data []byte) bool {
	switch dir {
	case protocols.Response:
		return len(data) >= 9 && (string(data[:9]) == "HTTP/1.1 " || string(data[:9]) == "HTTP/1.0 ")
	case protocols.Request:
		i := 0
		for i < len(data) && i <= maxMethod && isMethodChar(data[i], i) {
			i++
		}
		if i == 0 || i >= len(data) || data[i] != ' ' {
			return false
		}
		if _, ok := c.knownMethod(data[:i]); ok {
			return true
		}
		rest := data[i:]
		if !hasPrefix(rest, " /") && !hasPrefix(rest, " http") {
			return false
		}
		return containsVersion(rest)
	}
	return false
}

// containsVersion reports whether the first line of b holds " HTTP/1.".
func containsVersion(b []byte) bool {
	for i := 0; i+8 <= len(b); i++ {
		switch b[i] {
		case '\n':
			return false
		case ' ':
			if string(b[i:i+8]) == " HTTP/1." {
				return true
			}
		}
	}
	return false
}

// knownMethod returns the known method spelled tok.
func (c *config) knownMethod(tok []byte) (string, bool) {
	if c.known != nil {
		m, ok := c.known[string(tok)]
		return m, ok
	}
	switch string(tok) {
	case "GET":
		return "GET", true
	case "POST":
		return "POST", true
	case "PUT":
		return "PUT", true
	case "HEAD":
		return "HEAD", true
	case "DELETE":
		return "DELETE", true
	case "PATCH":
		return "PATCH", true
	case "OPTIONS":
		return "OPTIONS", true
	case "CONNECT":
		return "CONNECT", true
	case "TRACE":
		return "TRACE", true
	case "QUERY":
		return "QUERY", true
	}
	return "", false
}

// isMethodChar says whether c may be the i-th byte of a method token: an
// upper-case letter first, then upper-case letters, digits, '-' and '_'.
// (RFC 9110 allows any tchar; restricting them keeps garbage out.)
func isMethodChar(c byte, i int) bool {
	if c >= 'A' && c <= 'Z' {
		return true
	}
	return i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '_')
}

func hasPrefix(b []byte, p string) bool {
	return len(b) >= len(p) && string(b[:len(p)]) == p
}
