package sockets

import (
	"context"
	"time"

	"github.com/cilium/ebpf"

	"github.com/clovisor/clovisor/internal/ring"
)

// MonotonicNow is the kernel's CLOCK_MONOTONIC in ns, the clock of
// bpf_ktime_get_ns.
func MonotonicNow() uint64 { return ring.MonotonicNow() }

// PollInterval is how often the reader looks into the ring buffer: the
// kernel writes events without waking it (unless the ring fills up), so
// this bounds the delay between a call and its event.
const PollInterval = ring.PollInterval

// Run reads the ring buffer into the tracker until ctx ends, expiring idle
// connections on the way. When ctx ends it drains what the kernel already
// wrote, flushes every connection and returns nil.
func Run(ctx context.Context, events *ebpf.Map, t *Tracker) error {
	const expireEvery = 500 * time.Millisecond
	lastExpire := time.Now()
	seen := t.stats.Events
	err := ring.Read(ctx, events, t.Handle, func() {
		// The tick runs before each read: no record since the last one
		// means that read found the ring buffer empty.
		if t.stats.Events == seen && t.heldCount > 0 {
			t.Release(MonotonicNow())
		}
		seen = t.stats.Events
		if time.Since(lastExpire) >= expireEvery {
			t.Expire(MonotonicNow())
			lastExpire = time.Now()
		}
	})
	if err != nil {
		return err
	}
	t.Flush(MonotonicNow())
	return nil
}
