package sockets

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
)

// TestKernelEvents checks the raw events for one curl request to nginx:
// each side's open event names the task that connected or accepted, with
// the right tuple and role; each close event carries the TCP counters,
// which equal the sum of the data events' true byte counts.
func TestKernelEvents(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	testbed.RequireTool(t, "curl")
	p.WriteFile(t, "f.txt", []byte(strings.Repeat("z", 5000)))
	mode := AttachModeUnderTest(t)
	tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Mode != mode {
		t.Fatalf("tracer attached in mode %s, asked for %s", tr.Mode, mode)
	}
	for _, id := range []uint64{p.ClientCG.ID(), p.ServerCG.ID()} {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	cmd, start := p.ClientCommand(context.Background(), "curl", "-sS", "-o", "/dev/null", p.URL("/f.txt"))
	if err := start(); err != nil {
		t.Fatal(err)
	}
	curlPID := uint32(cmd.Process.Pid)
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}

	rd, err := ringbuf.NewReader(tr.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	type side struct {
		open, close   *probes.ConnEvent
		sent, recvd   uint64
		dataProcesses map[uint32]bool
		// the data events' stream positions, in ring order
		sends, recvs []probes.DataEvent
	}
	sides := map[uint64]*side{}
	get := func(cookie uint64) *side {
		if sides[cookie] == nil {
			sides[cookie] = &side{dataProcesses: map[uint32]bool{}}
		}
		return sides[cookie]
	}
	closes := 0
	deadline := time.Now().Add(5 * time.Second)
	for closes < 2 && time.Now().Before(deadline) {
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		rec, err := rd.Read()
		if err != nil {
			continue
		}
		switch rec.RawSample[0] {
		case probes.EventConnOpen, probes.EventConnClose:
			ev := new(probes.ConnEvent)
			if err := decodeConn(rec.RawSample, ev); err != nil {
				t.Fatal(err)
			}
			if ev.Kind == probes.EventConnOpen {
				get(ev.Cookie).open = ev
			} else {
				get(ev.Cookie).close = ev
				closes++
			}
		case probes.EventData:
			var ev probes.DataEvent
			if _, err := decodeData(rec.RawSample, &ev); err != nil {
				t.Fatal(err)
			}
			s := get(ev.Cookie)
			s.dataProcesses[ev.Tgid] = true
			if ev.Dir == probes.DirSend {
				s.sent += uint64(ev.Len)
				s.sends = append(s.sends, ev)
			} else {
				s.recvd += uint64(ev.Len)
				s.recvs = append(s.recvs, ev)
			}
		}
	}
	if len(sides) != 2 {
		t.Fatalf("events for %d sockets, want 2", len(sides))
	}
	roles := map[uint8]bool{}
	for cookie, s := range sides {
		if s.open == nil || s.close == nil {
			t.Fatalf("socket %d: open %v close %v", cookie, s.open != nil, s.close != nil)
		}
		o, c := s.open, s.close
		roles[o.Role] = true
		local, remote := endpoints(o.Tuple.Family, &o.Tuple.Saddr, &o.Tuple.Daddr, o.Tuple.Sport, o.Tuple.Dport)
		comm := cstring(o.Comm[:])
		switch o.Role {
		case probes.RoleClient:
			if o.Tgid != curlPID || comm != "curl" || o.CgroupId != p.ClientCG.ID() {
				t.Errorf("client open: tgid %d comm %q cgroup %d, want curl %d in %d", o.Tgid, comm, o.CgroupId, curlPID, p.ClientCG.ID())
			}
			if local.Addr() != p.ClientIP || remote.Addr() != p.ServerIP || remote.Port() != p.Port {
				t.Errorf("client tuple %s -> %s", local, remote)
			}
		case probes.RoleServer:
			procComm, _ := os.ReadFile("/proc/" + strconv.Itoa(int(o.Tgid)) + "/comm")
			if comm != "nginx" || strings.TrimSpace(string(procComm)) != "nginx" || o.CgroupId != p.ServerCG.ID() {
				t.Errorf("server open: tgid %d comm %q (/proc says %q) cgroup %d", o.Tgid, comm, procComm, o.CgroupId)
			}
			if !s.dataProcesses[o.Tgid] || len(s.dataProcesses) != 1 {
				t.Errorf("accepting task %d, data from %v", o.Tgid, s.dataProcesses)
			}
			if local.Addr() != p.ServerIP || local.Port() != p.Port || remote.Addr() != p.ClientIP {
				t.Errorf("server tuple %s -> %s", local, remote)
			}
		default:
			t.Errorf("open with role %d", o.Role)
		}
		if o.Ts == 0 || c.Ts < o.Ts {
			t.Errorf("open at %d, close at %d", o.Ts, c.Ts)
		}
		checkSendPositions(t, mode, o, s.sends, s.recvs)
		// bytes_received counts the peer's FIN too (it takes a sequence
		// number) once it has arrived; both ends here close with FINs,
		// curl first (it closes on exit; nginx keeps the connection
		// alive), nginx when it reads curl's FIN. Whether the peer's FIN
		// is in depends on when the mode takes the close event:
		//   - tracepoint: at the socket's move to TCP_CLOSE, after the FIN
		//     exchange (curl's socket from FIN_WAIT2 on nginx's FIN, nginx's
		//     from LAST_ACK): both ends have the peer's FIN, +1 each.
		//   - kprobe, fentry: at tcp_close's entry, when the process closes
		//     the socket. curl's close comes before its own FIN is even
		//     sent, so nginx's FIN cannot have arrived: +0 for the client.
		//     nginx closes only after reading curl's FIN: +1 for the server.
		finIn := uint64(1)
		if mode != probes.ModeTracepoint && o.Role == probes.RoleClient {
			finIn = 0
		}
		if c.BytesSent != s.sent || c.BytesReceived != s.recvd+finIn || s.sent == 0 || s.recvd == 0 {
			t.Errorf("%s mode, role %d: TCP counted %d sent / %d received, data events %d / %d (+%d for the peer's FIN)",
				mode, o.Role, c.BytesSent, c.BytesReceived, s.sent, s.recvd, finIn)
		}
	}
	if len(roles) != 2 {
		t.Errorf("roles %v", roles)
	}
}

// checkSendPositions checks the send stream positions the kernel reports
// on one socket that made one exchange (curl's request, nginx's response):
// the open event's first send position, each send's, and on each receive
// the send stream's end when it was read (the client reads only after its
// whole request went out; the server sends nothing before it read the
// request).
func checkSendPositions(t *testing.T, mode string, o *probes.ConnEvent, sends, recvs []probes.DataEvent) {
	t.Helper()
	if o.Flags&probes.FlagSendSeq == 0 {
		t.Errorf("%s mode, role %d: open event without its send position", mode, o.Role)
		return
	}
	pos := o.SendSeq
	for i, ev := range sends {
		if ev.Seq != pos {
			t.Errorf("%s mode, role %d: send %d at %d, want %d (open at %d)", mode, o.Role, i, ev.Seq, pos, o.SendSeq)
		}
		pos = ev.Seq + ev.Len
	}
	wantSent := pos // client: all of its request
	if o.Role == probes.RoleServer {
		wantSent = o.SendSeq
	}
	for i, ev := range recvs {
		if ev.Flags&probes.FlagSentSeq == 0 || ev.SentSeq != wantSent {
			t.Errorf("%s mode, role %d: receive %d (flags %#x) read with the send stream at %d, want %d (open at %d)",
				mode, o.Role, i, ev.Flags, ev.SentSeq, wantSent, o.SendSeq)
		}
	}
}
