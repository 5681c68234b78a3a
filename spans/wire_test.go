package spans

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// wireSession is an HTTP exchange seen on a pod's veth.
func wireSession() *Session {
	return &Session{
		Point:     PointPodVeth,
		Client:    netip.MustParseAddrPort("10.201.20.11:43210"),
		Server:    netip.MustParseAddrPort("10.201.20.12:8080"),
		Transport: "tcp",
		ConnID:    99,
		Index:     2,
		Tx:        httpTx(),
		Wire: &Wire{
			Interface: "cali12345",
			Request:   WireDirection{Bytes: 172, Packets: 2, PayloadBytes: 80, TCPFlags: 0x18},
			Response: WireDirection{Bytes: 1604, Packets: 3, PayloadBytes: 1548, RetransPackets: 1,
				RetransBytes: 1036, TCPFlags: 0x19},
			HandshakeRTT: 42 * time.Microsecond,
			End:          "fin",
			SeenFrom:     "syn",
		},
	}
}

// TestWireAttributes: a wire session's span carries the L7 attributes, the
// network facts, network.interface.name, the client's address and the
// L3/L4 facts under clovisor., and neither process.* nor
// clovisor.cgroup.id (no process owns what a tc program sees); it is an
// INTERNAL span.
func TestWireAttributes(t *testing.T) {
	e, mem := memExporter(t, Config{})
	e.Export(wireSession())
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("%d spans", len(got))
	}
	want := []attribute.KeyValue{
		attribute.String("http.request.method", "GET"),
		attribute.String("url.path", "/index.html"),
		attribute.Int("http.response.status_code", 200),
		attribute.String("network.protocol.version", "1.1"),
		attribute.String("network.transport", "tcp"),
		attribute.String("network.type", "ipv4"),
		attribute.String("server.address", "10.201.20.12"),
		attribute.Int("server.port", 8080),
		attribute.String("network.peer.address", "10.201.20.12"),
		attribute.Int("network.peer.port", 8080),
		attribute.String("network.local.address", "10.201.20.11"),
		attribute.Int("network.local.port", 43210),
		attribute.String("clovisor.point", "pod_veth"),
		attribute.String("network.interface.name", "cali12345"),
		attribute.String("client.address", "10.201.20.11"),
		attribute.Int("client.port", 43210),
		attribute.Int64("clovisor.request.bytes", 172),
		attribute.Int64("clovisor.request.packets", 2),
		attribute.Int64("clovisor.request.payload_bytes", 80),
		attribute.Int64("clovisor.request.retransmitted_packets", 0),
		attribute.Int64("clovisor.request.retransmitted_bytes", 0),
		attribute.String("clovisor.request.tcp_flags", "PSH|ACK"),
		attribute.Int64("clovisor.response.bytes", 1604),
		attribute.Int64("clovisor.response.packets", 3),
		attribute.Int64("clovisor.response.payload_bytes", 1548),
		attribute.Int64("clovisor.response.retransmitted_packets", 1),
		attribute.Int64("clovisor.response.retransmitted_bytes", 1036),
		attribute.String("clovisor.response.tcp_flags", "FIN|PSH|ACK"),
		attribute.Int64("clovisor.tcp.handshake_rtt_ns", 42000),
		attribute.String("clovisor.exchange.end", "fin"),
		attribute.String("clovisor.connection.seen_from", "syn"),
	}
	if !reflect.DeepEqual(got[0].Attributes, want) {
		t.Errorf("attributes:\n%v\nwant:\n%v", got[0].Attributes, want)
	}
	if got[0].SpanKind != trace.SpanKindInternal {
		t.Errorf("kind %v", got[0].SpanKind)
	}
	for _, kv := range got[0].Attributes {
		if strings.HasPrefix(string(kv.Key), "process.") || kv.Key == AttrCgroupID {
			t.Errorf("wire span has %s", kv.Key)
		}
	}
	// Built directly, sized exactly.
	b := &attrBuilder{countLimit: -1, lengthLimit: -1}
	a, _ := b.build(wireSession(), "", false)
	if len(a) != len(want) || cap(a) != len(a) {
		t.Errorf("build: len %d cap %d, want %d", len(a), cap(a), len(want))
	}
}

