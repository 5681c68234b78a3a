package sockets

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
	"unsafe"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"golang.org/x/sys/unix"

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
var sentOffset = int(unsafe.Offsetof(probes.DataEvent{}.SentSeq))

// benchPipeline feeds b.N HTTP exchanges on one keep-alive connection
// through decoding, connection tracking, reassembly, the HTTP analyzer,
// span building and OTLP export (the SDK's OTLP/HTTP exporter, protobuf
// encoding and all, to a local server that discards the requests). With
// bothEnds, client and server sockets are both traced: four events and two
// spans per exchange; otherwise two and one.
//
// "Per core" is measured as CPU time: the process's user+system time over
// the run (every goroutine: exporter, batch processor and the discarding
// server too) divided by the exchanges, reported as cpu-ns/tx and
// tx/cpu-s. No span may be dropped, or the figure would flatter.
//
// With noop, the batch processor hands the spans to an exporter that
// drops them: the figure is Clovisor's own pipeline without the SDK's
// OTLP encoding and transport.
func benchPipeline(b *testing.B, bothEnds, noop bool) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer srv.Close()
	cfg := spans.Config{Output: "otlp", Protocol: "http/protobuf", Endpoint: srv.URL, QueueSize: 1 << 16}
	if noop {
		cfg.Exporter = tracetest.NewNoopExporter()
	}
	exp, err := spans.New(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	tk := NewTracker(Config{Analyzers: defaultRegistry(), Sink: exp.Export})
	// Records as the kernel writes them: each receive says how far its
	// socket's send stream was (sentStep: by how much that moves per
	// exchange); every stream starts at 0.
	type rec struct {
		raw      []byte
		n        uint32
		sentStep uint32
	}
	nReq, nResp := uint32(len(benchRequest)), uint32(len(benchResponse))
	recs := []rec{
		{recvRecord(1, 0, 0, benchRequest, 0, srvAddr, cliAddr), nReq, nResp},
		{dataRecord(probes.DirSend, 1, 0, 0, len(benchResponse), []byte(benchResponse), srvAddr, cliAddr), nResp, 0},
	}
	tk.Handle(openRecord(probes.RoleServer, 1, 1, 0, srvAddr, cliAddr))
	if bothEnds {
		tk.Handle(openRecord(probes.RoleClient, 2, 1, 0, cliAddr, srvAddr))
		recs = append(recs[:0],
			rec{dataRecord(probes.DirSend, 2, 0, 0, len(benchRequest), []byte(benchRequest), cliAddr, srvAddr), nReq, 0},
			recs[0], recs[1],
			rec{recvRecord(2, 0, 0, benchResponse, nReq, cliAddr, srvAddr), nResp, nReq})
	}
	ts := uint64(1000)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2048 == 2047 {
			// Let the exporter keep up (a real agent is paced by its
			// traffic): nothing is dropped, all export work is counted.
			if err := exp.Flush(context.Background()); err != nil {
				b.Fatal(err)
			}
		}
		for _, r := range recs {
			ts += 1000
			binary.NativeEndian.PutUint64(r.raw[tsOffset:], ts)
			tk.Handle(r.raw)
			seq := binary.NativeEndian.Uint32(r.raw[seqOffset:])
			binary.NativeEndian.PutUint32(r.raw[seqOffset:], seq+r.n)
			if r.sentStep != 0 {
				sent := binary.NativeEndian.Uint32(r.raw[sentOffset:])
				binary.NativeEndian.PutUint32(r.raw[sentOffset:], sent+r.sentStep)
			}
		}
	}
	if err := exp.Shutdown(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	cpu := cpuTime() - cpu0
	want := uint64(b.N)
	if bothEnds {
		want *= 2
	}
	if st := tk.Stats(); st.Sessions != want || st.GapBytes != 0 || st.Reordered != 0 || st.HeldReceives != 0 {
		b.Fatalf("stats %+v, want %d sessions", st, want)
	}
	if es := exp.Stats(); es.Dropped != 0 || es.Exported != want {
		b.Fatalf("exporter stats %+v, want %d exported and none dropped", es, want)
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/tx")
	b.ReportMetric(float64(b.N)/cpu.Seconds(), "tx/cpu-s")
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkPipelineServer: the server's socket only (2 events, 1 span per
// exchange).
func BenchmarkPipelineServer(b *testing.B) {
	b.Run("otlp-http", func(b *testing.B) { benchPipeline(b, false, false) })
	b.Run("noop-exporter", func(b *testing.B) { benchPipeline(b, false, true) })
}

// BenchmarkPipelineBothEnds: client and server traced (4 events, 2 spans).
func BenchmarkPipelineBothEnds(b *testing.B) {
	b.Run("otlp-http", func(b *testing.B) { benchPipeline(b, true, false) })
	b.Run("noop-exporter", func(b *testing.B) { benchPipeline(b, true, true) })
}
