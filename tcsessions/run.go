package tcsessions

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/protocols"
)

// PollInterval is how often Run looks into the ring buffer: the kernel
// writes events without waking the reader (unless the ring fills up), so
// this bounds the delay between a record and its delivery.
const PollInterval = 50 * time.Millisecond

// Run reads the tracer's ring buffer until ctx ends and hands each
// exchange to sink (on Run's goroutine). When ctx ends it delivers what the
// kernel already wrote, then returns nil. analyzers may be nil (L3/L4
// facts only).
func (t *Tracer) Run(ctx context.Context, analyzers *protocols.Registry, sink func(*Exchange)) error {
	a := NewAssembler(AssemblerConfig{Analyzers: analyzers, Interface: t.interfaceName})
	return t.RunAssembler(ctx, a, sink)
}

// RunAssembler is Run with an Assembler of the caller's (to read its
// Stats).
func (t *Tracer) RunAssembler(ctx context.Context, a *Assembler, sink func(*Exchange)) error {
	rd, err := ringbuf.NewReader(t.objs.TcEvents)
	if err != nil {
		return fmt.Errorf("opening the ring buffer: %w", err)
	}
	defer rd.Close()
	var rec ringbuf.Record
	stopping := false
	lastFlush := time.Now()
	rd.SetDeadline(time.Now().Add(PollInterval))
	for {
		if idle := t.cfg.IdleFlush; idle > 0 && time.Since(lastFlush) >= min(idle/2, time.Second) {
			lastFlush = time.Now()
			if sess, err := t.Sessions(); err != nil {
				t.log.Warn("reading the sessions table", "error", err.Error())
			} else {
				for _, x := range a.FlushIdle(sess, monotonicNow(), uint64(idle)) {
					sink(x)
				}
			}
		}
		err := rd.ReadInto(&rec)
		switch {
		case err == nil:
			x, herr := a.Handle(rec.RawSample)
			if herr != nil {
				t.log.Debug("bad event", "error", herr.Error())
			}
			if x != nil {
				sink(x)
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			if stopping {
				return nil
			}
			if ctx.Err() != nil {
				stopping = true
				rd.SetDeadline(time.Now())
			} else {
				rd.SetDeadline(time.Now().Add(PollInterval))
			}
		case errors.Is(err, ringbuf.ErrClosed):
			return nil
		default:
			return fmt.Errorf("reading the ring buffer: %w", err)
		}
	}
}

// monotonicNow is CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
