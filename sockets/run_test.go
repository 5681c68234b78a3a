package sockets

import (
	"context"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
)

// recordSize is the fixed size of the records ringWriter writes: the
// tracker reads its fields from the front and ignores the padding.
const recordSize = 256

// ringWriter makes a BPF ring buffer and an XDP program that copies the
// first recordSize bytes of its packet into it, so that a test can put
// records of its own into a real ring buffer (prog.Run, no interface).
func ringWriter(t *testing.T) (*ebpf.Map, func(rec []byte)) {
	testbed.RequireRoot(t)
	rb, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 1 << 16})
	if err != nil {
		t.Fatalf("ring buffer: %v", err)
	}
	t.Cleanup(func() { rb.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.XDP,
		License: "Dual BSD/GPL",
		// bpf_xdp_load_bytes(ctx, 0, fp-recordSize, recordSize), then
		// bpf_ringbuf_output(rb, fp-recordSize, recordSize, 0).
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.RFP),
			asm.Add.Imm(asm.R6, -recordSize),
			asm.Mov.Imm(asm.R2, 0),
			asm.Mov.Reg(asm.R3, asm.R6),
			asm.Mov.Imm(asm.R4, recordSize),
			asm.FnXdpLoadBytes.Call(),
			asm.JNE.Imm(asm.R0, 0, "out"),
			asm.LoadMapPtr(asm.R1, rb.FD()),
			asm.Mov.Reg(asm.R2, asm.R6),
			asm.Mov.Imm(asm.R3, recordSize),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnRingbufOutput.Call(),
			asm.Mov.Imm(asm.R0, 2).WithSymbol("out"), // XDP_PASS
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("ring writer program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return rb, func(rec []byte) {
		t.Helper()
		if len(rec) > recordSize {
			t.Fatalf("record of %d bytes, at most %d", len(rec), recordSize)
		}
		pkt := make([]byte, recordSize)
		copy(pkt, rec)
		if _, err := prog.Run(&ebpf.RunOptions{Data: pkt}); err != nil {
			t.Fatalf("writing a record: %v", err)
		}
	}
}

// Run, with the ring buffer empty, gives a held receive to the analyzer
// once HoldTimeout has passed by the clock; before that, it keeps it.
func TestRunReleasesHeldReceiveWhenIdle(t *testing.T) {
	rb, write := ringWriter(t)
	got := make(chan *spans.Session, 4)
	tk := NewTracker(Config{Analyzers: defaultRegistry(), Sink: func(s *spans.Session) { got <- s }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, rb, tk) }()

	// A request, then its response read after 40 more bytes were sent
	// whose event never comes. Stamped with the clock, as the kernel does.
	now := MonotonicNow()
	n := uint32(len(req))
	write(openRecord(probes.RoleClient, 1, now, 0, cliAddr, srvAddr))
	write(dataRecord(probes.DirSend, 1, now, 0, len(req), []byte(req), cliAddr, srvAddr))
	write(recvRecord(1, now, 0, resp, n+40, cliAddr, srvAddr))
	start := time.Now()
	select {
	case s := <-got:
		t.Fatalf("session after %v, before the receive's timeout: %s", time.Since(start), describeAll([]*spans.Session{s}))
	case <-time.After(HoldTimeout / 2):
	}
	var s *spans.Session
	select {
	case s = <-got:
	case <-time.After(HoldTimeout + 10*PollInterval):
		t.Fatalf("no session %v after the receive", time.Since(start))
	}
	// Released by the clock at the first empty poll after the timeout.
	if waited := time.Duration(MonotonicNow() - now); waited < HoldTimeout || waited > HoldTimeout+4*PollInterval {
		t.Errorf("released after %v, want %v plus at most a few polls of %v", waited, HoldTimeout, PollInterval)
	}
	if s.Tx.StatusCode != 200 || s.Tx.ReqBytes != int64(n) || s.Tx.RespBytes != int64(len(resp)) || s.Index != 0 {
		t.Errorf("%s", describeAll([]*spans.Session{s}))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := tk.Stats(); st.Events != 3 || st.HeldReceives != 1 || st.HeldTimedOut != 1 || st.Sessions != 1 || st.BadEvents != 0 {
		t.Errorf("stats %+v", st)
	}
}
