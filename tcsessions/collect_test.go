package tcsessions

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
)

// collector runs a tracer in a node's namespace and gathers its exchanges.
type collector struct {
	tr   *Tracer
	log  *logBuffer
	asm  *Assembler
	mu   sync.Mutex
	xs   []*Exchange
	stop context.CancelFunc
	done chan error
}

func startCollector(t *testing.T, node *testbed.Node, cfg Config) *collector {
	t.Helper()
	log, lb := testLogger(t)
	cfg.Netns = node.NS.Path()
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	cfg.Logger = log
	tr, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := &collector{tr: tr, log: lb, done: make(chan error, 1)}
	c.asm = NewAssembler(AssemblerConfig{Analyzers: protocols.NewRegistry(http1.New()), Interface: tr.interfaceName, Workload: tr.workloadAt})
	ctx, cancel := context.WithCancel(context.Background())
	c.stop = cancel
	go func() {
		c.done <- tr.RunAssembler(ctx, c.asm, func(x *Exchange) {
			c.mu.Lock()
			c.xs = append(c.xs, x)
			c.mu.Unlock()
		})
	}()
	t.Cleanup(func() {
		c.close(t)
		if t.Failed() {
			t.Logf("tracer log:\n%s", lb.String())
		}
	})
	return c
}

func (c *collector) close(t *testing.T) {
	if c.stop == nil {
		return
	}
	c.stop()
	if err := <-c.done; err != nil {
		t.Errorf("Run: %v", err)
	}
	c.stop = nil
	if err := c.tr.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// wait returns the exchanges that match keep once there are n of them (or
// fails after timeout).
func (c *collector) wait(t *testing.T, n int, timeout time.Duration, keep func(*Exchange) bool) []*Exchange {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		var got []*Exchange
		for _, x := range c.xs {
			if keep == nil || keep(x) {
				got = append(got, x)
			}
		}
		c.mu.Unlock()
		if len(got) >= n || time.Now().After(deadline) {
			if len(got) != n {
				t.Fatalf("%d exchanges, want %d:\n%s", len(got), n, describe(got))
			}
			sortExchanges(got)
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// matching returns the exchanges gathered so far that keep accepts, in
// the order wait gives them.
func (c *collector) matching(keep func(*Exchange) bool) []*Exchange {
	c.mu.Lock()
	var got []*Exchange
	for _, x := range c.xs {
		if keep(x) {
			got = append(got, x)
		}
	}
	c.mu.Unlock()
	sortExchanges(got)
	return got
}

func sortExchanges(got []*Exchange) {
	sort.SliceStable(got, func(i, j int) bool {
		if got[i].Interface != got[j].Interface {
			return got[i].Interface < got[j].Interface
		}
		if got[i].ConnStart != got[j].ConnStart {
			return got[i].ConnStart < got[j].ConnStart
		}
		return got[i].Index < got[j].Index
	})
}

func describe(xs []*Exchange) string {
	var sb strings.Builder
	for _, x := range xs {
		fmt.Fprintf(&sb, "  %s\n", x)
	}
	return sb.String()
}

// String is a one-line form of an exchange for test output.
func (x *Exchange) String() string {
	l7 := "-"
	if x.Tx != nil {
		l7 = x.Tx.Summary
	}
	return fmt.Sprintf("%s(%s) %v -> %v #%d %s phase=%d req=%+v resp=%+v l7=%q prefixes=%d/%d",
		x.Interface, x.Role, x.Client, x.Server, x.Index, x.End, x.Phase, x.Request, x.Response, l7,
		len(x.RequestPrefix), len(x.ResponsePrefix))
}

func onIface(name string) func(*Exchange) bool {
	return func(x *Exchange) bool { return x.Interface == name }
}

func toServer(addr netip.AddrPort) func(*Exchange) bool {
	return func(x *Exchange) bool { return x.Server == addr }
}

func and(fs ...func(*Exchange) bool) func(*Exchange) bool {
	return func(x *Exchange) bool {
		for _, f := range fs {
			if !f(x) {
				return false
			}
		}
		return true
	}
}
