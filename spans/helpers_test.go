package spans

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/clovisor/clovisor/protocols"
)

// Fixed clock for tests: monotonic mono0 is wall time wall0.
var (
	wall0 = time.Date(2024, 5, 1, 9, 41, 7, 123456789, time.UTC)
	mono0 = uint64(1_000_000_000_000)
)

func frozen() *int64 {
	off := wall0.UnixNano() - int64(mono0)
	return &off
}

// clearOTelEnv makes the test independent of the caller's OTEL_* variables.
func clearOTelEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{
		"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
		"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
		"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
		"OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
		"OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME",
		"OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY",
		"OTEL_BSP_EXPORT_TIMEOUT", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
	} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// memExporter builds an otlp-mode Exporter writing to an InMemoryExporter,
// with the fixed clock.
func memExporter(t *testing.T, cfg Config) (*Exporter, *tracetest.InMemoryExporter) {
	t.Helper()
	clearOTelEnv(t)
	mem := tracetest.NewInMemoryExporter()
	cfg.Output = OutputOTLP
	cfg.Exporter = mem
	if cfg.frozenOffset == nil {
		cfg.frozenOffset = frozen()
	}
	e, err := New(context.Background(), cfg, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Shutdown(context.Background()) })
	return e, mem
}

// collect flushes e and returns the spans exported so far.
func collect(t *testing.T, e *Exporter, mem *tracetest.InMemoryExporter) tracetest.SpanStubs {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return mem.GetSpans()
}

// httpTx is a GET transaction lasting 1.234 ms from mono0.
func httpTx() *protocols.Transaction {
	return &protocols.Transaction{
		Protocol:  "http",
		Name:      "GET",
		Summary:   "GET /index.html 200",
		ReqStart:  mono0,
		ReqEnd:    mono0 + 100_000,
		RespStart: mono0 + 1_000_000,
		RespEnd:   mono0 + 1_234_000,
		ReqBytes:  80,
		RespBytes: 512,
		Attrs: []attribute.KeyValue{
			attribute.String("http.request.method", "GET"),
			attribute.String("url.path", "/index.html"),
			attribute.Int("http.response.status_code", 200),
			attribute.String("network.protocol.version", "1.1"),
		},
		StatusCode: 200,
	}
}

func clientSession() *Session {
	return &Session{
		Point:      PointSocket,
		Kind:       Client,
		Client:     netip.MustParseAddrPort("10.201.0.1:43210"),
		Server:     netip.MustParseAddrPort("10.201.0.2:8080"),
		Transport:  "tcp",
		Process:    Process{PID: 1234, Comm: "curl"},
		CgroupID:   4242,
		CgroupPath: "/user.slice/user-1000.slice/session-3.scope",
		ConnID:     77,
		Index:      0,
		Tx:         httpTx(),
	}
}

func serverSession() *Session {
	return &Session{
		Point:      PointSocket,
		Kind:       Server,
		Client:     netip.MustParseAddrPort("10.201.0.1:43210"),
		Server:     netip.MustParseAddrPort("10.201.0.2:8080"),
		Transport:  "tcp",
		Process:    Process{PID: 99, Comm: "nginx", Exe: "nginx"},
		CgroupID:   5151,
		CgroupPath: "/system.slice/nginx.service",
		ConnID:     78,
		Index:      0,
		Tx:         httpTx(),
	}
}

// attrMap turns attributes into key -> typed Go value.
func attrMap(kvs []attribute.KeyValue) map[string]any {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value.AsInterface()
	}
	return m
}

func equalMaps(t *testing.T, what string, got, want map[string]any) {
	t.Helper()
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("%s: missing %s (want %#v)", what, k, w)
			continue
		}
		if g != w {
			t.Errorf("%s: %s = %#v, want %#v", what, k, g, w)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected %s = %#v", what, k, g)
		}
	}
}
