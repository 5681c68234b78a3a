package spans

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

var cest = time.FixedZone("CEST", 2*3600)

func consoleExporter(t *testing.T, buf *bytes.Buffer) *Exporter {
	t.Helper()
	clearOTelEnv(t)
	e, err := New(context.Background(), Config{Output: OutputConsole, Writer: buf, Location: cest, frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestConsoleLines(t *testing.T) {
	var buf bytes.Buffer
	e := consoleExporter(t, &buf)

	e.Export(clientSession())
	e.Export(serverSession())

	s := serverSession()
	s.Tx.Summary = "GET /index.html 503"
	s.Tx.ErrorType, s.Tx.ServerFault, s.Tx.Truncated = "503", true, true
	e.Export(s)

	s = clientSession()
	s.Client = netip.MustParseAddrPort("[fd00::1]:43210")
	s.Server = netip.MustParseAddrPort("[::ffff:10.201.0.2]:8080")
	s.Tx.Summary = "GET /\x1b[31mred\u2028 404"
	s.Tx.ErrorType = "404"
	s.Tx.RespEnd = mono0 + 850
	e.Export(s)

	s = clientSession()
	s.Process.Exe = "curl-wrapper"
	s.Tx.Summary = ""
	s.Tx.Name = "POST"
	s.Tx.RespEnd = mono0 + 2_500_000_000
	s.Tx.NoResponse = true
	e.Export(s)

	w := wireSession()
	w.Tx.Summary = "GET /index.html 200"
	e.Export(w)

	s = serverSession()
	s.PayloadSource = "openssl"
	s.TLS = &TLSInfo{Version: "1.3", Cipher: "TLS_AES_128_GCM_SHA256"}
	e.Export(s)
	s = clientSession()
	s.PayloadSource = "ktls"
	s.TLS = &TLSInfo{}
	e.Export(s)

	if err := e.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"11:41:07.123 curl[1234] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 200 1.234ms CLIENT\n" +
		"11:41:07.123 nginx[99] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 200 1.234ms SERVER\n" +
		"11:41:07.123 nginx[99] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 503 1.234ms SERVER !truncated !error=503\n" +
		"11:41:07.123 curl[1234] [fd00::1]:43210 -> 10.201.0.2:8080 GET /\\x1b[31mred\\u2028 404 850ns CLIENT !error=404\n" +
		"11:41:07.123 curl-wrapper[1234] 10.201.0.1:43210 -> 10.201.0.2:8080 POST 2.500s CLIENT\n" +
		"11:41:07.123 pod_veth@cali12345 10.201.20.11:43210 -> 10.201.20.12:8080 GET /index.html 200 1.234ms INTERNAL\n" +
		"11:41:07.123 nginx[99] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 200 1.234ms SERVER tls1.3 via=openssl\n" +
		"11:41:07.123 curl[1234] 10.201.0.1:43210 -> 10.201.0.2:8080 GET /index.html 200 1.234ms CLIENT tls via=ktls\n"
	if got := buf.String(); got != want {
		t.Errorf("console output:\n%s\nwant:\n%s", got, want)
	}
	if st := e.Stats(); st.Exported != 8 || st.Dropped != 0 {
		t.Errorf("stats = %+v", st)
	}
}

func TestAppendDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-5:                                       "0ns",
		0:                                        "0ns",
		850:                                      "850ns",
		12345:                                    "12.345µs",
		1234 * time.Microsecond:                  "1.234ms",
		999999 * time.Microsecond:                "999.999ms",
		2500 * time.Millisecond:                  "2.500s",
		63*time.Second + 456700*time.Microsecond: "1m3.457s",
	} {
		if got := string(appendDuration(nil, d)); got != want {
			t.Errorf("%d: %q, want %q", d, got, want)
		}
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestConsoleWriteErrorCounted(t *testing.T) {
	clearOTelEnv(t)
	e, err := New(context.Background(), Config{Output: OutputConsole, Writer: failingWriter{}, frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	e.Export(clientSession())
	e.Export(clientSession())
	e.Shutdown(context.Background())
	if st := e.Stats(); st.Exported != 0 || st.Dropped != 2 || st.ExportErrors != 2 {
		t.Errorf("stats = %+v", st)
	}
}

// TestJSONExact checks the JSON exporter's exact line for a fixed span.
func TestJSONExact(t *testing.T) {
	tid, _ := trace.TraceIDFromHex("0102030405060708090a0b0c0d0e0f10")
	sid, _ := trace.SpanIDFromHex("1112131415161718")
	psid, _ := trace.SpanIDFromHex("2122232425262728")
	stub := tracetest.SpanStub{
		Name: "GET /users/{id}",
		SpanContext: trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled,
		}),
		Parent: trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: tid, SpanID: psid, Remote: true,
		}),
		SpanKind:  trace.SpanKindServer,
		StartTime: wall0,
		EndTime:   wall0.Add(1234 * time.Microsecond),
		Attributes: []attribute.KeyValue{
			attribute.String("http.request.method", "GET"),
			attribute.Int("http.response.status_code", 500),
			attribute.Bool("clovisor.truncated", true),
			attribute.Float64("x.ratio", 0.5),
			attribute.Float64("x.nan", math.NaN()),
			attribute.StringSlice("http.request.header.accept", []string{"a\"b", "c\\d"}),
			attribute.Int64Slice("x.ints", []int64{1, -2}),
			attribute.BoolSlice("x.bools", []bool{true, false}),
			attribute.Float64Slice("x.floats", []float64{1.5}),
			attribute.String("url.path", "/\n\x01\xff<é>"),
		},
		Status:   sdktrace.Status{Code: codes.Error, Description: "500"},
		Resource: resource.NewSchemaless(attribute.String("service.name", "nginx"), attribute.String("host.name", "h1")),
	}
	var buf bytes.Buffer
	if err := NewJSONExporter(&buf).ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{stub.Snapshot()}); err != nil {
		t.Fatal(err)
	}
	want := `{"name":"GET /users/{id}","kind":"SERVER","trace_id":"0102030405060708090a0b0c0d0e0f10","span_id":"1112131415161718","parent_span_id":"2122232425262728",` +
		`"start":"2024-05-01T09:41:07.123456789Z","end":"2024-05-01T09:41:07.124690789Z","duration_ns":1234000,` +
		`"status":{"code":"Error","description":"500"},` +
		`"resource":{"host.name":"h1","service.name":"nginx"},` +
		`"attributes":{"http.request.method":"GET","http.response.status_code":500,"clovisor.truncated":true,"x.ratio":0.5,"x.nan":"NaN",` +
		`"http.request.header.accept":["a\"b","c\\d"],"x.ints":[1,-2],"x.bools":[true,false],"x.floats":[1.5],"url.path":"/\n\u0001\ufffd<é>"}}` + "\n"
	if got := buf.String(); got != want {
		t.Errorf("json:\n%s\nwant:\n%s", got, want)
	}
	var v map[string]any
	if err := json.Unmarshal(buf.Bytes(), &v); err != nil {
		t.Errorf("not valid JSON: %v", err)
	}

	// A root span has an empty parent_span_id and no description.
	stub.Parent = trace.SpanContext{}
	stub.Status = sdktrace.Status{}
	buf.Reset()
	NewJSONExporter(&buf).ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{stub.Snapshot()})
	if !strings.Contains(buf.String(), `"parent_span_id":"","start"`) || !strings.Contains(buf.String(), `"status":{"code":"Unset"}`) {
		t.Errorf("root span json: %s", buf.String())
	}
}

