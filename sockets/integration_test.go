package sockets_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/sockets"
	"github.com/clovisor/clovisor/spans"
)

// The test binary doubles as a Go net/http client: run with
// CLOVISOR_TEST_HTTP_CLIENT set, it GETs each URL in os.Args' place (the
// variable holds them, space-separated) over one keep-alive connection.
func TestMain(m *testing.M) {
	testbed.ExecProbedMain()
	if urls := os.Getenv("CLOVISOR_TEST_HTTP_CLIENT"); urls != "" {
		os.Exit(httpClient(strings.Fields(urls)))
	}
	if addr := os.Getenv("CLOVISOR_TEST_HTTP_SERVER"); addr != "" {
		os.Exit(httpServer(addr))
	}
	if spec := os.Getenv(sockets.EnvKTLSPeer); spec != "" {
		os.Exit(sockets.KTLSPeer(spec))
	}
	if spec := os.Getenv(sockets.EnvPayloadSender); spec != "" {
		os.Exit(sockets.PayloadSender(spec))
	}
	os.Exit(m.Run())
}

func httpClient(urls []string) int {
	// "repeat=N URL" asks for N requests of one URL.
	if n, ok := strings.CutPrefix(urls[0], "repeat="); ok && len(urls) == 2 {
		count, err := strconv.Atoi(n)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		urls = slices.Repeat(urls[1:], count)
	}
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
	for _, u := range urls {
		method := http.MethodGet
		if m, rest, ok := strings.Cut(u, " "); ok {
			method, u = m, rest
		}
		if strings.HasPrefix(u, "POST:") {
			method, u = http.MethodPost, strings.TrimPrefix(u, "POST:")
		}
		var body io.Reader
		if method == http.MethodPost {
			body = strings.NewReader(strings.Repeat("p", 300))
		}
		req, _ := http.NewRequest(method, u, body)
		req.Header.Set("Authorization", "Bearer secret-token-123")
		resp, err := c.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if len(urls) <= 100 {
			fmt.Printf("%s %d %d\n", u, resp.StatusCode, n)
		}
	}
	return 0
}

// collector runs the socket tracer over the pair's cgroups and gathers the
// sessions it produces.
type collector struct {
	mu       sync.Mutex
	sessions []*spans.Session
	tracker  *sockets.Tracker
	tracer   *probes.Tracer
	stop     func()
	done     chan error
}

// startTracer traces the cgroups in the attach mode under test
// (sockets.EnvTestMode, tracepoint by default).
func startTracer(t *testing.T, payload int, cgroups ...uint64) *collector {
	t.Helper()
	return startTracerWith(t, probes.Options{FilterCgroups: true, PayloadBytes: payload}, cgroups...)
}

