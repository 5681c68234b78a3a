package spans

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/sdk/instrumentation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of Clovisor's spans.
const ScopeName = "github.com/clovisor/clovisor"

// Stats counts what an Exporter did with the sessions it was given.
type Stats struct {
	// Exported counts spans the output accepted (OTLP: the collector
	// acknowledged the request; console/json: the line was written).
	Exported uint64
	// Dropped counts spans lost: the queue was full, the export failed,
	// the session was unusable or came after Shutdown.
	Dropped uint64
	// ExportErrors counts failed export calls (each may carry many spans).
	ExportErrors uint64
	// Queued is the number of spans waiting in the OTLP batch processor
	// (queued or being exported); they end up Exported or Dropped.
	Queued int64
	// Resources is the number of per-service resources cached.
	Resources int
}

// Exporter turns Sessions into spans and exports them.
//
// It builds every span directly as a finished sdktrace.ReadOnlySpan (its
// times, attributes and IDs are all known when the Session arrives) and hands
// it to the output's span processor, without the SDK's TracerProvider and
// live spans.
type Exporter struct {
	mode  string
	log   *slog.Logger
	clock *monoClock
	base  []attribute.KeyValue
	link  func(*Session) bool
	c     *counters
	proc  sdktrace.SpanProcessor // the real processor, shut down once
	gate  *boundedProcessor      // what Export hands spans to
	dest  sdktrace.SpanExporter  // the destination exporter
	norm  *sdktrace.TracerProvider
	nres  atomic.Int64 // len(lru), for Stats without the lock
	scope instrumentation.Scope

	// enrich, when set, names the Kubernetes workloads (spans/k8s.go).
	enrich Enricher

	mu      sync.Mutex // guards everything below; held by Export
	closed  bool
	attrs   attrBuilder
	ids     idGen
	links   *linkCache
	lru     map[service]*resEntry
	head    *resEntry // most recently used
	tail    *resEntry // least recently used
	maxRes  int
	summary bool
}

// resEntry is one service's resource in the LRU list.
type resEntry struct {
	key        service
	res        *resource.Resource
	prev, next *resEntry
}

