// Package protocols holds the contract between the byte streams Clovisor
// captures (at the socket, later on the wire) and the protocol analyzers that
// turn them into request/response transactions.
//
// Analyzers are stackable: a Registry holds them in order, the first whose
// Detect accepts the first bytes of a connection parses it. Users add their
// own by registering an Analyzer.
package protocols

import (
	"go.opentelemetry.io/otel/attribute"
)

// Direction of a chunk of bytes on a connection, relative to its roles.
type Direction uint8

const (
	// Request bytes go from the client (the side that connected) to the server.
	Request Direction = iota
	// Response bytes go from the server to the client.
	Response
)

func (d Direction) String() string {
	if d == Request {
		return "request"
	}
	return "response"
}

// Chunk is one piece of one direction of a stream, as one send or receive
// call saw it.
type Chunk struct {
	Dir Direction
	// Data is the captured prefix of the bytes. It may be shorter than Len
	// when the capture was truncated; the bytes after it are a gap of known
	// length that the parser must step over.
	Data []byte
	// Len is the true number of bytes of this piece of the stream.
	Len int
	// TS is the kernel timestamp of the call (CLOCK_MONOTONIC, ns).
	TS uint64
}

// Gap returns how many bytes of the chunk were not captured.
func (c Chunk) Gap() int { return c.Len - len(c.Data) }

// Transaction is one request with its response.
type Transaction struct {
	// Protocol is the analyzer's name, e.g. "http".
	Protocol string
	// Name is the span name per the semantic conventions of the protocol
	// (for HTTP: "{method} {route}" or "{method}").
	Name string
	// Summary is a compact human-readable form for the terminal, e.g.
	// "GET /index.html 200".
	Summary string

	// Kernel timestamps (CLOCK_MONOTONIC, ns): first and last byte of the
	// request, first and last byte of the response. Zero when not seen.
	ReqStart, ReqEnd, RespStart, RespEnd uint64
	// CloseTS is set on transactions that Parser.Close flushed: when the
	// connection ended (for a request that never got its response, the
	// time the client gave up or the server went away).
	CloseTS uint64

	// ReqBytes and RespBytes count the whole messages on the stream
	// (headers and bodies), by the kernel's true byte counts.
	ReqBytes, RespBytes int64

	// Attrs are the protocol's attributes per the OpenTelemetry semantic
	// conventions (e.g. http.request.method, url.path,
	// http.response.status_code). Secrets are never among them. An
	// analyzer may leave them to Lazy instead, which makes them only when
	// they are read: readers use AppendAttrs and NumAttrs, which cover
	// both.
	Attrs []attribute.KeyValue
	// Lazy, when set, makes the attributes that follow Attrs.
	Lazy AttrSource

	// StatusCode is the protocol's status (HTTP: the response status
	// code), 0 when there is none.
	StatusCode int
	// ErrorType is the error.type of the transaction seen by its client
	// ("" when it did not fail): for HTTP the status code as text for 4xx
	// and 5xx, or a short reason such as "response_truncated".
	ErrorType string
	// ServerFault says the error also counts against the server, so a
	// SERVER span is marked as failed too (HTTP: 5xx, no response).
	ServerFault bool
	// Truncated is set when part of the headers was not captured or the
	// stream lost sync; the attributes hold what could be read.
	Truncated bool
	// NoResponse is set when the connection closed (or the parser was
	// flushed) before a response was seen.
	NoResponse bool
}

// AttrSource makes a transaction's attributes when they are read, so that
// an analyzer keeps what it parsed in its own compact form and a
// transaction that no span is made of costs no attribute list.
type AttrSource interface {
	// AppendAttrs appends the attributes to dst.
	AppendAttrs(dst []attribute.KeyValue) []attribute.KeyValue
	// NumAttrs is the number of attributes AppendAttrs appends.
	NumAttrs() int
}

// AppendAttrs appends the transaction's attributes, Attrs and then those
// of Lazy, to dst.
func (t *Transaction) AppendAttrs(dst []attribute.KeyValue) []attribute.KeyValue {
	dst = append(dst, t.Attrs...)
	if t.Lazy != nil {
		dst = t.Lazy.AppendAttrs(dst)
	}
	return dst
}

