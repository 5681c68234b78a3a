package sockets

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"testing"
	"unsafe"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
)

// benchRequest/benchResponse are a typical small keep-alive exchange.
const (
	benchRequest  = "GET /api/v1/items?id=42 HTTP/1.1\r\nHost: items.default.svc:8080\r\nUser-Agent: Go-http-client/1.1\r\nAccept-Encoding: gzip\r\n\r\n"
	benchResponse = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Sat, 21 Nov 2026 09:00:00 GMT\r\nContent-Length: 20\r\n\r\n{\"id\":42,\"ok\":true}\n"
)

var seqOffset = int(unsafe.Offsetof(probes.DataEvent{}.Seq))
var tsOffset = int(unsafe.Offsetof(probes.DataEvent{}.Ts))

// benchPipeline feeds b.N HTTP exchanges on one keep-alive connection
// through decoding, connection tracking, reassembly, the HTTP analyzer
// and span building and export (OTLP batch pipeline with a no-op
// destination). With bothEnds, client and server sockets are both traced:
// four events and two spans per exchange; otherwise two and one.
func benchPipeline(b *testing.B, bothEnds bool) {
	exp, err := spans.New(context.Background(), spans.Config{Output: "otlp", Exporter: tracetest.NewNoopExporter()},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	tk := NewTracker(Config{Analyzers: defaultRegistry(), Sink: exp.Export})
	type rec struct {
		raw []byte
		n   uint32
	}
	recs := []rec{
		{dataRecord(probes.DirRecv, 1, 0, 0, len(benchRequest), []byte(benchRequest), srvAddr, cliAddr), uint32(len(benchRequest))},
		{dataRecord(probes.DirSend, 1, 0, 0, len(benchResponse), []byte(benchResponse), srvAddr, cliAddr), uint32(len(benchResponse))},
	}
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleServer, 1, 1, srvAddr, cliAddr))
	if bothEnds {
		tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 2, 1, cliAddr, srvAddr))
		recs = append(recs[:0],
			rec{dataRecord(probes.DirSend, 2, 0, 0, len(benchRequest), []byte(benchRequest), cliAddr, srvAddr), uint32(len(benchRequest))},
			recs[0], recs[1],
			rec{dataRecord(probes.DirRecv, 2, 0, 0, len(benchResponse), []byte(benchResponse), cliAddr, srvAddr), uint32(len(benchResponse))})
	}
	ts := uint64(1000)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, r := range recs {
			ts += 1000
			binary.NativeEndian.PutUint64(r.raw[tsOffset:], ts)
			tk.Handle(r.raw)
			seq := binary.NativeEndian.Uint32(r.raw[seqOffset:])
			binary.NativeEndian.PutUint32(r.raw[seqOffset:], seq+r.n)
		}
	}
	b.StopTimer()
	if err := exp.Shutdown(context.Background()); err != nil {
		b.Fatal(err)
	}
	want := uint64(b.N)
	if bothEnds {
		want *= 2
	}
	if st := tk.Stats(); st.Sessions != want || st.GapBytes != 0 || st.Reordered != 0 {
		b.Fatalf("stats %+v, want %d sessions", st, want)
	}
	es := exp.Stats()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
	b.ReportMetric(float64(es.Dropped), "dropped-spans")
}

// BenchmarkPipelineServer: the server's socket only (2 events, 1 span per
// exchange).
func BenchmarkPipelineServer(b *testing.B) { benchPipeline(b, false) }

// BenchmarkPipelineBothEnds: client and server traced (4 events, 2 spans).
func BenchmarkPipelineBothEnds(b *testing.B) { benchPipeline(b, true) }
