package spans

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// counters are the Exporter's statistics.
type counters struct {
	exported atomic.Uint64
	dropped  atomic.Uint64
	errors   atomic.Uint64
	// pending counts spans handed to the batch processor and not yet
	// returned by an export (queued, batched or being exported).
	pending atomic.Int64
}

// countingExporter wraps the destination SpanExporter to count what it
// exports, fails to export and, for the batch path, to release pending.
type countingExporter struct {
	next         sdktrace.SpanExporter
	c            *counters
	trackPending bool
}

// ExportSpans implements sdktrace.SpanExporter.
func (e *countingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	err := e.next.ExportSpans(ctx, spans)
	n := uint64(len(spans))
	if e.trackPending {
		e.c.pending.Add(-int64(n))
	}
	if err != nil {
		e.c.errors.Add(1)
		e.c.dropped.Add(n)
		return err
	}
	e.c.exported.Add(n)
	return nil
}

// Shutdown implements sdktrace.SpanExporter.
func (e *countingExporter) Shutdown(ctx context.Context) error {
	return e.next.Shutdown(ctx)
}

// boundedProcessor is what Export hands finished spans to. It forwards them
// to the real processor (batch or simple), bounding what the batch processor
// holds. The Exporter flushes and shuts the real processor (and with it the
// SpanExporter) down itself.
type boundedProcessor struct {
	next sdktrace.SpanProcessor
	c    *counters
	// limit bounds c.pending (0: no bound). It is at most the batch
	// processor's queue size, so the batch processor never drops a span
	// itself and every drop is counted here.
	limit int64
}

// OnEnd passes s on unless the batch processor's queue is full, in which
// case it counts s as dropped. It never blocks.
func (p *boundedProcessor) OnEnd(s sdktrace.ReadOnlySpan) {
	if p.limit > 0 {
		// Only the Exporter's (locked) Export calls OnEnd, so checking
		// and then adding does not race with another OnEnd; exports
		// only lower pending meanwhile.
		if p.c.pending.Load() >= p.limit {
			p.c.dropped.Add(1)
			return
		}
		p.c.pending.Add(1)
	}
	p.next.OnEnd(s)
}

// errorHandler logs OpenTelemetry errors (failed exports, partial success
// reports) through slog, at most once per interval; it counts the errors in
// between and reports the count with the next one it logs.
type errorHandler struct {
	log      *slog.Logger
	interval time.Duration
	now      func() time.Time

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// Handle implements otel.ErrorHandler.
func (h *errorHandler) Handle(err error) {
	if err == nil {
		return
	}
	h.mu.Lock()
	now := h.now()
	if !h.last.IsZero() && now.Sub(h.last) < h.interval {
		h.suppressed++
		h.mu.Unlock()
		return
	}
	n := h.suppressed
	h.last, h.suppressed = now, 0
	h.mu.Unlock()
	h.log.Warn("opentelemetry error", "err", err, "suppressed", n)
}
