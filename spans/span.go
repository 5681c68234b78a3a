package spans

import (
	"context"
	"encoding/binary"
	"net/netip"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/clovisor/clovisor/protocols"
)

// Clovisor's own span attributes.
const (
	// AttrPoint is where the bytes were seen (Session.Point).
	AttrPoint = attribute.Key("clovisor.point")
	// AttrCgroupID is the cgroup v2 ID (inode) of the socket's owner.
	AttrCgroupID = attribute.Key("clovisor.cgroup.id")
	// AttrCgroupPath is the owner's cgroup path, when known.
	AttrCgroupPath = attribute.Key("clovisor.cgroup.path")
	// AttrTruncated is true when part of the transaction was not captured.
	AttrTruncated = attribute.Key("clovisor.truncated")
	// AttrPayloadSource is where a socket span's plaintext came from
	// (Session.PayloadSource).
	AttrPayloadSource = attribute.Key("clovisor.payload.source")
	// AttrTLSServerName is the server name (SNI) a TLS client asked for.
	AttrTLSServerName = attribute.Key("clovisor.tls.server_name")
	// AttrSummary carries Transaction.Summary to the console exporter; it
	// is only set in console mode.
	AttrSummary = attribute.Key("clovisor.summary")
)

// spanKind maps a session's side to the span kind.
func spanKind(k Kind) trace.SpanKind {
	switch k {
	case Server:
		return trace.SpanKindServer
	case Client:
		return trace.SpanKindClient
	default:
		return trace.SpanKindInternal
	}
}

// spanTimes returns the monotonic start and end of a transaction: start is
// the request's first byte (else the earliest timestamp seen), end the
// response's last byte (else the request's last byte when there was no
// response, else the latest timestamp seen). ok is false when the
// transaction carries no timestamp at all.
func spanTimes(tx *protocols.Transaction) (start, end uint64, ok bool) {
	ts := [4]uint64{tx.ReqStart, tx.ReqEnd, tx.RespStart, tx.RespEnd}
	var lo, hi uint64
	for _, t := range ts {
		if t == 0 {
			continue
		}
		if lo == 0 || t < lo {
			lo = t
		}
		if t > hi {
			hi = t
		}
	}
	if lo == 0 {
		return 0, 0, false
	}
	start = tx.ReqStart
	if start == 0 {
		start = lo
	}
	end = tx.RespEnd
	if end == 0 && tx.NoResponse {
		// A request left unanswered lasted until its connection ended.
		end = tx.CloseTS
		if end == 0 {
			end = tx.ReqEnd
		}
	}
	if end == 0 {
		end = hi
	}
	if end < start {
		end = start
	}
	return start, end, true
}

// spanError tells whether the span's status is Error, and its error.type.
func spanError(s *Session) (bool, string) {
	tx := s.Tx
	failed := tx.ErrorType != ""
	if s.Kind == Server {
		failed = tx.ServerFault
	}
	if !failed {
		return false, ""
	}
	if tx.ErrorType == "" {
		return true, "_OTHER"
	}
	return true, tx.ErrorType
}

// attrBuilder builds span attributes; it is used under the Exporter's lock.
type attrBuilder struct {
	addrs *addrCache
	// countLimit and lengthLimit are the SDK's span limits
	// (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT;
	// negative: none).
	countLimit, lengthLimit int
	// norm applies the SDK's attribute rules to the attributes that need
	// them (see build).
	norm trace.Tracer
}

// maxDedupScan is the most analyzer attributes build checks for duplicate
// keys itself; beyond it the SDK does.
const maxDedupScan = 32

// addrCacheBits is the log2 of the number of slots of an addrCache.
const addrCacheBits = 10

// addrCache remembers the textual form of recently seen addresses
// (netip.Addr.String allocates), in a direct-mapped table: an address
// replaces whatever shared its slot.
type addrCache [1 << addrCacheBits]struct {
	a netip.Addr
	s string
}

// addr returns the textual form of a.
func (b *attrBuilder) addr(a netip.Addr) string {
	if b.addrs == nil {
		b.addrs = new(addrCache)
	}
	x := a.As16()
	h := (binary.LittleEndian.Uint64(x[:8]) ^ binary.LittleEndian.Uint64(x[8:])) * 0x9e3779b97f4a7c15
	e := &b.addrs[h>>(64-addrCacheBits)]
	if e.a != a || e.s == "" {
		e.a, e.s = a, a.String()
	}
	return e.s
}

