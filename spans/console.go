package spans

import (
	"context"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// ConsoleExporter writes one compact line per span:
//
//	09:41:07.123 curl[1234] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 200 1.234ms CLIENT
//
// the start time (its Location, ms), the process's executable name and pid,
// client -> server, the transaction summary (clovisor.summary, else the span
// name), the duration and the span kind, then " tls1.3" on TLS connections
// (the version when known) and " via=openssl" when the plaintext came from
// elsewhere than the socket's own buffers (clovisor.payload.source), followed by " !truncated" when
// clovisor.truncated is set and " !error=<error.type>" when the status is
// Error. Control characters and invalid UTF-8 from captured data are
// escaped, so that traffic cannot drive the terminal.
type ConsoleExporter struct {
	w   io.Writer
	loc *time.Location

	mu      sync.Mutex
	buf     []byte
	stopped bool
}

// NewConsoleExporter returns a ConsoleExporter writing to w with times in loc
// (nil: time.Local).
func NewConsoleExporter(w io.Writer, loc *time.Location) *ConsoleExporter {
	if loc == nil {
		loc = time.Local
	}
	return &ConsoleExporter{w: w, loc: loc}
}

// ExportSpans implements sdktrace.SpanExporter: one Write per span.
func (c *ConsoleExporter) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil
	}
	for _, s := range spans {
		c.buf = appendConsoleLine(c.buf[:0], s, c.loc)
		if _, err := c.w.Write(c.buf); err != nil {
			return err
		}
	}
	return nil
}

// Shutdown implements sdktrace.SpanExporter. It does not close the writer.
func (c *ConsoleExporter) Shutdown(context.Context) error {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	return nil
}

func appendConsoleLine(b []byte, s sdktrace.ReadOnlySpan, loc *time.Location) []byte {
	var (
		exe, summary, errType string
		point, iface          string
		peerAddr, localAddr   string
		srvAddr, cliAddr      string
		pid                   int64 = -1
		peerPort, localPort   int64 = -1, -1
		srvPort, cliPort      int64 = -1, -1
		truncated             bool
		source, tlsVersion    string
		isTLS                 bool
	)
	for _, kv := range s.Attributes() {
		switch kv.Key {
		case semconv.ProcessExecutableNameKey:
			exe = kv.Value.Emit()
		case semconv.ProcessPIDKey:
			pid = kv.Value.AsInt64()
		case AttrSummary:
			summary = kv.Value.Emit()
		case AttrPoint:
			point = kv.Value.Emit()
		case semconv.NetworkInterfaceNameKey:
			iface = kv.Value.Emit()
		case semconv.ErrorTypeKey:
			errType = kv.Value.Emit()
		case AttrTruncated:
			truncated = kv.Value.AsBool()
		case AttrPayloadSource:
			source = kv.Value.Emit()
		case semconv.TLSProtocolNameKey:
			isTLS = true
		case semconv.TLSProtocolVersionKey:
			tlsVersion = kv.Value.Emit()
		case semconv.NetworkPeerAddressKey:
			peerAddr = kv.Value.Emit()
		case semconv.NetworkPeerPortKey:
			peerPort = kv.Value.AsInt64()
		case semconv.NetworkLocalAddressKey:
			localAddr = kv.Value.Emit()
		case semconv.NetworkLocalPortKey:
			localPort = kv.Value.AsInt64()
		case semconv.ServerAddressKey:
			srvAddr = kv.Value.Emit()
		case semconv.ServerPortKey:
			srvPort = kv.Value.AsInt64()
		case semconv.ClientAddressKey:
			cliAddr = kv.Value.Emit()
		case semconv.ClientPortKey:
			cliPort = kv.Value.AsInt64()
		}
	}
	// The socket's two ends, by kind; server.*/client.* (which may come
	// from headers) only when the network ones are missing.
	if peerAddr == "" && localAddr == "" {
		peerAddr, peerPort, localAddr, localPort = srvAddr, srvPort, cliAddr, cliPort
		if s.SpanKind() == trace.SpanKindServer {
			peerAddr, peerPort, localAddr, localPort = cliAddr, cliPort, srvAddr, srvPort
		}
	}
	client, clientPort, server, serverPort := localAddr, localPort, peerAddr, peerPort
	if s.SpanKind() == trace.SpanKindServer {
		client, clientPort, server, serverPort = peerAddr, peerPort, localAddr, localPort
	}
	if summary == "" {
		summary = s.Name()
	}
	if exe == "" && iface != "" {
		// Seen on the wire: where, instead of which process.
		exe = point + "@" + iface
	}
	if exe == "" {
		exe = "?"
	}

	b = s.StartTime().In(loc).AppendFormat(b, "15:04:05.000")
	b = append(b, ' ')
	b = appendSafe(b, exe)
	if pid >= 0 {
		b = append(b, '[')
		b = strconv.AppendInt(b, pid, 10)
		b = append(b, ']')
	}
	b = append(b, ' ')
	b = appendHostPort(b, client, clientPort)
	b = append(b, " -> "...)
	b = appendHostPort(b, server, serverPort)
	b = append(b, ' ')
	b = appendSafe(b, summary)
	b = append(b, ' ')
	b = appendDuration(b, s.EndTime().Sub(s.StartTime()))
	b = append(b, ' ')
	b = append(b, kindName(s.SpanKind())...)
	if isTLS {
		b = append(b, " tls"...)
		b = appendSafe(b, tlsVersion)
	}
	if source != "" && source != "socket" {
		b = append(b, " via="...)
		b = appendSafe(b, source)
	}
	if truncated {
		b = append(b, " !truncated"...)
	}
	if st := s.Status(); st.Code == codes.Error {
		e := errType
		if e == "" {
			e = st.Description
		}
		b = append(b, " !error="...)
		b = appendSafe(b, e)
	}
	return append(b, '\n')
}

