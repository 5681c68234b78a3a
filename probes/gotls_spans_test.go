package probes_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/probes/internal/gotlsdemo"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/sockets"
	"github.com/clovisor/clovisor/spans"
)

// TestGoTLSSpans: the Go HTTPS client and server, traced through the
// socket pipeline (tracker, HTTP/1.x analyzer, span exporter), give one
// CLIENT and one SERVER span per request, with method, path, status and
// body sizes from the plaintext, clovisor.payload.source "go_tls" and
// tls.protocol.version "1.3", bound to the right processes, cgroups and
// addresses; the ciphertext on the sockets yields nothing more.
func TestGoTLSSpans(t *testing.T) {
	for _, v := range []gotlsdemo.Variant{{Stripped: true}, {Go: gotlsdemo.OldGo, Stripped: true}} {
		t.Run(v.String(), func(t *testing.T) {
			bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), v)
			p := gotlsdemo.NewPair(t)
			srv := p.StartServer(t, bin)

			mode := os.Getenv("CLOVISOR_TEST_MODE")
			if mode == "" {
				mode = probes.ModeTracepoint
			}
			tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true})
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			for _, id := range []uint64{p.ClientCG.ID(), p.ServerCG.ID()} {
				if err := tr.AddCgroup(id); err != nil {
					t.Fatal(err)
				}
			}
			detach, err := probes.AttachGoTLS(tr, bin)
			if err != nil {
				t.Fatal(err)
			}
			defer detach()

			mem := tracetest.NewInMemoryExporter()
			exp, err := spans.New(context.Background(), spans.Config{Output: "otlp", Exporter: mem, BatchTimeout: 10 * time.Millisecond},
				slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer exp.Shutdown(context.Background())
			var mu sync.Mutex
			var got []*spans.Session
			tk := sockets.NewTracker(sockets.Config{
				Analyzers: protocols.NewRegistry(http1.New()),
				Sink: func(s *spans.Session) {
					mu.Lock()
					got = append(got, s)
					mu.Unlock()
					exp.Export(s)
				},
			})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- sockets.Run(ctx, tr.Events, tk) }()

			out, clientPID := p.RunClient(t, bin, "client", p.URL(""))
			if want := "GET /hello 200 1231\nPOST /echo 200 3000\nGET /nope 404 19\nGET /hello 200 1231\n"; out != want {
				t.Fatalf("client printed %q", out)
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				mu.Lock()
				n := len(got)
				mu.Unlock()
				if n >= 8 || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(200 * time.Millisecond) // so that "exactly 8" is checked
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if err := exp.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}

			type want struct {
				method, path     string
				status           int
				reqBody, resBody int64
			}
			wants := []want{{"GET", "/hello", 200, 0, 1231}, {"POST", "/echo", 200, 3000, 3000},
				{"GET", "/nope", 404, 0, 19}, {"GET", "/hello", 200, 0, 1231}}
			mu.Lock()
			sessions := append([]*spans.Session(nil), got...)
			mu.Unlock()
			if len(sessions) != 2*len(wants) {
				t.Fatalf("%d sessions, want %d: %s", len(sessions), 2*len(wants), describe(sessions))
			}
			for _, kind := range []spans.Kind{spans.Client, spans.Server} {
				var ss []*spans.Session
				for _, s := range sessions {
					if s.Kind == kind {
						ss = append(ss, s)
					}
				}
				if len(ss) != len(wants) {
					t.Fatalf("kind %d: %d sessions: %s", kind, len(ss), describe(sessions))
				}
				pid, cg := clientPID, p.ClientCG.ID()
				if kind == spans.Server {
					pid, cg = uint32(srv.Process.Pid), p.ServerCG.ID()
				}
				for i, s := range ss {
					w, tx := wants[i], s.Tx
					if s.Process.PID != pid || s.CgroupID != cg || s.Index != i || s.ConnID != ss[0].ConnID {
						t.Errorf("kind %d #%d: pid %d cgroup %d index %d conn %d, want %d %d %d %d",
							kind, i, s.Process.PID, s.CgroupID, s.Index, s.ConnID, pid, cg, i, ss[0].ConnID)
					}
					if s.Server != netip.AddrPortFrom(gotlsdemo.ServerAddr.Addr(), gotlsdemo.Port) || s.Client.Addr() != gotlsdemo.ClientAddr.Addr() {
						t.Errorf("kind %d #%d: %s -> %s", kind, i, s.Client, s.Server)
					}
					if s.PayloadSource != "go_tls" || s.TLS == nil || s.TLS.Version != "1.3" {
						t.Errorf("kind %d #%d: source %q TLS %+v", kind, i, s.PayloadSource, s.TLS)
					}
					if attr(tx, "http.request.method") != w.method || attr(tx, "url.path") != w.path || tx.StatusCode != w.status ||
						attr(tx, "url.scheme") != "https" || tx.Truncated || tx.NoResponse {
						t.Errorf("kind %d #%d: %s (%+v), want %s %s %d", kind, i, tx.Summary, tx.AllAttrs(), w.method, w.path, w.status)
					}
					if attr(tx, "http.response.body.size") != fmt.Sprint(w.resBody) ||
						(w.reqBody > 0 && attr(tx, "http.request.body.size") != fmt.Sprint(w.reqBody)) {
						t.Errorf("kind %d #%d: body sizes: %+v", kind, i, tx.AllAttrs())
					}
				}
			}
			st := tk.Stats()
			// TLS connections: the client's and the server's socket, and
			// sometimes the server's socket once more: its close_notify
			// alert, sent as the client's reset arrives, is reported
			// (with local port 0) after the socket's close event.
			if st.TLSConns < 2 || st.TLSConns > 3 || st.DuplicatePlaintext != 0 || st.GarbageBytes != 0 || st.Unrecognized != 0 || st.GapBytes != 0 {
				t.Errorf("tracker stats %+v", st)
			}

			// The exported spans carry the same.
			exported := mem.GetSpans()
			if len(exported) != 2*len(wants) {
				t.Fatalf("%d spans exported", len(exported))
			}
			kinds := map[trace.SpanKind]int{}
			for _, s := range exported {
				kinds[s.SpanKind]++
				a := map[string]string{}
				for _, kv := range s.Attributes {
					a[string(kv.Key)] = kv.Value.Emit()
				}
				if a["clovisor.payload.source"] != "go_tls" || a["tls.protocol.version"] != "1.3" || a["http.request.method"] == "" ||
					a["url.path"] == "" || a["http.response.status_code"] == "" {
					t.Errorf("span %s: %v", s.Name, a)
				}
			}
			if kinds[trace.SpanKindClient] != len(wants) || kinds[trace.SpanKindServer] != len(wants) {
				t.Errorf("span kinds %v", kinds)
			}
		})
	}
}

func attr(tx *protocols.Transaction, key string) string {
	for _, kv := range tx.AllAttrs() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

func describe(ss []*spans.Session) string {
	var s string
	for _, x := range ss {
		s += fmt.Sprintf("\n  kind=%d %s -> %s pid=%d conn=%d idx=%d src=%s %s", x.Kind, x.Client, x.Server, x.Process.PID, x.ConnID, x.Index, x.PayloadSource, x.Tx.Summary)
	}
	return s
}