// TestJSONEndToEnd checks the json mode's lines decode to the exact span.
func TestJSONEndToEnd(t *testing.T) {
	clearOTelEnv(t)
	var buf bytes.Buffer
	e, err := New(context.Background(), Config{Output: OutputJSON, Writer: &buf, frozenOffset: frozen()}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	c := clientSession()
	c.Index = 7
	e.Export(c)
	s := serverSession()
	s.Index = 7
	s.Tx.ErrorType, s.Tx.ServerFault = "503", true
	e.Export(s)
	e.Shutdown(context.Background())

	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %q", len(lines), buf.String())
	}
	tid, sid := linkIDs(c)
	host, _ := os.Hostname()
	for i, line := range lines {
		var v struct {
			Name       string
			Kind       string
			TraceID    string `json:"trace_id"`
			SpanID     string `json:"span_id"`
			Parent     string `json:"parent_span_id"`
			Start, End string
			Duration   int64 `json:"duration_ns"`
			Status     map[string]string
			Resource   map[string]any
			Attributes map[string]any
		}
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if v.Name != "GET" || v.Start != "2024-05-01T09:41:07.123456789Z" || v.End != "2024-05-01T09:41:07.124690789Z" || v.Duration != 1234000 || v.TraceID != tid.String() {
			t.Errorf("line %d: %+v", i, v)
		}
		if v.Resource["host.name"] != host {
			t.Errorf("line %d: resource %v", i, v.Resource)
		}
		// JSON numbers decode as float64.
		if v.Attributes["server.port"] != float64(8080) || v.Attributes["process.pid"] == nil {
			t.Errorf("line %d: attributes %v", i, v.Attributes)
		}
		if _, ok := v.Attributes["clovisor.summary"]; ok {
			t.Errorf("line %d: summary attribute in json mode", i)
		}
		switch i {
		case 0:
			if v.Kind != "CLIENT" || v.SpanID != sid.String() || v.Parent != "" || v.Status["code"] != "Unset" || v.Resource["service.name"] != "curl" {
				t.Errorf("client line: %+v", v)
			}
		case 1:
			if v.Kind != "SERVER" || v.Parent != sid.String() || v.Status["code"] != "Error" || v.Status["description"] != "503" ||
				v.Attributes["error.type"] != "503" || v.Resource["service.name"] != "nginx" {
				t.Errorf("server line: %+v", v)
			}
		}
	}
}