// NumAttrs is the number of attributes AppendAttrs appends.
func (t *Transaction) NumAttrs() int {
	n := len(t.Attrs)
	if t.Lazy != nil {
		n += t.Lazy.NumAttrs()
	}
	return n
}

// AllAttrs returns the transaction's attributes in one list (a new one
// when Lazy is set).
func (t *Transaction) AllAttrs() []attribute.KeyValue {
	if t.Lazy == nil {
		return t.Attrs
	}
	return t.AppendAttrs(make([]attribute.KeyValue, 0, t.NumAttrs()))
}

// AttrReplacer is an AttrSource that can change the value of one of its
// attributes in its own form.
type AttrReplacer interface {
	// ReplaceAttr gives the attribute with kv's key kv's value and
	// reports whether the source has it and took the value.
	ReplaceAttr(kv attribute.KeyValue) bool
}

// ReplaceAttr gives the transaction's attribute with kv's key kv's value,
// and reports whether there was one. Attributes of Lazy that it cannot
// replace itself (AttrReplacer) are first made into Attrs.
func (t *Transaction) ReplaceAttr(kv attribute.KeyValue) bool {
	for i := range t.Attrs {
		if t.Attrs[i].Key == kv.Key {
			t.Attrs[i] = kv
			return true
		}
	}
	if t.Lazy == nil {
		return false
	}
	if r, ok := t.Lazy.(AttrReplacer); ok && r.ReplaceAttr(kv) {
		return true
	}
	t.Attrs, t.Lazy = t.AllAttrs(), nil
	return t.ReplaceAttr(kv)
}

// Parser parses one connection. It is not safe for concurrent use.
type Parser interface {
	// Feed takes the next chunk of one direction (chunks of one direction
	// arrive in stream order) and appends completed transactions to out.
	Feed(c Chunk, out []*Transaction) []*Transaction
	// Close flushes a pending request (as NoResponse) when the connection
	// ends at ts, appending it to out.
	Close(ts uint64, out []*Transaction) []*Transaction
	// Stats reports how many bytes the parser could not make sense of.
	Stats() ParserStats
}

// ParserStats counts what a parser dropped.
type ParserStats struct {
	// Garbage counts bytes that were not valid protocol data.
	Garbage int64
	// Resyncs counts how often the parser lost its place and found a new
	// message start.
	Resyncs int64
}

// Analyzer recognises one protocol and makes parsers for it.
type Analyzer interface {
	// Name is the protocol's name, e.g. "http".
	Name() string
	// Detect reports whether data, the first captured bytes of one
	// direction of a connection, look like this protocol in direction dir.
	Detect(dir Direction, data []byte) bool
	// NewParser makes a parser for one connection.
	NewParser() Parser
}

// Registry is an ordered set of analyzers.
type Registry struct {
	analyzers []Analyzer
	byName    map[string]Analyzer
}

// NewRegistry returns a registry holding as, in order of precedence.
func NewRegistry(as ...Analyzer) *Registry {
	r := &Registry{byName: map[string]Analyzer{}}
	for _, a := range as {
		r.Register(a)
	}
	return r
}

// Register adds a after the analyzers already held; an analyzer of the same
// name replaces the earlier one in place.
func (r *Registry) Register(a Analyzer) {
	if _, ok := r.byName[a.Name()]; ok {
		for i, old := range r.analyzers {
			if old.Name() == a.Name() {
				r.analyzers[i] = a
			}
		}
	} else {
		r.analyzers = append(r.analyzers, a)
	}
	r.byName[a.Name()] = a
}

// Lookup returns the analyzer named name.
func (r *Registry) Lookup(name string) (Analyzer, bool) {
	a, ok := r.byName[name]
	return a, ok
}

// Detect returns the first analyzer that accepts data in direction dir.
func (r *Registry) Detect(dir Direction, data []byte) (Analyzer, bool) {
	for _, a := range r.analyzers {
		if a.Detect(dir, data) {
			return a, true
		}
	}
	return nil, false
}