// TestWireAttributesMatchSDK: optional facts left out, IPv6, and an
// analyzer attribute colliding with a wire key give what an SDK span would
// hold after one SetAttributes call with the same list.
func TestWireAttributesMatchSDK(t *testing.T) {
	cases := map[string]func(*Session){
		"minimal": func(s *Session) {
			s.Wire = &Wire{}
		},
		"guessed midstream ipv6": func(s *Session) {
			s.Client = netip.MustParseAddrPort("[fd00::1]:5000")
			s.Server = netip.MustParseAddrPort("[fd00::2]:80")
			s.Wire.HandshakeRTT, s.Wire.SeenFrom, s.Wire.RolesGuessed = 0, "midstream", true
		},
		"collision": func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("network.interface.name", "mine"),
				attribute.Int("clovisor.request.bytes", 1))
		},
		"node nic": func(s *Session) { s.Point = PointNodeNIC },
	}
	limits := sdktrace.NewSpanLimits()
	b := &attrBuilder{
		countLimit: limits.AttributeCountLimit, lengthLimit: limits.AttributeValueLengthLimit,
		norm: sdktrace.NewTracerProvider(sdktrace.WithRawSpanLimits(limits), sdktrace.WithResource(resource.Empty())).Tracer(ScopeName),
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			s := wireSession()
			mod(s)
			// The reference list: build's list for a socket session
			// minus process and cgroup, plus point and wire facts.
			var ref []attribute.KeyValue
			sock := *s
			sock.Wire = nil
			full, _ := (&attrBuilder{countLimit: -1, lengthLimit: -1}).build(&sock, "", false)
			for _, kv := range full {
				switch kv.Key {
				case "process.pid", "process.executable.name", AttrCgroupID:
					continue
				}
				ref = append(ref, kv)
			}
			client := s.Client.Addr().Unmap().String()
			ref = appendWire(ref, s, client)
			want, wantDropped := sdkAttrs(limits, ref)
			got, gotDropped := b.build(s, "", false)
			if !reflect.DeepEqual(got, want) || gotDropped != wantDropped {
				t.Errorf("build:\n%v\nSDK span:\n%v", got, want)
			}
		})
	}
}

// TestTCPFlagsString: every flag combination is named in bit order.
func TestTCPFlagsString(t *testing.T) {
	for f := 0; f < 256; f++ {
		var names []string
		for i, n := range tcpFlagNames {
			if f&(1<<i) != 0 {
				names = append(names, n)
			}
		}
		if got, want := TCPFlagsString(uint8(f)), strings.Join(names, "|"); got != want {
			t.Errorf("%#x: %q, want %q", f, got, want)
		}
	}
}

// TestWireSpansLinked: the wire spans of an exchange seen on the client
// pod's veth (CLIENT) and on the server pod's veth (SERVER), with the same
// index and first request byte as the socket spans of both ends, join the
// socket spans' trace as children of the client's socket span, whatever
// the order they come in; their service is their workload (or their
// interface), their kind the side their pod plays.
func TestWireSpansLinked(t *testing.T) {
	for _, order := range []string{"sockets first", "wire first"} {
		t.Run(order, func(t *testing.T) {
			e, mem := memExporter(t, Config{})
			c, s := clientSession(), serverSession()
			wc, ws := wireSession(), wireSession()
			wc.Client, wc.Server, ws.Client, ws.Server = c.Client, c.Server, c.Client, c.Server
			wc.Kind, ws.Kind = Client, Server
			wc.Wire.Workload, ws.Wire.Interface = "default/cli", "veth-srv"
			for _, x := range []*Session{c, s, wc, ws} {
				x.Index, x.ConnTag = 4, 1<<32|123456
			}
			all := []*Session{c, s, wc, ws}
			if order == "wire first" {
				all = []*Session{ws, wc, s, c}
			}
			for _, x := range all {
				e.Export(x)
			}
			got := collect(t, e, mem)
			if len(got) != 4 {
				t.Fatalf("%d spans", len(got))
			}
			var cs tracetest.SpanStub
			for _, sp := range got {
				if sp.SpanKind == trace.SpanKindClient && !sp.Parent.IsValid() {
					cs = sp
				}
			}
			tid, sid := linkIDs(c)
			if cs.SpanContext.TraceID() != tid || cs.SpanContext.SpanID() != sid {
				t.Fatalf("no client socket span with the derived IDs: %+v", got)
			}
			services := map[string]trace.SpanKind{}
			ids := map[trace.SpanID]bool{}
			for _, sp := range got {
				ids[sp.SpanContext.SpanID()] = true
				if sp.SpanContext.TraceID() != tid {
					t.Errorf("%s span in trace %v, want %v", sp.SpanKind, sp.SpanContext.TraceID(), tid)
				}
				if sp.SpanContext.SpanID() == sid {
					continue
				}
				if sp.Parent.SpanID() != sid || sp.Parent.TraceID() != tid || !sp.Parent.IsRemote() {
					t.Errorf("%s span: parent %v, want the client socket span %v", sp.SpanKind, sp.Parent.SpanID(), sid)
				}
				name, _ := sp.Resource.Set().Value("service.name")
				services[name.AsString()] = sp.SpanKind
			}
			want := map[string]trace.SpanKind{"nginx": trace.SpanKindServer, "default/cli": trace.SpanKindClient,
				"veth-srv": trace.SpanKindServer}
			if !reflect.DeepEqual(services, want) || len(ids) != 4 {
				t.Errorf("services and kinds %v (%d span IDs), want %v", services, len(ids), want)
			}
		})
	}
}

// TestWireServerAttributes: a SERVER wire span names its peer (the client)
// as network.peer.*, and client.address once.
func TestWireServerAttributes(t *testing.T) {
	s := wireSession()
	s.Kind = Server
	b := &attrBuilder{countLimit: -1, lengthLimit: -1}
	a, _ := b.build(s, "", false)
	seen := map[attribute.Key]int{}
	for _, kv := range a {
		seen[kv.Key]++
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s %d times", k, n)
		}
	}
	at := attribute.NewSet(a...)
	if v, _ := at.Value("network.peer.address"); v.AsString() != "10.201.20.11" || seen["client.address"] != 1 || cap(a) != len(a) {
		t.Errorf("attributes %v (cap %d)", a, cap(a))
	}
}
