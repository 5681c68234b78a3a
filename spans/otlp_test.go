package spans

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// otlpCollector records the OTLP/HTTP requests it receives.
type otlpCollector struct {
	mu      sync.Mutex
	reqs    []*coltracepb.ExportTraceServiceRequest
	paths   []string
	headers []http.Header
}

func (c *otlpCollector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	req := &coltracepb.ExportTraceServiceRequest{}
	isJSON := r.Header.Get("Content-Type") == "application/json"
	if isJSON {
		err = protojson.Unmarshal(body, req)
		fixJSONIDs(req)
	} else {
		err = proto.Unmarshal(body, req)
	}
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	c.mu.Lock()
	c.reqs = append(c.reqs, req)
	c.paths = append(c.paths, r.URL.Path)
	c.headers = append(c.headers, r.Header.Clone())
	c.mu.Unlock()
	if isJSON {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("{}"))
		return
	}
	resp, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	w.Write(resp)
}

// fixJSONIDs undoes protojson's reading of OTLP/JSON's hexadecimal IDs as
// base64.
func fixJSONIDs(req *coltracepb.ExportTraceServiceRequest) {
	fix := func(b []byte) []byte {
		if len(b) == 0 {
			return b
		}
		out, _ := hex.DecodeString(base64.StdEncoding.EncodeToString(b))
		return out
	}
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			for _, sp := range ss.Spans {
				sp.TraceId, sp.SpanId, sp.ParentSpanId = fix(sp.TraceId), fix(sp.SpanId), fix(sp.ParentSpanId)
			}
		}
	}
}

func pbAttrs(kvs []*commonpb.KeyValue) map[string]any {
	m := map[string]any{}
	for _, kv := range kvs {
		switch v := kv.Value.Value.(type) {
		case *commonpb.AnyValue_StringValue:
			m[kv.Key] = v.StringValue
		case *commonpb.AnyValue_IntValue:
			m[kv.Key] = v.IntValue
		case *commonpb.AnyValue_BoolValue:
			m[kv.Key] = v.BoolValue
		default:
			m[kv.Key] = kv.Value.String()
		}
	}
	return m
}

// checkOTLPSpan checks the request holds exactly the server span of
// serverSession() with its resource.
func checkOTLPSpan(t *testing.T, reqs []*coltracepb.ExportTraceServiceRequest) {
	t.Helper()
	var spans []*tracepb.Span
	var res map[string]any
	for _, r := range reqs {
		for _, rs := range r.ResourceSpans {
			res = pbAttrs(rs.Resource.Attributes)
			for _, ss := range rs.ScopeSpans {
				if ss.Scope.Name != ScopeName {
					t.Errorf("scope = %q", ss.Scope.Name)
				}
				spans = append(spans, ss.Spans...)
			}
		}
	}
	if len(spans) != 1 {
		t.Fatalf("collector got %d spans, want 1", len(spans))
	}
	sp := spans[0]
	if sp.Name != "GET" || sp.Kind != tracepb.Span_SPAN_KIND_SERVER {
		t.Errorf("span %q kind %v", sp.Name, sp.Kind)
	}
	if sp.StartTimeUnixNano != uint64(wall0.UnixNano()) || sp.EndTimeUnixNano != uint64(wall0.UnixNano()+1_234_000) {
		t.Errorf("times %d..%d", sp.StartTimeUnixNano, sp.EndTimeUnixNano)
	}
	tid, sid := linkIDs(serverSession())
	if hex.EncodeToString(sp.TraceId) != tid.String() || hex.EncodeToString(sp.ParentSpanId) != sid.String() {
		t.Errorf("trace %x parent %x, want %s %s", sp.TraceId, sp.ParentSpanId, tid, sid)
	}
	if sp.Status.GetCode() != tracepb.Status_STATUS_CODE_UNSET {
		t.Errorf("status %v", sp.Status)
	}
	equalMaps(t, "attributes", pbAttrs(sp.Attributes), map[string]any{
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
		"clovisor.cgroup.path":      "/system.slice/nginx.service",
	})
	if res["service.name"] != "nginx" || res["telemetry.sdk.language"] != "go" {
		t.Errorf("resource %v", res)
	}
}

