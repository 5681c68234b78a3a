package spans

import (
	"net/netip"
	"strings"

	"go.opentelemetry.io/otel/attribute"
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
		end = tx.ReqEnd
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

// attrBuilder builds span attributes, reusing its buffers; it is used under
// the Exporter's lock.
type attrBuilder struct {
	buf   []attribute.KeyValue
	addrs map[netip.Addr]string
}

const addrCacheMax = 4096

// addr returns the textual form of a, cached (netip.Addr.String allocates).
func (b *attrBuilder) addr(a netip.Addr) string {
	if s, ok := b.addrs[a]; ok {
		return s
	}
	if b.addrs == nil || len(b.addrs) >= addrCacheMax {
		b.addrs = make(map[netip.Addr]string, 256)
	}
	s := a.String()
	b.addrs[a] = s
	return s
}

// build returns the attributes of the span of s. The slice is reused by the
// next call.
func (b *attrBuilder) build(s *Session, errType string, summary bool) []attribute.KeyValue {
	tx := s.Tx
	a := b.buf[:0]
	var hasServerAddr, hasServerPort, hasClientAddr, hasClientPort, hasErrType bool
	for _, kv := range tx.Attrs {
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
		}
		if kv, ok := sanitize(kv); ok {
			a = append(a, kv)
		}
	}

	if s.Transport != "" {
		a = append(a, semconv.NetworkTransportKey.String(s.Transport))
	}
	client := netip.AddrPortFrom(s.Client.Addr().Unmap(), s.Client.Port())
	server := netip.AddrPortFrom(s.Server.Addr().Unmap(), s.Server.Port())
	switch {
	case server.Addr().Is4() || (!server.Addr().IsValid() && client.Addr().Is4()):
		a = append(a, semconv.NetworkTypeKey.String("ipv4"))
	case server.Addr().Is6() || client.Addr().Is6():
		a = append(a, semconv.NetworkTypeKey.String("ipv6"))
	}
	if server.Addr().IsValid() {
		if !hasServerAddr {
			a = append(a, semconv.ServerAddressKey.String(b.addr(server.Addr())))
		}
		if !hasServerPort {
			a = append(a, semconv.ServerPortKey.Int(int(server.Port())))
		}
	}
	if s.Kind == Server && client.Addr().IsValid() {
		if !hasClientAddr {
			a = append(a, semconv.ClientAddressKey.String(b.addr(client.Addr())))
		}
		if !hasClientPort {
			a = append(a, semconv.ClientPortKey.Int(int(client.Port())))
		}
	}
	peer, local := server, client
	if s.Kind == Server {
		peer, local = client, server
	}
	if peer.Addr().IsValid() {
		a = append(a,
			semconv.NetworkPeerAddressKey.String(b.addr(peer.Addr())),
			semconv.NetworkPeerPortKey.Int(int(peer.Port())))
	}
	if local.Addr().IsValid() {
		a = append(a,
			semconv.NetworkLocalAddressKey.String(b.addr(local.Addr())),
			semconv.NetworkLocalPortKey.Int(int(local.Port())))
	}

	a = append(a,
		semconv.ProcessPIDKey.Int64(int64(s.Process.PID)),
		semconv.ProcessExecutableNameKey.String(exeName(&s.Process)),
		AttrPoint.String(string(s.Point)),
		AttrCgroupID.Int64(int64(s.CgroupID)),
	)
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
	b.buf = a
	return a
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
