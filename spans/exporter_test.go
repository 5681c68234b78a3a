package spans

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func TestClientSpan(t *testing.T) {
	e, mem := memExporter(t, Config{})
	e.Export(clientSession())
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("got %d spans, want 1", len(got))
	}
	s := got[0]
	if s.Name != "GET" {
		t.Errorf("name = %q", s.Name)
	}
	if s.SpanKind != trace.SpanKindClient {
		t.Errorf("kind = %v", s.SpanKind)
	}
	if s.Status.Code != codes.Unset || s.Status.Description != "" {
		t.Errorf("status = %+v", s.Status)
	}
	if !s.StartTime.Equal(wall0) {
		t.Errorf("start = %v, want %v", s.StartTime, wall0)
	}
	if want := wall0.Add(1234 * time.Microsecond); !s.EndTime.Equal(want) {
		t.Errorf("end = %v, want %v", s.EndTime, want)
	}
	if s.Parent.IsValid() {
		t.Errorf("client span has parent %v", s.Parent)
	}
	if s.InstrumentationScope.Name != ScopeName {
		t.Errorf("scope = %q", s.InstrumentationScope.Name)
	}
	equalMaps(t, "attributes", attrMap(s.Attributes), map[string]any{
		"http.request.method":       "GET",
		"url.path":                  "/index.html",
		"http.response.status_code": int64(200),
		"network.protocol.version":  "1.1",
		"network.transport":         "tcp",
		"network.type":              "ipv4",
		"server.address":            "10.201.0.2",
		"server.port":               int64(8080),
		"network.peer.address":      "10.201.0.2",
		"network.peer.port":         int64(8080),
		"network.local.address":     "10.201.0.1",
		"network.local.port":        int64(43210),
		"process.pid":               int64(1234),
		"process.executable.name":   "curl",
		"clovisor.point":            "socket",
		"clovisor.cgroup.id":        int64(4242),
		"clovisor.cgroup.path":      "/user.slice/user-1000.slice/session-3.scope",
	})
	if st := e.Stats(); st.Exported != 1 || st.Dropped != 0 || st.ExportErrors != 0 || st.Resources != 1 {
		t.Errorf("stats = %+v", st)
	}
}

func TestServerSpan(t *testing.T) {
	e, mem := memExporter(t, Config{})
	s := serverSession()
	s.CgroupPath = ""
	s.Tx.Truncated = true
	e.Export(s)
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("got %d spans", len(got))
	}
	sp := got[0]
	if sp.SpanKind != trace.SpanKindServer {
		t.Errorf("kind = %v", sp.SpanKind)
	}
	equalMaps(t, "attributes", attrMap(sp.Attributes), map[string]any{
		"http.request.method":       "GET",
		"url.path":                  "/index.html",
		"http.response.status_code": int64(200),
		"network.protocol.version":  "1.1",
		"network.transport":         "tcp",
		"network.type":              "ipv4",
		"server.address":            "10.201.0.2",
		"server.port":               int64(8080),
		"client.address":            "10.201.0.1",
		"client.port":               int64(43210),
		"network.peer.address":      "10.201.0.1",
		"network.peer.port":         int64(43210),
		"network.local.address":     "10.201.0.2",
		"network.local.port":        int64(8080),
		"process.pid":               int64(99),
		"process.executable.name":   "nginx",
		"clovisor.point":            "socket",
		"clovisor.cgroup.id":        int64(5151),
		"clovisor.truncated":        true,
	})
}

func TestHostHeaderServerAddress(t *testing.T) {
	e, mem := memExporter(t, Config{})
	s := clientSession()
	s.Tx.Attrs = append(s.Tx.Attrs, attribute.String("server.address", "example.com"))
	e.Export(s)
	s2 := clientSession()
	s2.Tx.Attrs = append(s2.Tx.Attrs, attribute.String("server.address", "example.com"), attribute.Int("server.port", 80))
	e.Export(s2)
	got := collect(t, e, mem)
	if len(got) != 2 {
		t.Fatalf("got %d spans", len(got))
	}
	for i, want := range []int64{8080, 80} {
		m := attrMap(got[i].Attributes)
		if m["server.address"] != "example.com" || m["server.port"] != want {
			t.Errorf("span %d: server.address=%v server.port=%v, want example.com %d", i, m["server.address"], m["server.port"], want)
		}
		n := 0
		for _, kv := range got[i].Attributes {
			if kv.Key == "server.address" || kv.Key == "server.port" {
				n++
			}
		}
		if n != 2 {
			t.Errorf("span %d: %d server.* attributes, want 2", i, n)
		}
	}
}

