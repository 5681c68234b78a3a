package spans

import (
	"context"
	"io"
	"testing"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

func BenchmarkExport(b *testing.B) {
	for _, mode := range []string{"console", "json", "otlp-noop"} {
		b.Run(mode, func(b *testing.B) {
			cfg := Config{Writer: io.Discard, frozenOffset: frozen()}
			switch mode {
			case "console":
				cfg.Output = OutputConsole
			case "json":
				cfg.Output = OutputJSON
			default:
				cfg.Output = OutputOTLP
				cfg.Exporter = tracetest.NewNoopExporter()
			}
			e, err := New(context.Background(), cfg, quietLogger())
			if err != nil {
				b.Fatal(err)
			}
			// Alternate client and server ends of linked exchanges of
			// a few services, as a busy host produces them.
			sessions := make([]*Session, 8)
			for i := range sessions {
				if i%2 == 0 {
					sessions[i] = clientSession()
				} else {
					sessions[i] = serverSession()
				}
				sessions[i].Index = i / 2
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				e.Export(sessions[i%len(sessions)])
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "spans/s")
			if err := e.Shutdown(context.Background()); err != nil {
				b.Fatal(err)
			}
			st := e.Stats()
			b.ReportMetric(float64(st.Dropped)/float64(b.N), "dropped/op")
		})
	}
}