func TestErrorHandlerRateLimited(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1000, 0)
	h := &errorHandler{
		log:      slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: dropTime})),
		interval: 10 * time.Second,
		now:      func() time.Time { return now },
	}
	for range 5 {
		h.Handle(errors.New("connection refused"))
		now = now.Add(time.Second)
	}
	now = now.Add(6 * time.Second) // 11 s after the first
	h.Handle(errors.New("still refused"))
	h.Handle(nil)
	want := "level=WARN msg=\"opentelemetry error\" err=\"connection refused\" suppressed=0\n" +
		"level=WARN msg=\"opentelemetry error\" err=\"still refused\" suppressed=4\n"
	if buf.String() != want {
		t.Errorf("log:\n%s\nwant:\n%s", buf.String(), want)
	}
}

func dropTime(_ []string, a slog.Attr) slog.Attr {
	if a.Key == slog.TimeKey {
		return slog.Attr{}
	}
	return a
}

func TestCollectorConfigured(t *testing.T) {
	clearOTelEnv(t)
	if CollectorConfigured() {
		t.Error("configured with no variables")
	}
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")
	if !CollectorConfigured() {
		t.Error("TRACES_ENDPOINT not seen")
	}
	os.Unsetenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
	if !CollectorConfigured() {
		t.Error("ENDPOINT not seen")
	}
	if o, _ := (Config{}).output(); o != OutputOTLP {
		t.Errorf("default output with collector = %q", o)
	}
	os.Unsetenv("OTEL_EXPORTER_OTLP_ENDPOINT")
	if o, _ := (Config{}).output(); o != OutputConsole {
		t.Errorf("default output without collector = %q", o)
	}
	if _, err := (Config{Output: "xml"}).output(); err == nil {
		t.Error("bad output accepted")
	}
}

func TestProtocol(t *testing.T) {
	cases := []struct {
		cfg, traces, general string
		want                 string
		bad                  bool
	}{
		{"", "", "", ProtocolHTTPProtobuf, false},
		{"", "", "grpc", ProtocolGRPC, false},
		{"", "http/protobuf", "grpc", ProtocolHTTPProtobuf, false},
		{"", "grpc", "http/protobuf", ProtocolGRPC, false},
		{"", "http/json", "", ProtocolHTTPJSON, false},
		{"grpc", "http/protobuf", "http/protobuf", ProtocolGRPC, false},
		{"", "thrift", "", "", true},
	}
	for _, c := range cases {
		clearOTelEnv(t)
		if c.traces != "" {
			t.Setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", c.traces)
		}
		if c.general != "" {
			t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", c.general)
		}
		got, err := Config{Protocol: c.cfg}.protocol()
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("%+v: %q, %v", c, got, err)
		}
	}
}