func TestStatus(t *testing.T) {
	cases := []struct {
		name      string
		kind      Kind
		errType   string
		fault     bool
		wantCode  codes.Code
		wantError string // error.type, "" for none
	}{
		{"client ok", Client, "", false, codes.Unset, ""},
		{"client 404", Client, "404", false, codes.Error, "404"},
		{"client 503", Client, "503", true, codes.Error, "503"},
		{"server ok", Server, "", false, codes.Unset, ""},
		{"server 404", Server, "404", false, codes.Unset, ""},
		{"server 503", Server, "503", true, codes.Error, "503"},
		{"server no response", Server, "response_truncated", true, codes.Error, "response_truncated"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e, mem := memExporter(t, Config{})
			s := clientSession()
			s.Kind = c.kind
			s.Tx.ErrorType, s.Tx.ServerFault = c.errType, c.fault
			e.Export(s)
			got := collect(t, e, mem)
			if len(got) != 1 {
				t.Fatalf("got %d spans", len(got))
			}
			st := got[0].Status
			wantDesc := ""
			if c.wantCode == codes.Error {
				wantDesc = c.wantError
			}
			if st.Code != c.wantCode || st.Description != wantDesc {
				t.Errorf("status = %v %q, want %v %q", st.Code, st.Description, c.wantCode, wantDesc)
			}
			et, has := attrMap(got[0].Attributes)["error.type"]
			if c.wantError == "" && has {
				t.Errorf("error.type = %v, want none", et)
			}
			if c.wantError != "" && et != c.wantError {
				t.Errorf("error.type = %v, want %q", et, c.wantError)
			}
		})
	}
}

func TestTimestamps(t *testing.T) {
	e, mem := memExporter(t, Config{})
	// No ReqStart: start at the earliest timestamp; NoResponse: end at ReqEnd.
	s := clientSession()
	s.Tx.ReqStart, s.Tx.ReqEnd, s.Tx.RespStart, s.Tx.RespEnd = 0, mono0+500, 0, 0
	s.Tx.NoResponse = true
	e.Export(s)
	// Only a response seen.
	s = clientSession()
	s.Tx.ReqStart, s.Tx.ReqEnd, s.Tx.RespStart, s.Tx.RespEnd = 0, 0, mono0+10, mono0+20
	e.Export(s)
	// Unanswered until the connection closed: end at the close.
	s = clientSession()
	s.Tx.ReqStart, s.Tx.ReqEnd, s.Tx.RespStart, s.Tx.RespEnd, s.Tx.CloseTS = mono0+100, mono0+200, 0, 0, mono0+9000
	s.Tx.NoResponse = true
	e.Export(s)
	got := collect(t, e, mem)
	if len(got) != 3 {
		t.Fatalf("got %d spans", len(got))
	}
	check := func(i int, start, end time.Time) {
		t.Helper()
		if !got[i].StartTime.Equal(start) || !got[i].EndTime.Equal(end) {
			t.Errorf("span %d: %v .. %v, want %v .. %v", i, got[i].StartTime, got[i].EndTime, start, end)
		}
	}
	check(0, wall0.Add(500), wall0.Add(500))
	check(1, wall0.Add(10), wall0.Add(20))
	check(2, wall0.Add(100), wall0.Add(9000))
}

func TestWallClockConversion(t *testing.T) {
	clearOTelEnv(t)
	mem := tracetest.NewInMemoryExporter()
	e, err := New(context.Background(), Config{Output: OutputOTLP, Exporter: mem}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Shutdown(context.Background())
	s := clientSession()
	// Read the wall clock between two monotonic readings; retry if the
	// goroutine was preempted in between.
	var m int64
	var now time.Time
	for {
		m1 := monoNow()
		now = time.Now()
		m2 := monoNow()
		if m2-m1 < 20_000 {
			m = m1 + (m2-m1)/2
			break
		}
	}
	s.Tx.ReqStart, s.Tx.ReqEnd, s.Tx.RespStart, s.Tx.RespEnd = uint64(m), uint64(m)+1, uint64(m)+2, uint64(m)+1_000_000
	e.Export(s)
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("got %d spans", len(got))
	}
	if d := got[0].StartTime.Sub(now); d < -100*time.Microsecond || d > 100*time.Microsecond {
		t.Errorf("start is %v off the wall clock", d)
	}
	if d := got[0].EndTime.Sub(got[0].StartTime); d != time.Millisecond {
		t.Errorf("duration = %v, want 1ms", d)
	}
}

