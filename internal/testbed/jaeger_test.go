package testbed

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// sendSpans exports a parent span and a child span of service svc through
// exp, and flushes them.
func sendSpans(t *testing.T, exp sdktrace.SpanExporter, svc string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithSyncer(exp),
		sdktrace.WithResource(resource.NewSchemaless(
			attribute.String("service.name", svc),
			attribute.String("host.name", "testbed-host"),
		)),
	)
	tr := tp.Tracer("testbed")
	pctx, parent := tr.Start(ctx, "GET /clovisor", trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(
			attribute.String("http.request.method", "GET"),
			attribute.Int64("http.response.status_code", 200),
			attribute.Int64("clovisor.cgroup_id", 1<<62+7), // beyond float64 precision
			attribute.Bool("clovisor.tls", true),
		))
	_, child := tr.Start(pctx, "SELECT users", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("db.system.name", "postgresql"),
			attribute.Float64("clovisor.ratio", 0.25),
		))
	child.End()
	parent.End()
	if err := tp.Shutdown(ctx); err != nil {
		t.Fatalf("exporting spans: %v", err)
	}
}

func tagOf(t *testing.T, s Span, key string) Tag {
	t.Helper()
	g, ok := s.Tag(key)
	if !ok {
		t.Fatalf("span %q has no tag %q; tags: %v", s.OperationName, key, s.Tags)
	}
	return g
}

func TestJaegerRoundTrip(t *testing.T) {
	j := StartJaeger(t)
	t.Logf("jaeger: otlp grpc %s, otlp http %s, query %s", j.OTLPGRPCEndpoint(), j.OTLPHTTPEndpoint(), j.QueryURL())

	if s, err := j.Services(); err != nil || len(s) != 0 {
		t.Fatalf("fresh Jaeger: Services() = %v, %v; want none (its own tracing must be off)", s, err)
	}
	if tr, err := j.Traces("nobody"); err != nil || len(tr) != 0 {
		t.Fatalf("Traces(unknown) = %v, %v; want none, no error", tr, err)
	}

	const svc = "clovisor-testbed-grpc"
	exp, err := otlptracegrpc.New(context.Background(),
		otlptracegrpc.WithEndpoint(j.OTLPGRPCEndpoint()), otlptracegrpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	sendSpans(t, exp, svc)

	spans := j.WaitForSpans(t, svc, 2, 15*time.Second)
	if len(spans) != 2 {
		t.Fatalf("got %d spans, want 2: %+v", len(spans), spans)
	}
	traces, err := j.Traces(svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(traces) != 1 || len(traces[0].Spans) != 2 {
		t.Fatalf("Traces(%q) = %+v; want one trace of two spans", svc, traces)
	}
	byOp := map[string]Span{}
	for _, s := range traces[0].Spans {
		byOp[s.OperationName] = s
	}
	parent, ok1 := byOp["GET /clovisor"]
	child, ok2 := byOp["SELECT users"]
	if !ok1 || !ok2 {
		t.Fatalf("operation names = %v; want GET /clovisor and SELECT users", slices.Sorted(maps.Keys(byOp)))
	}

	// Attributes with their Jaeger types and exact values.
	for _, c := range []struct {
		s         Span
		key, typ  string
		wantValue string
	}{
		{parent, "http.request.method", "string", "GET"},
		{parent, "http.response.status_code", "int64", "200"},
		{parent, "clovisor.cgroup_id", "int64", "4611686018427387911"},
		{parent, "clovisor.tls", "bool", "true"},
		{parent, "span.kind", "string", "server"},
		{child, "db.system.name", "string", "postgresql"},
		{child, "clovisor.ratio", "float64", "0.25"},
		{child, "span.kind", "string", "client"},
	} {
		g := tagOf(t, c.s, c.key)
		if g.Type != c.typ || g.String() != c.wantValue {
			t.Errorf("%s: tag %s = %s %q; want %s %q", c.s.OperationName, c.key, g.Type, g.String(), c.typ, c.wantValue)
		}
	}
	if v, err := tagOf(t, parent, "clovisor.cgroup_id").Int64(); err != nil || v != 1<<62+7 {
		t.Errorf("big int64 tag: Int64() = %d, %v; want %d", v, err, int64(1<<62+7))
	}
	if _, ok := tagOf(t, parent, "http.response.status_code").Value.(json.Number); !ok {
		t.Errorf("small int64 tag value is %T, want json.Number", tagOf(t, parent, "http.response.status_code").Value)
	}
	if v, err := tagOf(t, parent, "http.response.status_code").Int64(); err != nil || v != 200 {
		t.Errorf("Int64() = %d, %v; want 200", v, err)
	}

	// Structure: same trace, child refers to parent, timing sane.
	if parent.TraceID != traces[0].TraceID || child.TraceID != traces[0].TraceID {
		t.Errorf("trace IDs: trace %s, parent %s, child %s", traces[0].TraceID, parent.TraceID, child.TraceID)
	}
	if len(parent.References) != 0 {
		t.Errorf("parent references = %+v; want none", parent.References)
	}
	if len(child.References) != 1 || child.References[0].RefType != "CHILD_OF" || child.References[0].SpanID != parent.SpanID {
		t.Errorf("child references = %+v; want CHILD_OF %s", child.References, parent.SpanID)
	}
	now := time.Now().UnixMicro()
	for _, s := range []Span{parent, child} {
		if s.StartTime < now-60e6 || s.StartTime > now || s.Duration < 0 {
			t.Errorf("%s: startTime %d duration %d (now %d)", s.OperationName, s.StartTime, s.Duration, now)
		}
	}

	// Process: service.name and the other resource attributes.
	for _, s := range []Span{parent, child} {
		if s.Process.ServiceName != svc {
			t.Errorf("%s: process serviceName = %q; want %q", s.OperationName, s.Process.ServiceName, svc)
		}
		if g, ok := s.Process.Tag("host.name"); !ok || g.String() != "testbed-host" {
			t.Errorf("%s: process tag host.name = %+v, %v; want testbed-host", s.OperationName, g, ok)
		}
	}

	// The OTLP/HTTP receiver works too.
	const httpSvc = "clovisor-testbed-http"
	hexp, err := otlptracehttp.New(context.Background(),
		otlptracehttp.WithEndpointURL(j.OTLPHTTPEndpoint()+"/v1/traces"))
	if err != nil {
		t.Fatal(err)
	}
	sendSpans(t, hexp, httpSvc)
	if got := j.WaitForSpans(t, httpSvc, 2, 15*time.Second); len(got) != 2 {
		t.Errorf("OTLP/HTTP: got %d spans, want 2", len(got))
	}

	services, err := j.Services()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{svc, httpSvc}; !slices.Equal(services, want) {
		t.Errorf("Services() = %v; want %v", services, want)
	}
}

func TestStartJaegerReportsEarlyExit(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "jaeger")
	script := "#!/bin/sh\necho 'fake jaeger: bad config' >&2\nexit 3\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := startJaeger(t, fake)
	if err == nil || !strings.Contains(err.Error(), "exited before becoming healthy") ||
		!strings.Contains(err.Error(), "fake jaeger: bad config") {
		t.Fatalf("startJaeger with a failing binary: %v; want early exit with the log tail", err)
	}
}
