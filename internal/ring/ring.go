// Package ring reads the BPF ring buffers of Clovisor's tracers, whose
// programs write events without waking the reader (a wakeup per event costs
// far more than the event): the reader polls, and the kernel wakes it only
// when the ring fills up.
package ring

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// PollInterval is how often the reader looks into the ring: it bounds the
// delay between an event and its delivery.
const PollInterval = 50 * time.Millisecond

// Read hands every record of the ring buffer events to handle (the slice
// is reused: copy what is kept) until ctx ends; then it delivers what the
// kernel had already written and returns nil. tick, if not nil, runs
// between records and at every poll, for periodic work on the reader's
// goroutine.
func Read(ctx context.Context, events *ebpf.Map, handle func(raw []byte), tick func()) error {
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return fmt.Errorf("opening the ring buffer: %w", err)
	}
	defer rd.Close()

	var rec ringbuf.Record
	stopping := false
	rd.SetDeadline(time.Now().Add(PollInterval))
	for {
		if tick != nil {
			tick()
		}
		err := rd.ReadInto(&rec)
		switch {
		case err == nil:
			handle(rec.RawSample)
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The ring is empty up to the poll's start.
			if stopping {
				return nil
			}
			if ctx.Err() != nil {
				// Take what the kernel wrote until now, then stop.
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

// MonotonicNow is the kernel's CLOCK_MONOTONIC in ns, the clock of
// bpf_ktime_get_ns.
func MonotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