func TestClockRefresh(t *testing.T) {
	c := newMonoClock(5*time.Millisecond, nil)
	defer c.close()
	good := c.offset.Load()
	c.offset.Store(good + int64(time.Hour)) // as if the wall clock had stepped
	deadline := time.Now().Add(5 * time.Second)
	for c.offset.Load() > good+int64(time.Millisecond) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if d := c.offset.Load() - good; d > int64(time.Millisecond) || d < -int64(time.Millisecond) {
		t.Errorf("offset not refreshed: off by %v", time.Duration(d))
	}
}

func TestIPv4Mapped(t *testing.T) {
	e, mem := memExporter(t, Config{})
	s := serverSession()
	s.Client = netip.MustParseAddrPort("[::ffff:10.201.0.1]:43210")
	s.Server = netip.MustParseAddrPort("[::ffff:10.201.0.2]:8080")
	e.Export(s)
	v6 := clientSession()
	v6.Client = netip.MustParseAddrPort("[fd00::1]:43210")
	v6.Server = netip.MustParseAddrPort("[fd00::2]:8080")
	e.Export(v6)
	got := collect(t, e, mem)
	if len(got) != 2 {
		t.Fatalf("got %d spans", len(got))
	}
	m := attrMap(got[0].Attributes)
	for k, want := range map[string]any{
		"network.type":          "ipv4",
		"server.address":        "10.201.0.2",
		"client.address":        "10.201.0.1",
		"network.peer.address":  "10.201.0.1",
		"network.local.address": "10.201.0.2",
	} {
		if m[k] != want {
			t.Errorf("mapped: %s = %v, want %v", k, m[k], want)
		}
	}
	m = attrMap(got[1].Attributes)
	for k, want := range map[string]any{
		"network.type":          "ipv6",
		"server.address":        "fd00::2",
		"network.peer.address":  "fd00::2",
		"network.local.address": "fd00::1",
	} {
		if m[k] != want {
			t.Errorf("v6: %s = %v, want %v", k, m[k], want)
		}
	}
}

func resourceMap(s tracetest.SpanStub) map[string]any {
	return attrMap(s.Resource.Attributes())
}