func kindName(k trace.SpanKind) string {
	switch k {
	case trace.SpanKindServer:
		return "SERVER"
	case trace.SpanKindClient:
		return "CLIENT"
	case trace.SpanKindProducer:
		return "PRODUCER"
	case trace.SpanKindConsumer:
		return "CONSUMER"
	default:
		return "INTERNAL"
	}
}

func appendHostPort(b []byte, host string, port int64) []byte {
	if host == "" {
		host = "?"
	}
	if port < 0 {
		return appendSafe(b, host)
	}
	if strings.IndexByte(host, ':') >= 0 { // IPv6
		b = append(b, '[')
		b = appendSafe(b, host)
		b = append(b, ']')
	} else {
		b = appendSafe(b, host)
	}
	b = append(b, ':')
	return strconv.AppendInt(b, port, 10)
}

// appendDuration formats d with three significant decimals in a unit that
// suits it: 850ns, 12.345µs, 1.234ms, 2.500s, 1m3.456s.
func appendDuration(b []byte, d time.Duration) []byte {
	switch {
	case d < 0:
		d = 0
		fallthrough
	case d < time.Microsecond:
		b = strconv.AppendInt(b, int64(d), 10)
		return append(b, "ns"...)
	case d < time.Millisecond:
		b = strconv.AppendFloat(b, float64(d)/1e3, 'f', 3, 64)
		return append(b, "µs"...)
	case d < time.Second:
		b = strconv.AppendFloat(b, float64(d)/1e6, 'f', 3, 64)
		return append(b, "ms"...)
	case d < time.Minute:
		b = strconv.AppendFloat(b, float64(d)/1e9, 'f', 3, 64)
		return append(b, 's')
	default:
		return append(b, d.Round(time.Millisecond).String()...)
	}
}

// appendSafe appends s with control characters (C0, DEL, C1) and invalid
// UTF-8 escaped, so that captured bytes cannot inject terminal sequences or
// break the line.
func appendSafe(b []byte, s string) []byte {
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < 0x7f {
			b = append(b, c)
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = appendHexEscape(b, `\x`, uint32(c), 2)
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			b = appendHexEscape(b, `\x`, uint32(r), 2)
		case r == '\u2028' || r == '\u2029':
			b = appendHexEscape(b, `\u`, uint32(r), 4)
		default:
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return b
}

func appendHexEscape(b []byte, prefix string, v uint32, digits int) []byte {
	const hex = "0123456789abcdef"
	b = append(b, prefix...)
	for sh := (digits - 1) * 4; sh >= 0; sh -= 4 {
		b = append(b, hex[(v>>uint(sh))&0xf])
	}
	return b
}

var _ sdktrace.SpanExporter = (*ConsoleExporter)(nil)
