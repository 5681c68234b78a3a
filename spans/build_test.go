package spans

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// refAttrList is the attribute list the Exporter used to give an SDK span
// in one SetAttributes call (before spans were built without the SDK's
// live spans); the tests below check that build gives what that span held.
func refAttrList(s *Session, errType string, summary bool) []attribute.KeyValue {
	tx := s.Tx
	var a []attribute.KeyValue
	var hasServerAddr, hasServerPort, hasClientAddr, hasClientPort, hasErrType bool
	for _, kv := range tx.AllAttrs() {
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
			a = append(a, semconv.ServerAddressKey.String(addrString(server.Addr())))
		}
		if !hasServerPort {
			a = append(a, semconv.ServerPortKey.Int(int(server.Port())))
		}
	}
	if s.Kind == Server && client.Addr().IsValid() {
		if !hasClientAddr {
			a = append(a, semconv.ClientAddressKey.String(addrString(client.Addr())))
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
			semconv.NetworkPeerAddressKey.String(addrString(peer.Addr())),
			semconv.NetworkPeerPortKey.Int(int(peer.Port())))
	}
	if local.Addr().IsValid() {
		a = append(a,
			semconv.NetworkLocalAddressKey.String(addrString(local.Addr())),
			semconv.NetworkLocalPortKey.Int(int(local.Port())))
	}

	a = append(a,
		semconv.ProcessPIDKey.Int64(int64(s.Process.PID)),
		semconv.ProcessExecutableNameKey.String(exeName(&s.Process)),
		AttrPoint.String(string(s.Point)),
		AttrCgroupID.Int64(int64(s.CgroupID)),
	)
	if s.PayloadSource != "" {
		a = append(a, AttrPayloadSource.String(s.PayloadSource))
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
	return a
}

func addrString(a netip.Addr) string { return a.String() }

// sdkAttrs returns the attributes and dropped count of an SDK span with
// limits after SetAttributes(list...).
func sdkAttrs(limits sdktrace.SpanLimits, list []attribute.KeyValue) ([]attribute.KeyValue, int) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithRawSpanLimits(limits), sdktrace.WithResource(resource.Empty()))
	_, sp := tp.Tracer(ScopeName).Start(context.Background(), "x")
	sp.SetAttributes(list...)
	sp.End()
	ro := sp.(sdktrace.ReadOnlySpan)
	return ro.Attributes(), ro.DroppedAttributes()
}