func TestResourcePerService(t *testing.T) {
	clearOTelEnv(t)
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod,service.name=bogus")
	t.Setenv("OTEL_SERVICE_NAME", "agent")
	mem := tracetest.NewInMemoryExporter()
	e, err := New(context.Background(), Config{Output: OutputOTLP, Exporter: mem, frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Shutdown(context.Background())

	const cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	cases := []struct {
		path, exe, comm string
		wantService     string
		wantContainer   string
	}{
		{"/system.slice/nginx.service", "nginx", "nginx", "nginx", ""},
		{"/system.slice/my-app.service", "python3.12", "python3", "my-app", ""},
		{"/user.slice/user-1000.slice/session-3.scope", "", "curl", "curl", ""},
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + cid + ".scope", "envoy", "envoy", "envoy", cid},
		{"/system.slice/docker-" + cid + ".scope", "", "redis-server", "redis-server", cid},
		{"/machine.slice/libpod-" + cid + ".scope", "postgres", "postgres", "postgres", cid},
		{"/kubepods/besteffort/pod1234/" + cid, "app", "app", "app", cid},
		{"", "longexecutablename", "longexecutablen", "longexecutablename", ""},
	}
	for _, c := range cases {
		s := clientSession()
		s.CgroupPath, s.Process.Exe, s.Process.Comm = c.path, c.exe, c.comm
		e.Export(s)
	}
	got := collect(t, e, mem)
	if len(got) != len(cases) {
		t.Fatalf("got %d spans", len(got))
	}
	host, _ := os.Hostname()
	machineID, _ := os.ReadFile("/etc/machine-id")
	for i, c := range cases {
		want := map[string]any{
			"service.name":                c.wantService,
			"host.name":                   host,
			"deployment.environment.name": "prod",
			"telemetry.sdk.name":          "opentelemetry",
			"telemetry.sdk.language":      "go",
			"telemetry.sdk.version":       resourceMap(got[i])["telemetry.sdk.version"],
		}
		if id := strings.TrimSpace(string(machineID)); id != "" {
			want["host.id"] = id
		}
		if c.wantContainer != "" {
			want["container.id"] = c.wantContainer
		}
		equalMaps(t, c.path, resourceMap(got[i]), want)
		if v, _ := resourceMap(got[i])["telemetry.sdk.version"].(string); v == "" {
			t.Errorf("%s: no telemetry.sdk.version", c.path)
		}
	}
	if st := e.Stats(); st.Resources != len(cases) {
		t.Errorf("resources = %d, want %d", st.Resources, len(cases))
	}
}

func TestParseCgroup(t *testing.T) {
	const cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	cases := []struct{ path, unit, cid string }{
		{"", "", ""},
		{"/", "", ""},
		{"/system.slice/nginx.service", "nginx", ""},
		{"/system.slice/getty@tty1.service", "getty@tty1", ""},
		{"/user.slice/user-1000.slice/session-3.scope", "", ""},
		{"/init.scope", "", ""},
		{"/system.slice/.service", "", ""},
		{"/system.slice/nginx.service/extra", "", ""},
		{"/system.slice/cri-containerd-" + cid + ".scope", "", cid},
		{"/system.slice/crio-" + cid + ".scope", "", cid},
		{"/system.slice/crio-conmon-" + cid + ".scope", "", ""},
		{"/docker/" + cid, "", cid},
		{"/docker/" + strings.ToUpper(cid), "", ""},
		{"/docker/" + cid[:63], "", ""},
		{"/system.slice/docker-" + cid + ".scope/system.slice/app.service", "app", cid},
		{"/system.slice/podman-" + cid + ".scope", "", ""},
	}
	for _, c := range cases {
		u, id := parseCgroup(c.path)
		if u != c.unit || id != c.cid {
			t.Errorf("parseCgroup(%q) = %q, %q; want %q, %q", c.path, u, id, c.unit, c.cid)
		}
	}
}

func TestResourceLRU(t *testing.T) {
	e, mem := memExporter(t, Config{MaxResources: 2})
	for _, unit := range []string{"a", "b", "c", "a"} {
		s := serverSession()
		s.CgroupPath = "/system.slice/" + unit + ".service"
		e.Export(s)
	}
	got := collect(t, e, mem)
	var names []string
	for _, s := range got {
		names = append(names, resourceMap(s)["service.name"].(string))
	}
	if strings.Join(names, ",") != "a,b,c,a" {
		t.Errorf("services = %v", names)
	}
	if st := e.Stats(); st.Resources != 2 || st.Exported != 4 || st.Dropped != 0 {
		t.Errorf("stats = %+v", st)
	}
	// The LRU holds c and a, a most recent.
	var keys []string
	for ent := e.head; ent != nil; ent = ent.next {
		keys = append(keys, ent.key.name)
	}
	if strings.Join(keys, ",") != "a,c" || e.tail.key.name != "c" {
		t.Errorf("lru = %v", keys)
	}
}

func TestSecretsNeverExported(t *testing.T) {
	const secret = "s3cr3t-Tok3n"
	tx := func() *Session {
		s := clientSession()
		s.Tx.Attrs = append(s.Tx.Attrs,
			attribute.String("http.request.header.authorization", "Bearer "+secret),
			attribute.StringSlice("http.request.header.cookie", []string{"sid=" + secret}),
			attribute.StringSlice("http.response.header.set-cookie", []string{"sid=" + secret}),
			attribute.StringSlice("http.request.header.x-api-key", []string{secret}),
			attribute.StringSlice("http.request.header.accept", []string{"*/*"}),
			attribute.String("url.full", "https://bob:"+secret+"@example.com/x?a=1&sig="+secret+"&X-Goog-Signature="+secret+"#frag"),
			attribute.String("url.query", "AWSAccessKeyId="+secret+"&Signature="+secret+"&b=2"),
		)
		return s
	}
	e, mem := memExporter(t, Config{})
	e.Export(tx())
	got := collect(t, e, mem)
	if len(got) != 1 {
		t.Fatalf("got %d spans", len(got))
	}
	m := map[string]any{}
	for _, kv := range got[0].Attributes {
		if strings.Contains(kv.Value.Emit(), secret) {
			t.Errorf("secret in %s = %s", kv.Key, kv.Value.Emit())
		}
		m[string(kv.Key)] = kv.Value.Emit()
	}
	for _, k := range []string{"http.request.header.authorization", "http.request.header.cookie", "http.response.header.set-cookie", "http.request.header.x-api-key"} {
		if _, ok := m[k]; ok {
			t.Errorf("%s exported", k)
		}
	}
	if m["http.request.header.accept"] != `["*/*"]` {
		t.Errorf("accept = %v", m["http.request.header.accept"])
	}
	if want := "https://REDACTED:REDACTED@example.com/x?a=1&sig=REDACTED&X-Goog-Signature=REDACTED#frag"; m["url.full"] != want {
		t.Errorf("url.full = %v, want %v", m["url.full"], want)
	}
	if want := "AWSAccessKeyId=REDACTED&Signature=REDACTED&b=2"; m["url.query"] != want {
		t.Errorf("url.query = %v, want %v", m["url.query"], want)
	}

	// Nor in console or json output.
	for _, mode := range []string{OutputConsole, OutputJSON} {
		var buf strings.Builder
		ce, err := New(context.Background(), Config{Output: mode, Writer: &buf, frozenOffset: frozen()}, quietLogger())
		if err != nil {
			t.Fatal(err)
		}
		s := tx()
		s.Tx.Summary = "GET /x 200"
		ce.Export(s)
		ce.Shutdown(context.Background())
		if buf.Len() == 0 || strings.Contains(buf.String(), secret) {
			t.Errorf("%s output: %q", mode, buf.String())
		}
	}
}

func TestRedactURL(t *testing.T) {
	cases := []struct{ in, out string }{
		{"http://example.com/a?b=c", "http://example.com/a?b=c"},
		{"http://u@example.com/", "http://REDACTED:REDACTED@example.com/"},
		{"http://REDACTED:REDACTED@example.com/", "http://REDACTED:REDACTED@example.com/"},
		{"http://example.com/a@b", "http://example.com/a@b"},
		{"/path?sig=abc&sigx=1", "/path?sig=REDACTED&sigx=1"},
		{"/path?sig", "/path?sig"},
	}
	for _, c := range cases {
		if got, _ := redactURL(c.in); got != c.out {
			t.Errorf("redactURL(%q) = %q, want %q", c.in, got, c.out)
		}
	}
}

func spanByKind(t *testing.T, spans tracetest.SpanStubs, k trace.SpanKind) tracetest.SpanStub {
	t.Helper()
	for _, s := range spans {
		if s.SpanKind == k {
			return s
		}
	}
	t.Fatalf("no %v span", k)
	return tracetest.SpanStub{}
}

func TestLinkBothEnds(t *testing.T) {
	for _, order := range []string{"server first", "client first"} {
		t.Run(order, func(t *testing.T) {
			e, mem := memExporter(t, Config{})
			c, s := clientSession(), serverSession()
			c.Index, s.Index = 3, 3
			c.ConnTag, s.ConnTag = 0xdeadbeef, 0xdeadbeef
			// The server side sees IPv4-mapped addresses (dual-stack
			// listener): the two must still link.
			s.Client = netip.MustParseAddrPort("[::ffff:10.201.0.1]:43210")
			s.Server = netip.MustParseAddrPort("[::ffff:10.201.0.2]:8080")
			if order == "server first" {
				e.Export(s)
				e.Export(c)
			} else {
				e.Export(c)
				e.Export(s)
			}
			got := collect(t, e, mem)
			if len(got) != 2 {
				t.Fatalf("got %d spans", len(got))
			}
			cs, ss := spanByKind(t, got, trace.SpanKindClient), spanByKind(t, got, trace.SpanKindServer)
			if cs.Parent.IsValid() {
				t.Errorf("client has a parent")
			}
			if ss.SpanContext.TraceID() != cs.SpanContext.TraceID() {
				t.Errorf("trace IDs differ: %v %v", ss.SpanContext.TraceID(), cs.SpanContext.TraceID())
			}
			if ss.Parent.SpanID() != cs.SpanContext.SpanID() || !ss.Parent.IsRemote() {
				t.Errorf("server parent = %v, want remote %v", ss.Parent.SpanID(), cs.SpanContext.SpanID())
			}
			if ss.SpanContext.SpanID() == cs.SpanContext.SpanID() {
				t.Errorf("server and client share a span ID")
			}
			tid, sid := linkIDs(c)
			if cs.SpanContext.TraceID() != tid || cs.SpanContext.SpanID() != sid {
				t.Errorf("client IDs not the derived ones")
			}
			if !cs.SpanContext.IsSampled() || !ss.SpanContext.IsSampled() {
				t.Errorf("not sampled")
			}
		})
	}
}

func TestNotLinked(t *testing.T) {
	cases := []struct {
		name   string
		change func(c, s *Session)
		cfg    Config
	}{
		{"different index", func(c, s *Session) { s.Index = 1 }, Config{}},
		{"unknown index", func(c, s *Session) { c.Index, s.Index = -1, -1 }, Config{}},
		{"different conn tag", func(c, s *Session) { c.ConnTag, s.ConnTag = 1, 2 }, Config{}},
		{"different client port", func(c, s *Session) { s.Client = netip.MustParseAddrPort("10.201.0.1:43211") }, Config{}},
		{"link hook refuses", func(c, s *Session) {}, Config{Link: func(*Session) bool { return false }}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e, mem := memExporter(t, tc.cfg)
			c, s := clientSession(), serverSession()
			tc.change(c, s)
			e.Export(s)
			e.Export(c)
			got := collect(t, e, mem)
			cs, ss := spanByKind(t, got, trace.SpanKindClient), spanByKind(t, got, trace.SpanKindServer)
			if ss.SpanContext.TraceID() == cs.SpanContext.TraceID() || ss.Parent.SpanID() == cs.SpanContext.SpanID() {
				t.Errorf("linked")
			}
			if c.Index < 0 || tc.cfg.Link != nil {
				if ss.Parent.IsValid() {
					t.Errorf("unlinked server span has parent %v", ss.Parent.SpanID())
				}
				tid, sid := linkIDs(c)
				if cs.SpanContext.TraceID() == tid || cs.SpanContext.SpanID() == sid {
					t.Errorf("unlinked client span has derived IDs")
				}
			}
		})
	}
}

