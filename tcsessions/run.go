package tcsessions

import (
	"context"
	"time"

	"github.com/clovisor/clovisor/internal/ring"
	"github.com/clovisor/clovisor/protocols"
)

// PollInterval is how often Run looks into the ring buffer: the kernel
// writes events without waking the reader (unless the ring fills up), so
// this bounds the delay between a record and its delivery.
const PollInterval = ring.PollInterval

// Run reads the tracer's ring buffer until ctx ends and hands each
// exchange to sink (on Run's goroutine). When ctx ends it delivers what the
// kernel already wrote, then returns nil. analyzers may be nil (L3/L4
// facts only).
func (t *Tracer) Run(ctx context.Context, analyzers *protocols.Registry, sink func(*Exchange)) error {
	a := NewAssembler(AssemblerConfig{Analyzers: analyzers, Interface: t.interfaceName, Workload: t.workloadAt})
	return t.RunAssembler(ctx, a, sink)
}

// RunAssembler is Run with an Assembler of the caller's (to read its
// Stats).
func (t *Tracer) RunAssembler(ctx context.Context, a *Assembler, sink func(*Exchange)) error {
	lastFlush := time.Now()
	var out []*Exchange
	var handled, lastHandled uint64
	return ring.Read(ctx, t.objs.TcEvents, func(raw []byte) {
		handled++
		var err error
		out, err = a.Handle(raw, out[:0])
		if err != nil {
			t.log.Debug("bad event", "error", err.Error())
		}
		for i, x := range out {
			sink(x)
			out[i] = nil
		}
	}, func() {
		// Runs between every two records, and at every poll: while
		// records come, read the clock only every 64th time.
		if handled != lastHandled && handled%64 != 0 {
			lastHandled = handled
			return
		}
		lastHandled = handled
		idle := t.cfg.IdleFlush
		if idle <= 0 || time.Since(lastFlush) < min(idle/2, time.Second) {
			return
		}
		lastFlush = time.Now()
		sess, err := t.Sessions()
		if err != nil {
			t.log.Warn("reading the sessions table", "error", err.Error())
			return
		}
		for _, x := range a.FlushIdle(sess, monotonicNow(), uint64(idle)) {
			sink(x)
		}
	})
}

// monotonicNow is CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
func monotonicNow() uint64 { return ring.MonotonicNow() }
