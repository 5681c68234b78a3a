package sockets

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

// MonotonicNow is the kernel's CLOCK_MONOTONIC in ns, the clock of
// bpf_ktime_get_ns.
func MonotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// PollInterval is how often the reader looks into the ring buffer: the
// kernel writes events without waking it (unless the ring fills up), so
// this bounds the delay between a call and its event.
const PollInterval = 50 * time.Millisecond

// Run reads the ring buffer into the tracker until ctx ends, expiring idle
// connections on the way. When ctx ends it drains what the kernel already
// wrote, flushes every connection and returns nil.
func Run(ctx context.Context, events *ebpf.Map, t *Tracker) error {
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return fmt.Errorf("opening the ring buffer: %w", err)
	}
	defer rd.Close()

	const expireEvery = 500 * time.Millisecond
	var rec ringbuf.Record
	lastExpire := time.Now()
	stopping := false
	rd.SetDeadline(time.Now().Add(PollInterval))
	for {
		err := rd.ReadInto(&rec)
		switch {
		case err == nil:
			t.Handle(rec.RawSample)
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The ring is empty up to the poll's start.
			if stopping {
				t.Flush(MonotonicNow())
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
			t.Flush(MonotonicNow())
			return nil
		default:
			return fmt.Errorf("reading the ring buffer: %w", err)
		}
		if time.Since(lastExpire) >= expireEvery {
			t.Expire(MonotonicNow())
			lastExpire = time.Now()
		}
	}
}