func TestRandomIDsDiffer(t *testing.T) {
	e, mem := memExporter(t, Config{})
	for range 2 {
		s := clientSession()
		s.Index = -1
		e.Export(s)
	}
	got := collect(t, e, mem)
	if got[0].SpanContext.TraceID() == got[1].SpanContext.TraceID() || !got[0].SpanContext.TraceID().IsValid() {
		t.Errorf("trace IDs %v %v", got[0].SpanContext.TraceID(), got[1].SpanContext.TraceID())
	}
}

// blockingExporter blocks every export until release is closed.
type blockingExporter struct {
	release chan struct{}
	mu      sync.Mutex
	n       int
}

func (b *blockingExporter) ExportSpans(ctx context.Context, s []sdktrace.ReadOnlySpan) error {
	select {
	case <-b.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.mu.Lock()
	b.n += len(s)
	b.mu.Unlock()
	return nil
}

func (b *blockingExporter) Shutdown(context.Context) error { return nil }

func TestQueueBoundDropsCounted(t *testing.T) {
	clearOTelEnv(t)
	be := &blockingExporter{release: make(chan struct{})}
	e, err := New(context.Background(), Config{Output: OutputOTLP, Exporter: be, QueueSize: 10, frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for range 100 {
		e.Export(clientSession())
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Export blocked: %v", d)
	}
	if st := e.Stats(); st.Dropped != 90 || st.Exported != 0 {
		t.Errorf("stats before release = %+v, want 90 dropped", st)
	}
	close(be.release)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if st := e.Stats(); st.Dropped != 90 || st.Exported != 10 || st.ExportErrors != 0 {
		t.Errorf("stats = %+v, want 10 exported, 90 dropped", st)
	}
	if be.n != 10 {
		t.Errorf("exporter got %d spans", be.n)
	}
	e.Export(clientSession())
	if st := e.Stats(); st.Dropped != 91 {
		t.Errorf("export after shutdown: dropped = %d, want 91", st.Dropped)
	}
}

func TestUnusableSessionDropped(t *testing.T) {
	e, mem := memExporter(t, Config{})
	e.Export(nil)
	e.Export(&Session{Kind: Client})
	if got := collect(t, e, mem); len(got) != 0 {
		t.Errorf("exported %d spans", len(got))
	}
	if st := e.Stats(); st.Dropped != 2 {
		t.Errorf("dropped = %d", st.Dropped)
	}
}