// New builds an Exporter. For "otlp" it creates the SDK exporter for the
// configured protocol (which does not connect yet). It installs a
// rate-limited slog handler as OpenTelemetry's global error handler. log may
// be nil (slog.Default()).
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Exporter, error) {
	if log == nil {
		log = slog.Default()
	}
	mode, err := cfg.output()
	if err != nil {
		return nil, err
	}
	e := &Exporter{
		mode:    mode,
		log:     log,
		link:    cfg.Link,
		enrich:  cfg.Enricher,
		c:       &counters{},
		lru:     make(map[service]*resEntry),
		maxRes:  cfg.MaxResources,
		summary: mode == OutputConsole,
		ids:     newIDGen(),
		links:   new(linkCache),
		scope:   instrumentation.Scope{Name: ScopeName},
	}
	if e.maxRes <= 0 {
		e.maxRes = DefaultMaxResources
	}

	interval := cfg.ErrorInterval
	if interval <= 0 {
		interval = DefaultErrorInterval
	}
	otel.SetErrorHandler(&errorHandler{log: log, interval: interval, now: time.Now})

	base, err := baseResourceAttrs(ctx)
	if err != nil {
		log.Warn("resource detection incomplete", "err", err)
	}
	e.base = base

	switch mode {
	case OutputOTLP:
		dest := cfg.Exporter
		if dest == nil {
			proto, err := cfg.protocol()
			if err != nil {
				return nil, err
			}
			dest, err = newOTLPExporter(ctx, cfg, proto)
			if err != nil {
				return nil, err
			}
			log.Debug("otlp exporter", "protocol", proto)
		}
		e.dest = dest
		q := cfg.QueueSize
		if q <= 0 {
			q = DefaultQueueSize
			if v, err := strconv.Atoi(os.Getenv("OTEL_BSP_MAX_QUEUE_SIZE")); err == nil && v > 0 {
				q = v
			}
		}
		batch := sdktrace.DefaultMaxExportBatchSize
		if v, err := strconv.Atoi(os.Getenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")); err == nil && v > 0 {
			batch = v
		}
		opts := []sdktrace.BatchSpanProcessorOption{
			sdktrace.WithMaxQueueSize(q),
			sdktrace.WithMaxExportBatchSize(min(batch, q)),
		}
		if cfg.BatchTimeout > 0 {
			opts = append(opts, sdktrace.WithBatchTimeout(cfg.BatchTimeout))
		}
		if cfg.ExportTimeout > 0 {
			opts = append(opts, sdktrace.WithExportTimeout(cfg.ExportTimeout))
		}
		e.proc = sdktrace.NewBatchSpanProcessor(&countingExporter{next: dest, c: e.c, trackPending: true}, opts...)
		e.gate = &boundedProcessor{next: e.proc, c: e.c, limit: int64(q)}
	case OutputConsole, OutputJSON:
		w := cfg.Writer
		if w == nil {
			w = os.Stdout
		}
		if mode == OutputConsole {
			e.dest = NewConsoleExporter(w, cfg.Location)
		} else {
			e.dest = NewJSONExporter(w)
		}
		e.proc = sdktrace.NewSimpleSpanProcessor(&countingExporter{next: e.dest, c: e.c})
		e.gate = &boundedProcessor{next: e.proc, c: e.c}
	}
	// The span limits of the environment, as an SDK TracerProvider would
	// apply them, and a provider (with no processor) to apply them to the
	// rare attribute lists that need more than a copy (see attrBuilder).
	limits := sdktrace.NewSpanLimits()
	e.attrs.countLimit = limits.AttributeCountLimit
	e.attrs.lengthLimit = limits.AttributeValueLengthLimit
	e.norm = sdktrace.NewTracerProvider(
		sdktrace.WithRawSpanLimits(limits),
		sdktrace.WithResource(resource.Empty()),
		sdktrace.WithSampler(sdktrace.AlwaysSample()),
	)
	e.attrs.norm = e.norm.Tracer(ScopeName)
	e.clock = newMonoClock(clockRefresh, cfg.frozenOffset)
	return e, nil
}

// Export turns s into one span and hands it to the output. It does not block
// on the network: in "otlp" mode a full queue drops the span (counted in
// Stats). Console and json write their line before returning. Export is
// meant to be called from one goroutine; concurrent calls are safe but
// serialised.
func (e *Exporter) Export(s *Session) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed || s == nil || s.Tx == nil {
		e.c.dropped.Add(1)
		return
	}
	tx := s.Tx
	sv, peer := e.enrichment(s)
	res := e.resource(sv)

	var start, end time.Time
	if ms, me, ok := spanTimes(tx); ok {
		start, end = e.clock.wall(ms), e.clock.wall(me)
	} else {
		start = time.Now()
		end = start
	}
	failed, errType := spanError(s)
	attrs, droppedAttrs := e.attrs.build(s, errType, e.summary)
	if peer != nil {
		attrs, droppedAttrs = e.appendPeer(attrs, droppedAttrs, peer)
	}

	var tid trace.TraceID
	var sid trace.SpanID
	var parent trace.SpanContext
	if (s.Kind == Client || s.Kind == Server) && e.linkable(s) {
		ltid, lsid := e.links.ids(s)
		if s.Kind == Client && s.Wire == nil {
			tid, sid = ltid, lsid
		} else {
			// A server, or a wire observation on either side: a
			// child of the client's span (see the package doc).
			tid, sid = ltid, e.ids.spanID(lsid)
			parent = trace.NewSpanContext(trace.SpanContextConfig{
				TraceID:    ltid,
				SpanID:     lsid,
				TraceFlags: trace.FlagsSampled,
				Remote:     true,
			})
		}
	} else {
		tid, sid = e.ids.traceID(), e.ids.spanID(trace.SpanID{})
	}
	name := tx.Name
	if name == "" {
		name = tx.Protocol
	}
	if name == "" {
		name = "transaction"
	}
	var status sdktrace.Status
	if failed {
		status = sdktrace.Status{Code: codes.Error, Description: errType}
	}
	e.gate.OnEnd(tracetest.SpanStub{
		Name: name,
		SpanContext: trace.NewSpanContext(trace.SpanContextConfig{
			TraceID:    tid,
			SpanID:     sid,
			TraceFlags: trace.FlagsSampled,
		}),
		Parent:               parent,
		SpanKind:             spanKind(s.Kind),
		StartTime:            start,
		EndTime:              end,
		Attributes:           attrs,
		DroppedAttributes:    droppedAttrs,
		Status:               status,
		Resource:             res,
		InstrumentationScope: e.scope,
	}.Snapshot())
}

