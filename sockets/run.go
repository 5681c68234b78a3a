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

// Run reads the ring buffer into the tracker until ctx ends, expiring idle
// connections on the way. When ctx ends it drains what the kernel already
// wrote, flushes every connection and returns nil.
func Run(ctx context.Context, events *ebpf.Map, t *Tracker) error {
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return fmt.Errorf("opening the ring buffer: %w", err)
	}
	defer rd.Close()

	const tick = 500 * time.Millisecond
	var rec ringbuf.Record
	lastExpire := time.Now()
	stopping := false
	for {
		if !stopping && ctx.Err() != nil {
			// Take what is already in the ring, then stop.
			stopping = true
			rd.SetDeadline(time.Now())
		} else if !stopping {
			rd.SetDeadline(time.Now().Add(tick))
		}
		err := rd.ReadInto(&rec)
		switch {
		case err == nil:
			t.Handle(rec.RawSample)
		case errors.Is(err, os.ErrDeadlineExceeded):
			if stopping {
				t.Flush(MonotonicNow())
				return nil
			}
		case errors.Is(err, ringbuf.ErrClosed):
			t.Flush(MonotonicNow())
			return nil
		default:
			return fmt.Errorf("reading the ring buffer: %w", err)
		}
		if time.Since(lastExpire) >= tick {
			t.Expire(MonotonicNow())
			lastExpire = time.Now()
		}
	}
}