func TestOTLPHTTP(t *testing.T) {
	for _, how := range []string{"config endpoint", "environment", "http/json"} {
		t.Run(how, func(t *testing.T) {
			clearOTelEnv(t)
			col := &otlpCollector{}
			srv := httptest.NewServer(col)
			defer srv.Close()

			cfg := Config{frozenOffset: frozen()}
			switch how {
			case "config endpoint":
				cfg.Output, cfg.Endpoint = OutputOTLP, srv.URL
			case "http/json":
				cfg.Output, cfg.Endpoint, cfg.Protocol = OutputOTLP, srv.URL+"/", ProtocolHTTPJSON
			default:
				// Output left empty: a configured collector means otlp;
				// the SDK exporter reads endpoint and headers itself.
				t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", srv.URL)
				t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-clovisor-test=yes")
			}
			e, err := New(context.Background(), cfg, quietLogger())
			if err != nil {
				t.Fatal(err)
			}
			e.Export(serverSession())
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := e.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			col.mu.Lock()
			defer col.mu.Unlock()
			checkOTLPSpan(t, col.reqs)
			if col.paths[0] != "/v1/traces" {
				t.Errorf("path = %q", col.paths[0])
			}
			if ct := col.headers[0].Get("Content-Type"); (how == "http/json") != (ct == "application/json") {
				t.Errorf("content type %q", ct)
			}
			if how == "environment" && col.headers[0].Get("x-clovisor-test") != "yes" {
				t.Errorf("headers from environment not sent: %v", col.headers[0])
			}
			if st := e.Stats(); st.Exported != 1 || st.Dropped != 0 || st.ExportErrors != 0 {
				t.Errorf("stats = %+v", st)
			}
		})
	}
}

// grpcCollector is an OTLP/gRPC trace service.
type grpcCollector struct {
	coltracepb.UnimplementedTraceServiceServer
	mu   sync.Mutex
	reqs []*coltracepb.ExportTraceServiceRequest
}

func (g *grpcCollector) Export(_ context.Context, r *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	g.mu.Lock()
	g.reqs = append(g.reqs, r)
	g.mu.Unlock()
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func TestOTLPGRPC(t *testing.T) {
	clearOTelEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	col := &grpcCollector{}
	coltracepb.RegisterTraceServiceServer(gs, col)
	go gs.Serve(ln)
	defer gs.Stop()

	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	e, err := New(context.Background(), Config{Output: OutputOTLP, Endpoint: "http://" + ln.Addr().String(), frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	e.Export(serverSession())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	checkOTLPSpan(t, col.reqs)
}

// TestOTLPGRPCUnreachable: with no collector, Export never blocks, memory
// stays bounded (drops are counted) and Shutdown honours its deadline.
func TestOTLPGRPCUnreachable(t *testing.T) {
	for _, kind := range []string{"refused", "blackhole"} {
		t.Run(kind, func(t *testing.T) {
			clearOTelEnv(t)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := ln.Addr().String()
			if kind == "refused" {
				ln.Close()
			} else {
				// Accepts connections and never answers.
				defer ln.Close()
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						defer c.Close()
					}
				}()
			}
			e, err := New(context.Background(), Config{
				Output:       OutputOTLP,
				Protocol:     ProtocolGRPC,
				Endpoint:     "http://" + addr,
				QueueSize:    1000,
				BatchTimeout: 10 * time.Millisecond,
				frozenOffset: frozen(),
			}, quietLogger())
			if err != nil {
				t.Fatal(err)
			}
			const n = 20000
			start := time.Now()
			for range n {
				e.Export(clientSession())
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("%d Exports took %v", n, d)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start = time.Now()
			err = e.Shutdown(ctx)
			if d := time.Since(start); d > time.Second {
				t.Errorf("Shutdown took %v with a 300ms deadline", d)
			}
			if err == nil {
				t.Errorf("Shutdown reported success with no collector")
			}
			st := e.Stats()
			if st.Exported != 0 || st.Dropped < n-1000 {
				t.Errorf("stats = %+v, want 0 exported and >= %d dropped", st, n-1000)
			}
			t.Logf("stats %+v, shutdown err %v", st, err)
			// What was still queued at the deadline is dropped by the
			// cancelled exports: in the end every span is accounted for.
			deadline := time.Now().Add(5 * time.Second)
			for e.Stats().Queued != 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if st := e.Stats(); st.Queued != 0 || st.Exported != 0 || st.Dropped != n {
				t.Errorf("final stats = %+v, want all %d dropped", st, n)
			}
		})
	}
}