func (e *Exporter) linkable(s *Session) bool {
	if s.Index < 0 || !s.Client.Addr().IsValid() || !s.Server.Addr().IsValid() {
		return false
	}
	return e.link == nil || e.link(s)
}

// resource returns the resource of service sv, creating it (and forgetting
// the least recently used one beyond MaxResources) as needed. Spans of one
// service share one *resource.Resource.
func (e *Exporter) resource(sv service) *resource.Resource {
	if ent, ok := e.lru[sv]; ok {
		if ent != e.head {
			e.unlink(ent)
			e.pushFront(ent)
		}
		return ent.res
	}
	ent := &resEntry{key: sv, res: newResource(e.base, sv)}
	e.lru[sv] = ent
	e.nres.Add(1)
	e.pushFront(ent)
	for len(e.lru) > e.maxRes {
		// Spans already made keep their pointer to it.
		old := e.tail
		e.unlink(old)
		delete(e.lru, old.key)
		e.nres.Add(-1)
	}
	return ent.res
}

func (e *Exporter) pushFront(ent *resEntry) {
	ent.prev, ent.next = nil, e.head
	if e.head != nil {
		e.head.prev = ent
	}
	e.head = ent
	if e.tail == nil {
		e.tail = ent
	}
}

func (e *Exporter) unlink(ent *resEntry) {
	if ent.prev != nil {
		ent.prev.next = ent.next
	} else {
		e.head = ent.next
	}
	if ent.next != nil {
		ent.next.prev = ent.prev
	} else {
		e.tail = ent.prev
	}
	ent.prev, ent.next = nil, nil
}

// Flush exports every span handed to Export so far, waiting at most until
// ctx is done.
func (e *Exporter) Flush(ctx context.Context) error {
	return e.proc.ForceFlush(ctx)
}

// Shutdown exports what is pending, then stops the output and releases
// everything. It returns when done or when ctx is done, whichever comes
// first (the latter with ctx's error; exports still running are cancelled).
// Export after Shutdown drops the session. Only the first call does work.
func (e *Exporter) Shutdown(ctx context.Context) error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	e.lru = map[service]*resEntry{}
	e.nres.Store(0)
	e.head, e.tail = nil, nil
	e.mu.Unlock()

	e.clock.close()
	_ = e.norm.Shutdown(ctx) // it has no processor: only releases itself
	// The real processor flushes, then shuts the destination down.
	err := e.proc.Shutdown(ctx)
	if err != nil && e.dest != nil {
		// Timed out: shut the destination down now (with the expired
		// ctx) so that exports still retrying are cancelled rather than
		// left running until their own timeout. Shutting down twice is
		// harmless for the SDK's exporters.
		if err2 := e.dest.Shutdown(ctx); err2 != nil && !errors.Is(err2, err) {
			err = errors.Join(err, err2)
		}
	}
	return err
}

// Stats returns the Exporter's counters. It does not wait for Export.
func (e *Exporter) Stats() Stats {
	return Stats{
		Exported:     e.c.exported.Load(),
		Dropped:      e.c.dropped.Load(),
		ExportErrors: e.c.errors.Load(),
		Queued:       e.c.pending.Load(),
		Resources:    int(e.nres.Load()),
	}
}