// build returns the attributes of the span of s, in a new slice the span
// owns, and the number of attributes the span limits dropped.
//
// The result is what the SDK's span would have held after one SetAttributes
// call with the same list: invalid (keyless) attributes are dropped,
// duplicate keys keep their first position and their last value, the count
// and value length limits apply, and slice and map values are normalised.
// The list built here is almost always already in that form (the analyzers'
// keys are distinct and none is one of the keys added here); build checks
// so cheaply and otherwise hands the list to a span of the SDK (b.norm) to
// apply the rules exactly.
func (b *attrBuilder) build(s *Session, errType string, summary bool) ([]attribute.KeyValue, int) {
	tx := s.Tx
	client := netip.AddrPortFrom(s.Client.Addr().Unmap(), s.Client.Port())
	server := netip.AddrPortFrom(s.Server.Addr().Unmap(), s.Server.Port())
	serverOK, clientOK := server.Addr().IsValid(), client.Addr().IsValid()

	// The number of attributes added here, exactly (see below), but for
	// those the analyzer may have set itself (server.*, client.*,
	// error.type), counted in full here and less their number below.
	n := 4 // process.pid, process.executable.name, clovisor.point, clovisor.cgroup.id
	if s.Wire != nil {
		n = 1 + wireAttrCount(s) // clovisor.point and the wire attributes (wire.go)
	}
	if s.Transport != "" {
		n++
	}
	if server.Addr().Is4() || (!serverOK && client.Addr().Is4()) || server.Addr().Is6() || client.Addr().Is6() {
		n++ // network.type
	}
	if serverOK {
		n += 4 // server.address and .port, network.peer or .local
	}
	if clientOK {
		n += 2
		if s.Kind == Server {
			n += 2 // client.address and .port
		}
	}
	n += b2i(s.Wire == nil && s.PayloadSource != "")
	if s.TLS != nil {
		n += 1 + b2i(s.TLS.Version != "") + b2i(s.TLS.Cipher != "") + b2i(s.TLS.ServerName != "")
	}
	n += b2i(s.CgroupPath != "") + b2i(tx.Truncated) + b2i(errType != "") + b2i(summary && tx.Summary != "")

	// The analyzer's attributes first, made straight into the span's list.
	nTx := tx.NumAttrs()
	a := tx.AppendAttrs(make([]attribute.KeyValue, 0, nTx+n))
	txAttrs := a[:nTx]

	// First pass: which keys the analyzer set, and whether the list
	// needs the SDK's rules.
	var hasServerAddr, hasServerPort, hasClientAddr, hasClientPort, hasErrType bool
	simple := nTx <= maxDedupScan
	for i, kv := range txAttrs {
		switch kv.Key {
		case semconv.ServerAddressKey:
			hasServerAddr = true
		case semconv.ServerPortKey:
			hasServerPort = true
		case semconv.ClientAddressKey:
			hasClientAddr = true
		case semconv.ClientPortKey:
			hasClientPort = true
		case semconv.ErrorTypeKey:
			hasErrType = true
		case semconv.NetworkTransportKey, semconv.NetworkTypeKey,
			semconv.NetworkPeerAddressKey, semconv.NetworkPeerPortKey,
			semconv.NetworkLocalAddressKey, semconv.NetworkLocalPortKey,
			semconv.ProcessPIDKey, semconv.ProcessExecutableNameKey,
			AttrPoint, AttrCgroupID, AttrCgroupPath, AttrTruncated, AttrSummary,
			AttrPayloadSource, AttrTLSServerName, semconv.TLSProtocolNameKey,
			semconv.TLSProtocolVersionKey, semconv.TLSCipherKey:
			// Also added below: the SDK's deduplication decides.
			simple = false
		case "":
			simple = false // invalid: the SDK drops it
		}
		switch kv.Value.Type() {
		case attribute.SLICE, attribute.MAP:
			simple = false // the SDK normalises these
		}
		if s.Wire != nil && isWireKey(kv.Key) {
			simple = false // also added below
		}
		if simple {
			// A duplicate among those sanitize drops is harmless, but
			// rare enough not to tell apart.
			for j := range i {
				if txAttrs[j].Key == kv.Key {
					simple = false
					break
				}
			}
		}
	}
	if serverOK {
		n -= b2i(hasServerAddr) + b2i(hasServerPort)
	}
	if clientOK && s.Kind == Server {
		n -= b2i(hasClientAddr) + b2i(hasClientPort)
	}
	n -= b2i(errType != "" && hasErrType)

	// Sanitised in place; the list's capacity is then exactly what it
	// will hold.
	k := 0
	for i := range txAttrs {
		kv := &txAttrs[i]
		if !maySanitize(kv.Key) {
			a[k] = *kv
			k++
		} else if kv, ok := sanitize(*kv); ok {
			a[k] = kv
			k++
		}
	}
	a = a[: k : k+n]
	if s.Transport != "" {
		a = append(a, semconv.NetworkTransportKey.String(s.Transport))
	}
	switch {
	case server.Addr().Is4() || (!serverOK && client.Addr().Is4()):
		a = append(a, semconv.NetworkTypeKey.String("ipv4"))
	case server.Addr().Is6() || client.Addr().Is6():
		a = append(a, semconv.NetworkTypeKey.String("ipv6"))
	}
	var serverStr, clientStr string
	if serverOK {
		serverStr = b.addr(server.Addr())
		if !hasServerAddr {
			a = append(a, semconv.ServerAddressKey.String(serverStr))
		}
		if !hasServerPort {
			a = append(a, semconv.ServerPortKey.Int(int(server.Port())))
		}
	}
	if clientOK {
		clientStr = b.addr(client.Addr())
		if s.Kind == Server {
			if !hasClientAddr {
				a = append(a, semconv.ClientAddressKey.String(clientStr))
			}
			if !hasClientPort {
				a = append(a, semconv.ClientPortKey.Int(int(client.Port())))
			}
		}
	}
	peer, local := server, client
	peerStr, localStr := serverStr, clientStr
	if s.Kind == Server {
		peer, local = client, server
		peerStr, localStr = clientStr, serverStr
	}
	if peer.Addr().IsValid() {
		a = append(a,
			semconv.NetworkPeerAddressKey.String(peerStr),
			semconv.NetworkPeerPortKey.Int(int(peer.Port())))
	}
	if local.Addr().IsValid() {
		a = append(a,
			semconv.NetworkLocalAddressKey.String(localStr),
			semconv.NetworkLocalPortKey.Int(int(local.Port())))
	}

	if s.Wire != nil {
		a = appendWire(append(a, AttrPoint.String(string(s.Point))), s, clientStr)
	} else {
		a = append(a,
			semconv.ProcessPIDKey.Int64(int64(s.Process.PID)),
			semconv.ProcessExecutableNameKey.String(exeName(&s.Process)),
			AttrPoint.String(string(s.Point)),
			AttrCgroupID.Int64(int64(s.CgroupID)),
		)
		if s.PayloadSource != "" {
			a = append(a, AttrPayloadSource.String(s.PayloadSource))
		}
	}
	if s.TLS != nil {
		a = append(a, semconv.TLSProtocolNameKey.String("tls"))
		if s.TLS.Version != "" {
			a = append(a, semconv.TLSProtocolVersionKey.String(s.TLS.Version))
		}
		if s.TLS.Cipher != "" {
			a = append(a, semconv.TLSCipherKey.String(s.TLS.Cipher))
		}
		if s.TLS.ServerName != "" {
			a = append(a, AttrTLSServerName.String(s.TLS.ServerName))
		}
	}
	if s.CgroupPath != "" {
		a = append(a, AttrCgroupPath.String(s.CgroupPath))
	}
	if tx.Truncated {
		a = append(a, AttrTruncated.Bool(true))
	}
	if errType != "" && !hasErrType {
		a = append(a, semconv.ErrorTypeKey.String(errType))
	}
	if summary && tx.Summary != "" {
		a = append(a, AttrSummary.String(tx.Summary))
	}

	if b.countLimit >= 0 && len(a) > b.countLimit {
		simple = false
	}
	if simple && b.lengthLimit >= 0 {
		for _, kv := range a {
			switch kv.Value.Type() {
			case attribute.STRING:
				if len(kv.Value.AsString()) > b.lengthLimit {
					simple = false
				}
			case attribute.STRINGSLICE, attribute.BYTESLICE:
				simple = false
			}
		}
	}
	if !simple {
		return b.normalize(a)
	}
	return a, 0
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// normalize applies the SDK's attribute rules to a through a span of the
// SDK, and returns the resulting attributes and the number dropped.
func (b *attrBuilder) normalize(a []attribute.KeyValue) ([]attribute.KeyValue, int) {
	_, span := b.norm.Start(context.Background(), "")
	span.SetAttributes(a...) // copies a
	span.End()
	ro := span.(sdktrace.ReadOnlySpan)
	return ro.Attributes(), ro.DroppedAttributes()
}

// Defence in depth: analyzers promise not to emit secrets, but the exporter
// drops headers that carry credentials and redacts credentials in URLs per
// the semantic conventions, whatever an analyzer sends.

var sensitiveHeaders = map[string]bool{
	"authorization":        true,
	"proxy-authorization":  true,
	"cookie":               true,
	"set-cookie":           true,
	"x-api-key":            true,
	"x-auth-token":         true,
	"x-amz-security-token": true,
}

// sensitiveQueryParams are the query parameters whose values the HTTP
// semantic conventions say to redact.
var sensitiveQueryParams = [...]string{"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"}

const redacted = "REDACTED"

// maySanitize tells whether sanitize may change or drop an attribute with
// key k (a cheaper test than sanitize's).
func maySanitize(k attribute.Key) bool {
	switch {
	case len(k) > len("http.request.header.") && k[0] == 'h':
		return k[12:20] == ".header." || k[13:21] == ".header."
	case len(k) >= len("url.full") && k[0] == 'u':
		return k == "url.full" || k == "url.query"
	}
	return false
}

// sanitize drops or redacts one analyzer attribute.
func sanitize(kv attribute.KeyValue) (attribute.KeyValue, bool) {
	k := string(kv.Key)
	switch {
	case strings.HasPrefix(k, "http.request.header."):
		if sensitiveHeaders[k[len("http.request.header."):]] {
			return kv, false
		}
	case strings.HasPrefix(k, "http.response.header."):
		if sensitiveHeaders[k[len("http.response.header."):]] {
			return kv, false
		}
	case k == "url.full" && kv.Value.Type() == attribute.STRING:
		if u, changed := redactURL(kv.Value.AsString()); changed {
			return kv.Key.String(u), true
		}
	case k == "url.query" && kv.Value.Type() == attribute.STRING:
		if q, changed := redactQuery(kv.Value.AsString()); changed {
			return kv.Key.String(q), true
		}
	}
	return kv, true
}

// redactURL replaces user:password in the authority of u by
// REDACTED:REDACTED, and the values of sensitive query parameters by
// REDACTED.
func redactURL(u string) (string, bool) {
	changed := false
	if i := strings.Index(u, "://"); i >= 0 {
		auth := u[i+3:]
		if j := strings.IndexAny(auth, "/?#"); j >= 0 {
			auth = auth[:j]
		}
		if at := strings.LastIndexByte(auth, '@'); at >= 0 && auth[:at] != redacted+":"+redacted {
			u = u[:i+3] + redacted + ":" + redacted + u[i+3+at:]
			changed = true
		}
	}
	if q := strings.IndexByte(u, '?'); q >= 0 {
		query, frag := u[q+1:], ""
		if h := strings.IndexByte(query, '#'); h >= 0 {
			query, frag = query[:h], query[h:]
		}
		if rq, ok := redactQuery(query); ok {
			u = u[:q+1] + rq + frag
			changed = true
		}
	}
	return u, changed
}

// redactQuery replaces the values of sensitive parameters of a query string.
func redactQuery(q string) (string, bool) {
	found := false
	for _, p := range sensitiveQueryParams {
		if strings.Contains(q, p) {
			found = true
			break
		}
	}
	if !found {
		return q, false
	}
	var sb strings.Builder
	changed := false
	for i, part := range strings.Split(q, "&") {
		if i > 0 {
			sb.WriteByte('&')
		}
		name, val, hasVal := strings.Cut(part, "=")
		sens := false
		for _, p := range sensitiveQueryParams {
			if name == p {
				sens = true
				break
			}
		}
		if sens && hasVal && val != redacted {
			sb.WriteString(name)
			sb.WriteString("=" + redacted)
			changed = true
			continue
		}
		sb.WriteString(part)
	}
	if !changed {
		return q, false
	}
	return sb.String(), true
}
