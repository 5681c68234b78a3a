package spans

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// monoClock converts kernel CLOCK_MONOTONIC timestamps (what bpf_ktime_get_ns
// returns) to wall-clock time with an offset that a goroutine re-measures
// periodically, so that wall-clock steps and NTP slewing are followed.
type monoClock struct {
	offset atomic.Int64 // wall ns - monotonic ns
	stop   chan struct{}
	done   sync.WaitGroup
	once   sync.Once
}

// newMonoClock measures the offset and, unless frozen is non-nil (tests),
// refreshes it every interval.
func newMonoClock(interval time.Duration, frozen *int64) *monoClock {
	c := &monoClock{stop: make(chan struct{})}
	if frozen != nil {
		c.offset.Store(*frozen)
		return c
	}
	c.offset.Store(measureOffset())
	c.done.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-t.C:
				c.offset.Store(measureOffset())
			}
		}
	})
	return c
}

// wall returns the wall-clock time of monotonic timestamp ns.
func (c *monoClock) wall(ns uint64) time.Time {
	return time.Unix(0, int64(ns)+c.offset.Load())
}

func (c *monoClock) close() {
	c.once.Do(func() { close(c.stop) })
	c.done.Wait()
}

// monoNow reads CLOCK_MONOTONIC in ns.
func monoNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

// measureOffset returns wall - monotonic in ns, taking the tightest of a few
// readings of the wall clock bracketed by two monotonic ones.
func measureOffset() int64 {
	var best, bestSpan int64 = 0, -1
	for range 5 {
		m1 := monoNow()
		w := time.Now().UnixNano()
		m2 := monoNow()
		if span := m2 - m1; bestSpan < 0 || span < bestSpan {
			bestSpan = span
			best = w - (m1 + span/2)
		}
	}
	return best
}