func TestBuildMatchesSDK(t *testing.T) {
	manyAttrs := func() []attribute.KeyValue {
		var a []attribute.KeyValue
		for i := range 40 {
			a = append(a, attribute.Int(fmt.Sprintf("x.attr%d", i), i))
		}
		return a
	}
	type tcase struct {
		name    string
		mod     func(s *Session)
		summary bool
		plain   bool // expected to take build's own path
	}
	cases := []tcase{
		{"client", func(s *Session) {}, false, true},
		{"client console", func(s *Session) {}, true, true},
		{"server", func(s *Session) { s.Kind = Server; s.Tx.Truncated = true }, false, true},
		{"server failed", func(s *Session) { s.Kind = Server; s.Tx.ErrorType, s.Tx.ServerFault = "503", true }, true, true},
		{"client 404", func(s *Session) { s.Tx.ErrorType = "404" }, false, true},
		{"tls via openssl", func(s *Session) {
			s.PayloadSource = "openssl"
			s.TLS = &TLSInfo{Version: "1.3", Cipher: "TLS_AES_128_GCM_SHA256", ServerName: "svc.example"}
		}, true, true},
		{"tls version unknown", func(s *Session) {
			s.Kind = Server
			s.PayloadSource = "ktls"
			s.TLS = &TLSInfo{}
		}, false, true},
		{"analyzer sets tls key", func(s *Session) {
			s.PayloadSource = "go_tls"
			s.TLS = &TLSInfo{Version: "1.2"}
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("tls.protocol.version", "9"))
		}, false, false},
		{"analyzer error.type", func(s *Session) {
			s.Tx.ErrorType = "404"
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("error.type", "custom"))
		}, false, true},
		{"host header", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("server.address", "example.com"), attribute.Int("server.port", 80))
		}, false, true},
		{"analyzer client.*", func(s *Session) {
			s.Kind = Server
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("client.address", "1.2.3.4"), attribute.Int("client.port", 1))
		}, false, true},
		{"no addresses", func(s *Session) {
			s.Client, s.Server = netip.AddrPort{}, netip.AddrPort{}
			s.Kind, s.Transport, s.CgroupPath = 0, "", ""
		}, false, true},
		{"server only", func(s *Session) { s.Client = netip.AddrPort{} }, false, true},
		{"client only v6", func(s *Session) {
			s.Kind = Server
			s.Server = netip.AddrPort{}
			s.Client = netip.MustParseAddrPort("[fd00::1]:1")
		}, false, true},
		{"ipv6 and mapped", func(s *Session) {
			s.Kind = Server
			s.Client = netip.MustParseAddrPort("[fd00::1%eth0]:43210")
			s.Server = netip.MustParseAddrPort("[::ffff:10.0.0.2]:80")
		}, false, true},
		{"secrets", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs,
				attribute.String("http.request.header.authorization", "Bearer x"),
				attribute.StringSlice("http.request.header.accept", []string{"*/*"}),
				attribute.String("url.full", "https://u:p@h/?sig=1"),
				attribute.String("url.query", "a=1"))
		}, false, false}, // plain, but the dropped header leaves a spare slot
		{"duplicate analyzer keys", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("url.path", "/second"), attribute.Int("x.y", 1), attribute.Int("x.y", 2))
		}, false, false},
		{"duplicate header dropped", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("http.request.header.cookie", "a"), attribute.String("http.request.header.cookie", "b"))
		}, false, false},
		{"collides with own keys", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs,
				attribute.String("network.peer.address", "1.1.1.1"),
				attribute.Int("process.pid", 7),
				attribute.String("clovisor.summary", "mine"),
				attribute.Bool("clovisor.truncated", false))
		}, true, false},
		{"empty key", func(s *Session) { s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("", "v")) }, false, false},
		{"slice and map values", func(s *Session) {
			s.Tx.Attrs = append(s.Tx.Attrs,
				attribute.Slice("x.slice", attribute.StringValue("a"), attribute.IntValue(1)),
				attribute.Map("x.map", attribute.String("k", "1"), attribute.String("k", "2")))
		}, false, false},
		{"many attributes", func(s *Session) { s.Tx.Attrs = append(s.Tx.Attrs, manyAttrs()...) }, false, false},
		{"many attributes with duplicates", func(s *Session) {
			s.Tx.Attrs = append(append(s.Tx.Attrs, manyAttrs()...), manyAttrs()[:5]...)
		}, true, false},
		{"long strings", func(s *Session) {
			s.CgroupPath = "/" + strings.Repeat("a", 300) + ".service"
			s.Tx.Attrs = append(s.Tx.Attrs, attribute.StringSlice("x.list", []string{"abcdef", "é€😀x"}), attribute.ByteSlice("x.bytes", []byte("abcdef")))
		}, false, true},
	}
	limitSets := []struct {
		name          string
		count, length int
	}{
		{"default", sdktrace.DefaultAttributeCountLimit, sdktrace.DefaultAttributeValueLengthLimit},
		{"unlimited", -1, -1},
		{"count 10", 10, -1},
		{"count 0", 0, -1},
		{"length 3", -1, 3},
		{"length 1000", 128, 1000},
	}
	for _, ls := range limitSets {
		limits := sdktrace.NewSpanLimits()
		limits.AttributeCountLimit, limits.AttributeValueLengthLimit = ls.count, ls.length
		b := &attrBuilder{
			countLimit:  ls.count,
			lengthLimit: ls.length,
			norm: sdktrace.NewTracerProvider(sdktrace.WithRawSpanLimits(limits),
				sdktrace.WithResource(resource.Empty())).Tracer(ScopeName),
		}
		for _, c := range cases {
			t.Run(ls.name+"/"+c.name, func(t *testing.T) {
				s := clientSession()
				c.mod(s)
				_, errType := spanError(s)
				want, wantDropped := sdkAttrs(limits, refAttrList(s, errType, c.summary))
				got, gotDropped := b.build(s, errType, c.summary)
				if !reflect.DeepEqual(got, want) || gotDropped != wantDropped {
					t.Errorf("build:\n%v (dropped %d)\nSDK span:\n%v (dropped %d)", got, gotDropped, want, wantDropped)
				}
				if c.plain && ls.name == "default" && cap(got) != len(got) {
					t.Errorf("cap %d, len %d: the slice is not sized exactly", cap(got), len(got))
				}
			})
		}
	}
}

// TestSpanLimitsFromEnvironment: the SDK's span limit variables still apply.
func TestSpanLimitsFromEnvironment(t *testing.T) {
	t.Setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "5")
	t.Setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "2")
	e, mem := memExporter(t, Config{})
	e.Export(clientSession())
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("got %d spans", len(got))
	}
	s := clientSession()
	want, wantDropped := sdkAttrs(sdktrace.NewSpanLimits(), refAttrList(s, "", false))
	if !reflect.DeepEqual(got[0].Attributes, want) || got[0].DroppedAttributes != wantDropped || wantDropped == 0 {
		t.Errorf("attributes %v dropped %d, want %v dropped %d", got[0].Attributes, got[0].DroppedAttributes, want, wantDropped)
	}
}

