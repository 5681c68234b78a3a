package probes

import (
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

type closeCounter struct{ n *atomic.Int32 }

func (c closeCounter) Close() error { c.n.Add(1); return nil }

// TestKTLSWatcher: without the tls module at start, the kTLS hooks attach
// when it appears, close when it goes, attach again when it comes back; a
// failed attach is not retried until the module comes again; Close stops
// the watcher and closes the hooks. (The real module, in the VM kernels:
// sockets.TestKTLSModuleLoadedLater.)
func TestKTLSWatcher(t *testing.T) {
	var live atomic.Bool
	defer func(b func(*Tracer) bool, l func() bool, iv time.Duration) {
		tlsIsBuiltIn, tlsIsLive, ktlsWatchInterval = b, l, iv
	}(tlsIsBuiltIn, tlsIsLive, ktlsWatchInterval)
	tlsIsBuiltIn = func(*Tracer) bool { return false }
	tlsIsLive = live.Load
	ktlsWatchInterval = 5 * time.Millisecond

	var attaches, closes atomic.Int32
	var fail atomic.Bool
	attach := func() (ktlsHooks, error) {
		attaches.Add(1)
		k := ktlsHooks{closers: []io.Closer{closeCounter{&closes}, closeCounter{&closes}},
			progs: map[string]*ebpf.Program{"kp_tls_sendmsg": nil}, hooks: []string{"kprobe/tls_sw_sendmsg"}}
		if fail.Load() {
			return k, errors.New("no such symbol")
		}
		return k, nil
	}
	var log strings.Builder
	tr := &Tracer{Mode: ModeKprobe, programs: map[string]*ebpf.Program{"kp_tcp_sendmsg": nil}}
	tr.startKTLS(&Options{Logger: testLogger(&log)}, attach)

	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); !ok(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: state %+v, %d attaches, %d closes", what, tr.KTLS(), attaches.Load(), closes.Load())
			}
		}
	}
	if st := tr.KTLS(); st.Traced || !strings.Contains(st.Reason, "not loaded") || attaches.Load() != 0 {
		t.Fatalf("without the module: %+v, %d attaches", st, attaches.Load())
	}
	live.Store(true)
	waitFor("module loaded", func() bool { return tr.KTLS().Traced })
	if n := len(tr.Programs()); n != 2 || attaches.Load() != 1 {
		t.Errorf("%d programs, %d attaches; want 2, 1", n, attaches.Load())
	}
	live.Store(false)
	waitFor("module removed", func() bool { return !tr.KTLS().Traced && closes.Load() == 2 })
	if n := len(tr.Programs()); n != 1 {
		t.Errorf("%d programs after the module went, want 1", n)
	}
	fail.Store(true)
	live.Store(true)
	waitFor("failed attach", func() bool { return attaches.Load() == 2 && closes.Load() == 4 })
	time.Sleep(50 * time.Millisecond) // ten ticks: no retry
	if st := tr.KTLS(); st.Traced || !strings.Contains(st.Reason, "no such symbol") || attaches.Load() != 2 {
		t.Errorf("after a failed attach: %+v, %d attaches", st, attaches.Load())
	}
	live.Store(false)
	time.Sleep(20 * time.Millisecond)
	fail.Store(false)
	live.Store(true)
	waitFor("module back", func() bool { return tr.KTLS().Traced })
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if closes.Load() != 6 || len(tr.Programs()) != 1 {
		t.Errorf("after Close: %d closes, %d programs; want 6, 1", closes.Load(), len(tr.Programs()))
	}
	n := attaches.Load()
	live.Store(false)
	live.Store(true)
	time.Sleep(30 * time.Millisecond)
	if attaches.Load() != n {
		t.Errorf("the watcher still runs after Close")
	}
	for _, want := range []string{"tls module is not loaded", "kernel TLS hooked", "was removed", "not traced in this mode"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log.String())
		}
	}
}