// startTracerWith traces the cgroups with options o; an empty o.Mode means
// the attach mode under test (sockets.EnvTestMode), never auto, so the
// tests run in the mode the kernel matrix asked for.
func startTracerWith(t *testing.T, o probes.Options, cgroups ...uint64) *collector {
	t.Helper()
	if o.Mode == "" {
		o.Mode = sockets.AttachModeUnderTest(t)
	}
	tr, err := probes.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Mode != o.Mode {
		tr.Close()
		t.Fatalf("tracer attached in mode %s, asked for %s", tr.Mode, o.Mode)
	}
	for _, id := range cgroups {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	c := &collector{tracer: tr, done: make(chan error, 1)}
	c.tracker = sockets.NewTracker(sockets.Config{
		Analyzers: protocols.NewRegistry(http1.New()),
		Sink: func(s *spans.Session) {
			c.mu.Lock()
			c.sessions = append(c.sessions, s)
			c.mu.Unlock()
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	c.stop = cancel
	go func() { c.done <- sockets.Run(ctx, tr.Events, c.tracker) }()
	t.Cleanup(func() { c.close(t) })
	return c
}

// wait returns the sessions once n have arrived (or fails after 10 s).
func (c *collector) wait(t *testing.T, n int) []*spans.Session {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		got := append([]*spans.Session(nil), c.sessions...)
		c.mu.Unlock()
		if len(got) >= n {
			// Give a straggler the chance to show up, so "exactly n"
			// is really checked.
			time.Sleep(200 * time.Millisecond)
			c.mu.Lock()
			got = append([]*spans.Session(nil), c.sessions...)
			c.mu.Unlock()
			return got
		}
		if time.Now().After(deadline) {
			ks, _ := c.tracer.Stats()
			t.Fatalf("got %d sessions, want %d (tracker %+v, kernel %+v): %s", len(got), n, c.tracker.Stats(), ks, describe(got))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *collector) close(t *testing.T) {
	if c.stop == nil {
		return
	}
	c.stop()
	if err := <-c.done; err != nil {
		t.Errorf("sockets.Run: %v", err)
	}
	if err := c.tracer.Close(); err != nil {
		t.Errorf("closing the tracer: %v", err)
	}
	c.stop = nil
}

func describe(ss []*spans.Session) string {
	var b strings.Builder
	for _, s := range ss {
		fmt.Fprintf(&b, "\n  kind=%d %s -> %s pid=%d comm=%s cgroup=%d conn=%d idx=%d %s", s.Kind, s.Client, s.Server,
			s.Process.PID, s.Process.Comm, s.CgroupID, s.ConnID, s.Index, s.Tx.Summary)
	}
	return b.String()
}

func attr(tx *protocols.Transaction, key string) attribute.Value {
	for _, kv := range tx.AllAttrs() {
		if string(kv.Key) == key {
			return kv.Value
		}
	}
	return attribute.Value{}
}

func byKind(ss []*spans.Session, k spans.Kind) []*spans.Session {
	var out []*spans.Session
	for _, s := range ss {
		if s.Kind == k {
			out = append(out, s)
		}
	}
	return out
}

// TestCurlNginx: one request from curl to nginx gives exactly one CLIENT
// session (curl's) and one SERVER session (nginx's), both complete and
// bound to the right process, cgroup and addresses.
func TestCurlNginx(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "ipv4", true: "ipv6"}[v6], func(t *testing.T) {
			p := testbed.NewHTTPPair(t)
			testbed.RequireTool(t, "curl")
			body := strings.Repeat("0123456789", 1234) // 12340 bytes: larger than the payload prefix
			p.WriteFile(t, "hello.txt", []byte(body))
			c := startTracer(t, probes.DefaultPayload, p.ClientCG.ID(), p.ServerCG.ID())

			url, srv, cli := p.URL("/hello.txt?lang=en"), p.ServerIP, p.ClientIP
			if v6 {
				url, srv, cli = p.URL6("/hello.txt?lang=en"), p.ServerIP6, p.ClientIP6
			}
			start := time.Now()
			out := p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H", "Cookie: session=hunter2", url)
			wall := time.Since(start)
			if out != "200 12340" {
				t.Fatalf("curl: %q", out)
			}
			got := c.wait(t, 2)
			if len(got) != 2 {
				t.Fatalf("got %d sessions, want 2: %s", len(got), describe(got))
			}
			for _, kind := range []spans.Kind{spans.Client, spans.Server} {
				ss := byKind(got, kind)
				if len(ss) != 1 {
					t.Fatalf("kind %d: %d sessions: %s", kind, len(ss), describe(got))
				}
				s := ss[0]
				wantComm, wantCG := "curl", p.ClientCG.ID()
				if kind == spans.Server {
					wantComm, wantCG = "nginx", p.ServerCG.ID()
				}
				if s.Process.Comm != wantComm || s.CgroupID != wantCG || s.Process.PID == 0 {
					t.Errorf("kind %d: process %+v cgroup %d, want %s in cgroup %d", kind, s.Process, s.CgroupID, wantComm, wantCG)
				}
				if s.CgroupPath != "" {
					t.Errorf("kind %d: CgroupPath %q set without a resolver", kind, s.CgroupPath)
				}
				if s.Server != netip.AddrPortFrom(srv, p.Port) || s.Client.Addr() != cli || s.Client.Port() == 0 {
					t.Errorf("kind %d: %s -> %s, want %s:* -> %s:%d", kind, s.Client, s.Server, cli, srv, p.Port)
				}
				if s.Index != 0 || s.Transport != "tcp" || s.Point != spans.PointSocket {
					t.Errorf("kind %d: index %d transport %q point %q", kind, s.Index, s.Transport, s.Point)
				}
				tx := s.Tx
				if tx.StatusCode != 200 || tx.Truncated || tx.NoResponse || tx.ErrorType != "" {
					t.Errorf("kind %d: %+v", kind, tx)
				}
				if m := attr(tx, "http.request.method").AsString(); m != "GET" {
					t.Errorf("method %q", m)
				}
				if p := attr(tx, "url.path").AsString(); p != "/hello.txt" {
					t.Errorf("url.path %q", p)
				}
				if q := attr(tx, "url.query").AsString(); q != "lang=en" {
					t.Errorf("url.query %q", q)
				}
				if n := attr(tx, "http.response.body.size").AsInt64(); n != 12340 {
					t.Errorf("http.response.body.size %d, want 12340", n)
				}
				if ua := attr(tx, "user_agent.original").AsString(); !strings.HasPrefix(ua, "curl/") {
					t.Errorf("user_agent.original %q", ua)
				}
				for _, kv := range tx.AllAttrs() {
					if strings.Contains(kv.Value.Emit(), "hunter2") {
						t.Errorf("cookie leaked in %s", kv.Key)
					}
				}
				d := time.Duration(tx.RespEnd - tx.ReqStart)
				if tx.ReqStart == 0 || d <= 0 || d >= wall {
					t.Errorf("kind %d: duration %v, want in (0, %v)", kind, d, wall)
				}
				if tx.RespBytes <= 12340 || tx.ReqBytes <= 0 {
					t.Errorf("kind %d: request %d bytes, response %d bytes", kind, tx.ReqBytes, tx.RespBytes)
				}
			}
			// Both ends saw the same bytes.
			cs, ss := byKind(got, spans.Client)[0], byKind(got, spans.Server)[0]
			if cs.ConnTag == 0 || cs.ConnTag != ss.ConnTag {
				t.Errorf("connection tags differ: client %#x, server %#x", cs.ConnTag, ss.ConnTag)
			}
			if cs.Tx.ReqBytes != ss.Tx.ReqBytes || cs.Tx.RespBytes != ss.Tx.RespBytes || cs.Client != ss.Client {
				t.Errorf("ends disagree: client %d/%d %s, server %d/%d %s", cs.Tx.ReqBytes, cs.Tx.RespBytes, cs.Client,
					ss.Tx.ReqBytes, ss.Tx.RespBytes, ss.Client)
			}
		})
	}
}

// TestGoKeepAlive: Go's net/http client makes several requests over one
// keep-alive connection: one session per request on each side, in order,
// on one connection each.
func TestGoKeepAlive(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	p.WriteFile(t, "a.txt", []byte("alpha\n"))
	p.WriteFile(t, "big.bin", []byte(strings.Repeat("x", 100000)))
	c := startTracer(t, 512, p.ClientCG.ID(), p.ServerCG.ID())
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	urls := []string{p.URL("/a.txt"), p.URL("/big.bin"), p.URL("/echo"), "POST:" + p.URL("/a.txt"), p.URL("/nope"), p.URL("/a.txt")}
	out := p.Client(t, []string{"CLOVISOR_TEST_HTTP_CLIENT=" + strings.Join(urls, " ")}, exe)
	t.Logf("client:\n%s", out)

	type want struct {
		method, path string
		status       int
		respBody     int64
	}
	wants := []want{{"GET", "/a.txt", 200, 6}, {"GET", "/big.bin", 200, 100000}, {"GET", "/echo", 200, 5},
		{"POST", "/a.txt", 405, -1}, {"GET", "/nope", 404, -1}, {"GET", "/a.txt", 200, 6}}
	got := c.wait(t, 2*len(wants))
	if len(got) != 2*len(wants) {
		t.Fatalf("got %d sessions, want %d: %s", len(got), 2*len(wants), describe(got))
	}
	for _, kind := range []spans.Kind{spans.Client, spans.Server} {
		ss := byKind(got, kind)
		if len(ss) != len(wants) {
			t.Fatalf("kind %d: %d sessions: %s", kind, len(ss), describe(got))
		}
		for i, s := range ss {
			w := wants[i]
			tx := s.Tx
			if s.ConnID != ss[0].ConnID || s.Index != i {
				t.Errorf("kind %d #%d: conn %d index %d, want conn %d index %d", kind, i, s.ConnID, s.Index, ss[0].ConnID, i)
			}
			if m := attr(tx, "http.request.method").AsString(); m != w.method || attr(tx, "url.path").AsString() != w.path || tx.StatusCode != w.status {
				t.Errorf("kind %d #%d: %s, want %s %s %d", kind, i, tx.Summary, w.method, w.path, w.status)
			}
			if w.respBody >= 0 {
				if n := attr(tx, "http.response.body.size").AsInt64(); n != w.respBody {
					t.Errorf("kind %d #%d: response body %d, want %d", kind, i, n, w.respBody)
				}
			}
			if w.method == "POST" {
				if n := attr(tx, "http.request.body.size").AsInt64(); n != 300 {
					t.Errorf("POST body %d, want 300", n)
				}
			}
			wantErr := ""
			if w.status >= 400 {
				wantErr = fmt.Sprint(w.status)
			}
			if tx.ErrorType != wantErr || tx.ServerFault {
				t.Errorf("kind %d #%d: error %q fault %v, want %q", kind, i, tx.ErrorType, tx.ServerFault, wantErr)
			}
			for _, kv := range tx.AllAttrs() {
				if strings.Contains(kv.Value.Emit(), "secret-token") {
					t.Errorf("authorization leaked in %s", kv.Key)
				}
			}
		}
	}
	st := c.tracker.Stats()
	if st.GapBytes != 0 || st.BadEvents != 0 || st.Reordered != 0 {
		t.Errorf("tracker stats %+v", st)
	}
	ks, err := c.tracer.Stats()
	if err != nil || ks.DataLost != 0 || ks.ConnLost != 0 {
		t.Errorf("kernel stats %+v %v", ks, err)
	}
}

// TestUntracedCgroupIgnored: traffic of cgroups not in the filter yields
// nothing.
func TestUntracedCgroupIgnored(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	testbed.RequireTool(t, "curl")
	p.WriteFile(t, "a.txt", []byte("alpha\n"))
	other := testbed.NewCgroup(t, "other")
	c := startTracer(t, probes.DefaultPayload, other.ID())
	p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", p.URL("/a.txt"))
	time.Sleep(300 * time.Millisecond)
	c.close(t)
	if len(c.sessions) != 0 {
		t.Fatalf("untraced cgroups produced sessions: %s", describe(c.sessions))
	}
	if st := c.tracker.Stats(); st.Events != 0 {
		t.Errorf("%d kernel events for untraced cgroups", st.Events)
	}
}

// TestPortFilter: with a port filter, only connections with one of the
// ports are traced (in the kernel: other traffic sends no events).
func TestPortFilter(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	testbed.RequireTool(t, "curl")
	p.WriteFile(t, "a.txt", []byte("alpha\n"))
	for _, tc := range []struct {
		port uint16
		want int
	}{{p.Port + 1, 0}, {p.Port, 2}} {
		c := startTracerWith(t, probes.Options{FilterCgroups: true, Ports: []uint16{tc.port}},
			p.ClientCG.ID(), p.ServerCG.ID())
		p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", p.URL("/a.txt"))
		if tc.want > 0 {
			c.wait(t, tc.want)
		} else {
			time.Sleep(300 * time.Millisecond)
		}
		c.close(t)
		if len(c.sessions) != tc.want {
			t.Errorf("port %d: %d sessions, want %d: %s", tc.port, len(c.sessions), tc.want, describe(c.sessions))
		}
		if st := c.tracker.Stats(); tc.want == 0 && st.Events != 0 {
			t.Errorf("port %d: %d events reached user space", tc.port, st.Events)
		}
	}
}

// TestServerClosesWithoutResponse: nginx closes the connection without
// answering (return 444): each end gets a span for the unanswered request
// that lasts until the connection closed.
func TestServerClosesWithoutResponse(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	testbed.RequireTool(t, "curl")
	c := startTracer(t, probes.DefaultPayload, p.ClientCG.ID(), p.ServerCG.ID())
	cmd, start := p.ClientCommand(context.Background(), "curl", "-sS", "-o", "/dev/null", p.URL("/drop"))
	if err := start(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Fatal("curl succeeded against a server that closes without answering")
	}
	got := c.wait(t, 2)
	if len(got) != 2 {
		t.Fatalf("%d sessions: %s", len(got), describe(got))
	}
	for _, s := range got {
		tx := s.Tx
		if !tx.NoResponse || tx.ErrorType != "no_response" || !tx.ServerFault || tx.StatusCode != 0 {
			t.Errorf("kind %d: %+v", s.Kind, tx)
		}
		if attr(tx, "url.path").AsString() != "/drop" || tx.CloseTS < tx.ReqEnd || tx.ReqEnd == 0 {
			t.Errorf("kind %d: path %q, request end %d, close %d", s.Kind, attr(tx, "url.path").AsString(), tx.ReqEnd, tx.CloseTS)
		}
	}
	if len(byKind(got, spans.Client)) != 1 || len(byKind(got, spans.Server)) != 1 {
		t.Errorf("kinds: %s", describe(got))
	}
}