// TestSpanFields checks what the built spans carry beyond the other tests'
// assertions, as the SDK's own spans did.
func TestSpanFields(t *testing.T) {
	e, mem := memExporter(t, Config{})
	c, s := clientSession(), serverSession()
	e.Export(c)
	e.Export(s)
	c2 := clientSession()
	c2.Index = -1
	e.Export(c2)
	got := collect(t, e, mem)
	if len(got) != 3 {
		t.Fatalf("got %d spans", len(got))
	}
	for i, sp := range got {
		if len(sp.Links) != 0 || len(sp.Events) != 0 || sp.ChildSpanCount != 0 || sp.DroppedAttributes != 0 ||
			sp.DroppedEvents != 0 || sp.DroppedLinks != 0 {
			t.Errorf("span %d: %+v", i, sp)
		}
		sc := sp.SpanContext
		if !sc.IsValid() || !sc.IsSampled() || sc.IsRemote() || sc.TraceState().Len() != 0 {
			t.Errorf("span %d: span context %+v", i, sc)
		}
		if sp.InstrumentationScope.Name != ScopeName || sp.InstrumentationScope.Version != "" ||
			sp.InstrumentationScope.SchemaURL != "" || sp.InstrumentationScope.Attributes.Len() != 0 {
			t.Errorf("span %d: scope %+v", i, sp.InstrumentationScope)
		}
		if sp.Resource == nil || sp.Resource.SchemaURL() != semconv.SchemaURL {
			t.Errorf("span %d: resource %v", i, sp.Resource)
		}
	}
	if p := got[1].Parent; !p.IsValid() || !p.IsRemote() || !p.IsSampled() || p.TraceID() != got[1].SpanContext.TraceID() {
		t.Errorf("server parent %+v", p)
	}
	if got[0].Parent.IsValid() || got[2].Parent.IsValid() {
		t.Errorf("client spans have parents")
	}
	// Spans of one service share one resource.
	if got[0].Resource != got[2].Resource || got[0].Resource == got[1].Resource {
		t.Errorf("resources not shared per service")
	}
	if got[2].SpanContext.TraceID() == got[0].SpanContext.TraceID() {
		t.Errorf("unlinked span in the linked trace")
	}
}

// TestLinkIDsGolden pins the linking rule (the package doc): the values were
// computed by the implementation that fed them to the SDK's ID generator.
func TestLinkIDsGolden(t *testing.T) {
	mk := func(tr, c, s string, idx int, tag uint64) *Session {
		return &Session{Transport: tr, Client: netip.MustParseAddrPort(c), Server: netip.MustParseAddrPort(s), Index: idx, ConnTag: tag}
	}
	cases := []struct {
		s        *Session
		tid, sid string
	}{
		{mk("tcp", "10.201.0.1:43210", "10.201.0.2:8080", 0, 0), "b126f76e59c916769af0efe38ec45450", "1d9aebe1e1f19c15"},
		{mk("tcp", "[::ffff:10.201.0.1]:43210", "[::ffff:10.201.0.2]:8080", 3, 0xdeadbeef), "f06f09429e64fba4280273f6806ea11f", "21d94e5c57f82af0"},
		{mk("udp", "[fd00::1]:5353", "[fd00::2]:53", 7, 1), "58d62c2457f026ef4130a21c62265ed9", "18499c0e70d9ef19"},
		{mk("", "192.168.1.10:1", "192.168.1.11:65535", 1<<40, ^uint64(0)), "ccc99918f915eccc9373cb81de84343e", "e6961af7d906658c"},
	}
	var lc linkCache
	for i, c := range cases {
		for range 2 { // computed, then cached
			tid, sid := linkIDs(c.s)
			ctid, csid := lc.ids(c.s)
			if tid.String() != c.tid || sid.String() != c.sid || ctid != tid || csid != sid {
				t.Errorf("case %d: %s %s, cached %s %s; want %s %s", i, tid, sid, ctid, csid, c.tid, c.sid)
			}
		}
	}
}

// TestLinkCache checks the cache against linkIDs with many exchanges sharing
// its slots.
func TestLinkCache(t *testing.T) {
	var lc linkCache
	s := clientSession()
	for i := range 5000 {
		s.Index = i % 700
		s.Client = netip.AddrPortFrom(s.Client.Addr(), uint16(40000+i%13))
		s.ConnTag = uint64(i % 3)
		tid, sid := lc.ids(s)
		if wt, ws := linkIDs(s); tid != wt || sid != ws {
			t.Fatalf("exchange %d: cached %s %s, want %s %s", i, tid, sid, wt, ws)
		}
	}
}

func TestAddrCache(t *testing.T) {
	var b attrBuilder
	addrs := []netip.Addr{
		netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1"),
		netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("fe80::1%eth1"), netip.MustParseAddr("fe80::1"),
		netip.MustParseAddr("::ffff:10.0.0.1"), netip.IPv4Unspecified(), netip.IPv6Unspecified(),
	}
	for i := range 5000 {
		addrs = append(addrs, netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 1}))
	}
	for range 2 {
		for _, a := range addrs {
			if got := b.addr(a); got != a.String() {
				t.Fatalf("addr(%v) = %q", a, got)
			}
		}
	}
}

func TestRandomIDs(t *testing.T) {
	g := newIDGen()
	seen := map[trace.SpanID]bool{}
	for range 1000 {
		tid, sid := g.traceID(), g.spanID(trace.SpanID{})
		if !tid.IsValid() || !sid.IsValid() || seen[sid] {
			t.Fatalf("ids %s %s", tid, sid)
		}
		seen[sid] = true
		if o := g.spanID(sid); o == sid || !o.IsValid() {
			t.Fatalf("spanID(%s) = %s", sid, o)
		}
	}
}
