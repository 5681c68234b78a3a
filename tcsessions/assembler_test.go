package tcsessions

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
	"unsafe"

	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/spans"
)

// These tests feed the Assembler events encoded as the kernel writes them,
// without a kernel.

func encodeExchange(t *testing.T, e ExchangeEvent) []byte {
	t.Helper()
	e.Kind = eventExchange
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, &e); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// encodePayload writes a payload event as the kernel does: the header and
// only the captured bytes.
func encodePayload(t *testing.T, e PayloadEvent, data string) []byte {
	t.Helper()
	e.Kind = eventPayload
	e.Cap = uint16(len(data))
	copy(e.Data[:], data)
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, &e); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()[:payloadHeaderSize+len(data)]
}

func testTuple(client, server string, ifindex uint32) tcConnTuple {
	c, s := netip.MustParseAddrPort(client), netip.MustParseAddrPort(server)
	return tcConnTuple{ClientAddr: addr16(c.Addr()), ServerAddr: addr16(s.Addr()),
		ClientPort: c.Port(), ServerPort: s.Port(), Ifindex: ifindex}
}

func newTestAssembler(max int) *Assembler {
	return NewAssembler(AssemblerConfig{
		Analyzers: protocols.NewRegistry(http1.New()),
		Interface: func(i int) (string, Role, bool) {
			if i == 7 {
				return "eth0", RoleNode, true
			}
			return "", 0, false
		},
		MaxConns: max,
	})
}

// handle1 gives one event to the Assembler and returns the one exchange it
// must make (nil for none).
func handle1(t *testing.T, a *Assembler, raw []byte) *Exchange {
	t.Helper()
	xs, err := a.Handle(raw, nil)
	if err != nil {
		t.Fatal(err)
	}
	switch len(xs) {
	case 0:
		return nil
	case 1:
		return xs[0]
	}
	t.Fatalf("%d exchanges, want at most one: %s", len(xs), describe(xs))
	return nil
}

// TestAssemblerHTTP: prefixes shorter than the messages are parsed with the
// true byte counts (the body is stepped over), the wire's timestamps win,
// and the session is a node_nic one with the HTTP attributes.
func TestAssemblerHTTP(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 7)
	req := "GET /big HTTP/1.1\r\nHost: svc\r\n\r\n"
	resp := "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
	for _, raw := range [][]byte{
		encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: 5, Ts: 10, Len: uint32(len(req)), Index: 3, Seq: 1000}, req),
		encodePayload(t, PayloadEvent{Dir: dirResponse, Tuple: tu, FirstTs: 5, Ts: 20, Len: 1448, Index: 3, Seq: 5000}, resp+"xxxx"),
	} {
		if x := handle1(t, a, raw); x != nil {
			t.Fatalf("payload: %v", x)
		}
	}
	respLen := uint64(len(resp) + 100000)
	ev := ExchangeEvent{
		End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: tu, Index: 3,
		ConnFlags: ConnFromSYN | ConnSeq0 | ConnClientIngress, ReqSeq0: 1000, FirstTs: 5, SynTs: 5, SynackTs: 7,
		ReqFirstTs: 10, ReqLastTs: 11, RespFirstTs: 20, RespLastTs: 90, EndTs: 100,
		Flags: [2]uint32{0x18, 0x18},
	}
	ev.Dir[0] = tcDirCounters{Bytes: 300, Packets: 2, PayloadBytes: uint64(len(req)), NewBytes: uint64(len(req))}
	ev.Dir[1] = tcDirCounters{Bytes: 110000, Packets: 70, PayloadBytes: respLen + 1448, NewBytes: respLen, RetransPackets: 1}
	x := handle1(t, a, encodeExchange(t, ev))
	if x == nil {
		t.Fatal("no exchange")
	}
	if x.Interface != "eth0" || x.Role != RoleNode || x.Index != 3 || x.Protocol != "http" ||
		x.Client != netip.MustParseAddrPort("10.0.0.1:40000") || x.HandshakeRTT() != 2 {
		t.Errorf("exchange %s", x)
	}
	if x.Response.RetransBytes() != 1448 || x.Response.NewBytes != respLen {
		t.Errorf("response %+v", x.Response)
	}
	tx := x.Tx
	if tx == nil || tx.Truncated || tx.StatusCode != 200 || tx.RespBytes != int64(respLen) || tx.ReqBytes != int64(len(req)) {
		t.Fatalf("transaction %+v", tx)
	}
	if tx.ReqStart != 10 || tx.ReqEnd != 11 || tx.RespStart != 20 || tx.RespEnd != 90 {
		t.Errorf("times %d %d %d %d", tx.ReqStart, tx.ReqEnd, tx.RespStart, tx.RespEnd)
	}
	s := x.Session()
	// On a node NIC the client's packets come in: the node serves.
	if s.Point != spans.PointNodeNIC || s.Kind != spans.Server || s.Index != 3 || s.ConnTag != 1<<32|1000 || s.Tx != tx || s.Wire.Interface != "eth0" ||
		s.Wire.Response.RetransBytes != 1448 || s.Wire.HandshakeRTT != 2 || s.Wire.End != "next_request" || s.Wire.SeenFrom != "syn" {
		t.Errorf("session %+v wire %+v", s, s.Wire)
	}
	if st := a.Stats(); st != (AssemblerStats{Exchanges: 1, Payloads: 2, Parsed: 1}) || a.Conns() != 1 {
		t.Errorf("stats %+v conns %d", st, a.Conns())
	}
}

// TestAssemblerTLSAndReset: bytes no analyzer knows give an L3/L4-only
// transaction named after the table's protocol; a RST before the response
// is an error; an HTTP request cut by a RST is the parser's no_response.
func TestAssemblerTLSAndReset(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("[fd00::1]:40000", "[fd00::2]:443", 3)
	hello := "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
	handle1(t, a, encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: 1, Len: 517}, hello))
	ev := ExchangeEvent{End: uint8(EndRST), Phase: uint8(PhaseRequest), Proto: 3, Tuple: tu, FirstTs: 1,
		ReqFirstTs: 2, ReqLastTs: 2, EndTs: 9}
	ev.Dir[0] = tcDirCounters{Bytes: 600, Packets: 1, PayloadBytes: 517, NewBytes: 517}
	x := handle1(t, a, encodeExchange(t, ev))
	if x.Tx != nil || x.Interface != "3" || string(x.RequestPrefix) != hello {
		t.Fatalf("TLS parsed: %s", x)
	}
	s := x.Session()
	if s.Tx.Protocol != "https" || s.Tx.Name != "https" || !s.Tx.NoResponse || s.Tx.ErrorType != ErrorTCPReset ||
		s.Tx.ReqBytes != 517 || s.Tx.ReqStart != 2 || s.Point != spans.PointPodVeth || s.Wire.End != "rst" {
		t.Errorf("L4 transaction %+v", s.Tx)
	}

	tu2 := testTuple("10.0.0.1:40001", "10.0.0.2:80", 3)
	handle1(t, a, encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu2, FirstTs: 4, Len: 18}, "GET / HTTP/1.1\r\n\r\n"))
	ev = ExchangeEvent{End: uint8(EndRST), Phase: uint8(PhaseRequest), Proto: 1, Tuple: tu2, FirstTs: 4,
		ReqFirstTs: 5, ReqLastTs: 5, EndTs: 6}
	ev.Dir[0] = tcDirCounters{PayloadBytes: 18, NewBytes: 18}
	x = handle1(t, a, encodeExchange(t, ev))
	if x.Tx == nil || !x.Tx.NoResponse || x.Tx.ErrorType != http1.ErrorNoResponse {
		t.Errorf("reset HTTP request: %+v", x.Tx)
	}
	// No payload at all: the connection's life.
	ev = ExchangeEvent{End: uint8(EndFIN), Phase: uint8(PhaseIdle), Tuple: tu2, FirstTs: 40, EndTs: 50}
	x = handle1(t, a, encodeExchange(t, ev))
	if tx := x.Session().Tx; tx.ReqStart != 40 || tx.ReqEnd != 50 || tx.ErrorType != "" || tx.Protocol != "tcp" {
		t.Errorf("idle: %+v", tx)
	}
}

// TestAssemblerBounds: connections whose record never comes are forgotten
// least recently active first beyond MaxConns and counted; bad events are
// errors.
func TestAssemblerBounds(t *testing.T) {
	a := newTestAssembler(4)
	for i := 0; i < 10; i++ {
		tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 3)
		handle1(t, a, encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: uint64(i), Len: 3}, "GET"))
	}
	if a.Conns() != 4 || a.Stats().Evicted != 6 {
		t.Errorf("conns %d, stats %+v", a.Conns(), a.Stats())
	}
	for _, raw := range [][]byte{nil, {9, 0, 0}, {eventExchange, 1, 2}, {eventPayload, 0}} {
		if xs, err := a.Handle(raw, nil); err == nil || xs != nil {
			t.Errorf("%v: %v %v", raw, xs, err)
		}
	}
	// A payload event that claims more bytes than it has.
	raw := encodePayload(t, PayloadEvent{Dir: dirRequest, Len: 3}, "GET")
	raw[2] = 200
	if _, err := a.Handle(raw, nil); err == nil || !strings.Contains(err.Error(), "claims") {
		t.Errorf("short payload: %v", err)
	}
	if a.Stats().BadEvents != 5 {
		t.Errorf("stats %+v", a.Stats())
	}
}

// stream builds the payload events of one direction of a crafted
// connection, keeping its sequence number and counts.
type stream struct {
	t     *testing.T
	tu    tcConnTuple
	dir   uint8
	seq   uint32
	at    tcDirCounters // counts of the current wire exchange so far
	index uint32
	mark  uint16
}

// packet adds one packet of n new payload bytes (data its captured start)
// and returns its payload event when captured, else nil.
func (s *stream) packet(data string, n int, captured bool, peerNew uint64, ts uint64) []byte {
	var raw []byte
	if captured {
		raw = s.packetB(nil, data, n, peerNew, ts)
		return raw
	}
	s.advance(n)
	return raw
}

// packetB appends the payload event of a captured packet to dst (as the
// kernel writes it) and adds the packet.
func (s *stream) packetB(dst []byte, data string, n int, peerNew uint64, ts uint64) []byte {
	e := PayloadEvent{Kind: eventPayload, Dir: s.dir, Tuple: s.tu, FirstTs: 1, Ts: ts, Len: uint32(n), Seq: s.seq,
		Index: s.index, Mark: s.mark, At: s.at, PeerNewBytes: peerNew, Cap: uint16(len(data))}
	dst = append(dst, unsafe.Slice((*byte)(unsafe.Pointer(&e)), payloadHeaderSize)...)
	dst = append(dst, data...)
	s.mark++
	s.advance(n)
	return dst
}

func (s *stream) advance(n int) {
	s.seq += uint32(n)
	s.at.Bytes += 40 + uint64(n)
	s.at.Packets++
	s.at.PayloadBytes += uint64(n)
	s.at.NewBytes += uint64(n)
}

// ack adds a packet without payload.
func (s *stream) ack() {
	s.at.Bytes += 40
	s.at.Packets++
}

// next starts the counts of the next wire exchange.
func (s *stream) next() {
	s.at = tcDirCounters{}
	s.index++
	s.mark = 0
}

func (s *stream) counters() tcDirCounters { return s.at }

func pathOf(x *Exchange) string { return attrOf(x, "url.path").AsString() }

// TestAssemblerPipelined: three requests before any response, the first
// two in one packet; three responses, the last two in one packet, the
// first longer than its captured prefix. One wire exchange gives three
// transactions, numbered on from the wire exchange's index, each with the
// packets whose first byte its messages hold; together they hold the wire
// exchange's counts exactly.
func TestAssemblerPipelined(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 3)
	req := &stream{t: t, tu: tu, dir: dirRequest, seq: 1001}
	resp := &stream{t: t, tu: tu, dir: dirResponse, seq: 5001}
	req.ack()
	req.ack()  // SYN, ACK
	resp.ack() // SYN-ACK
	r1, r2, r3 := "GET /a HTTP/1.1\r\nHost: x\r\n\r\n", "GET /b HTTP/1.1\r\nHost: x\r\n\r\n", "GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
	s1 := "HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"
	s2 := "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
	s3 := "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
	var events [][]byte
	events = append(events, req.packet(r1+r2, len(r1+r2), true, 0, 10))
	req0 := req.counters()
	events = append(events, req.packet(r3, len(r3), true, 0, 11))
	reqNew := req.at.NewBytes
	events = append(events, resp.packet(s1+"0123456789", 1400, true, reqNew, 20))
	resp.packet("", len(s1)+2000-1400, false, reqNew, 21)
	resp0 := resp.counters()
	events = append(events, resp.packet(s2+s3, len(s2+s3), true, reqNew, 22))
	req.ack()
	for _, raw := range events {
		if x := handle1(t, a, raw); x != nil {
			t.Fatalf("payload made %s", x)
		}
	}
	ev := ExchangeEvent{End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: tu, FirstTs: 1,
		ConnFlags: ConnFromSYN | ConnSeq0 | ConnHTTP, ReqSeq0: 1001,
		ReqFirstTs: 10, ReqLastTs: 11, RespFirstTs: 20, RespLastTs: 22, EndTs: 30, Flags: [2]uint32{0x1a, 0x1a}}
	ev.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
	xs, err := a.Handle(encodeExchange(t, ev), nil)
	if err != nil || len(xs) != 3 {
		t.Fatalf("%d exchanges (%v), want 3:\n%s", len(xs), err, describe(xs))
	}
	want := []struct {
		path      string
		status    int
		end       End
		req, resp tcDirCounters
	}{
		{"/a", 200, EndPipelined, req0, resp0},
		{"/b", 404, EndPipelined, tcDirCounters{}, subCounters(resp.counters(), resp0)},
		{"/c", 200, EndNextRequest, subCounters(req.counters(), req0), tcDirCounters{}},
	}
	var sum [2]Direction
	for i, x := range xs {
		w := want[i]
		if x.Index != i || pathOf(x) != w.path || x.Tx.StatusCode != w.status || x.End != w.end || x.Phase != PhaseResponse {
			t.Errorf("#%d: %s", i, x)
		}
		wr, wp := dirOf(w.req, 0), dirOf(w.resp, 0)
		gr, gp := x.Request, x.Response
		gr.Flags, gp.Flags = 0, 0
		if gr != wr || gp != wp {
			t.Errorf("#%d: counts %+v / %+v, want %+v / %+v", i, gr, gp, wr, wp)
		}
		if wantFlags := uint8(0x1a); (w.req != tcDirCounters{}) != (x.Request.Flags == wantFlags) {
			t.Errorf("#%d: request flags %#x", i, x.Request.Flags)
		}
		for d := range 2 {
			dd := x.dir(d)
			sum[d].Bytes += dd.Bytes
			sum[d].Packets += dd.Packets
			sum[d].NewBytes += dd.NewBytes
		}
	}
	if sum[0].Bytes != req.at.Bytes || sum[0].Packets != req.at.Packets || sum[0].NewBytes != req.at.NewBytes ||
		sum[1].Bytes != resp.at.Bytes || sum[1].Packets != resp.at.Packets || sum[1].NewBytes != resp.at.NewBytes {
		t.Errorf("sums %+v, want the wire exchange's %+v / %+v", sum, req.at, resp.at)
	}
	// The L7 sizes are the messages', whatever the packets.
	if xs[0].Tx.ReqBytes != int64(len(r1)) || xs[1].Tx.ReqBytes != int64(len(r2)) || xs[0].Tx.RespBytes != int64(len(s1)+2000) ||
		xs[2].Tx.RespBytes != int64(len(s3)) {
		t.Errorf("sizes %d %d %d %d", xs[0].Tx.ReqBytes, xs[1].Tx.ReqBytes, xs[0].Tx.RespBytes, xs[2].Tx.RespBytes)
	}
	// Times: each message's captured packet, the wire's last for what
	// ended in bytes not captured.
	if xs[0].ReqFirst != 10 || xs[1].ReqFirst != 10 || xs[2].ReqFirst != 11 || xs[0].RespFirst != 20 || xs[0].RespLast != 22 ||
		xs[1].RespFirst != 22 || xs[2].RespLast != 22 {
		t.Errorf("times:\n%s", describe(xs))
	}

	// The next wire exchange (index 1, keep-alive) numbers on: 3.
	req.next()
	resp.next()
	r4, s4 := "GET /d HTTP/1.1\r\n\r\n", "HTTP/1.1 204 No Content\r\n\r\n"
	handle1(t, a, req.packet(r4, len(r4), true, 0, 40))
	handle1(t, a, resp.packet(s4, len(s4), true, uint64(len(r4)), 41))
	ev2 := ev
	ev2.Index, ev2.End, ev2.ReqFirstTs, ev2.ReqLastTs, ev2.RespFirstTs, ev2.RespLastTs, ev2.EndTs = 1, uint8(EndFIN), 40, 40, 41, 41, 50
	ev2.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
	x := handle1(t, a, encodeExchange(t, ev2))
	if x == nil || x.Index != 3 || pathOf(x) != "/d" || x.End != EndFIN || x.ReqFirst != 40 || x.RespLast != 41 ||
		x.Request.NewBytes != uint64(len(r4)) {
		t.Errorf("after the pipelined burst: %v", x)
	}
	if st := a.Stats(); st.Parsed != 4 || st.Pipelined != 2 || st.Orphans != 0 || a.Conns() != 0 {
		t.Errorf("stats %+v conns %d", st, a.Conns())
	}
}

// TestAssemblerSpanning: a pipelined request arriving while the previous
// response is still on the wire ends the wire exchange (the kernel sees
// request payload after response payload); the response's transaction is
// reported with the next record, with the response packets of both wire
// exchanges.
func TestAssemblerSpanning(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 3)
	req := &stream{t: t, tu: tu, dir: dirRequest, seq: 1001}
	resp := &stream{t: t, tu: tu, dir: dirResponse, seq: 5001}
	r1, r2 := "GET /one HTTP/1.1\r\n\r\n", "GET /two HTTP/1.1\r\n\r\n"
	s1 := "HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n"
	s2 := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	handle1(t, a, req.packet(r1, len(r1), true, 0, 10))
	handle1(t, a, resp.packet(s1, 1000, true, uint64(len(r1)), 20))
	ev := ExchangeEvent{End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: tu, FirstTs: 1,
		ReqFirstTs: 10, ReqLastTs: 10, RespFirstTs: 20, RespLastTs: 20, EndTs: 30}
	ev.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
	if xs, _ := a.Handle(encodeExchange(t, ev), nil); len(xs) != 0 {
		t.Fatalf("the first response is not complete yet:\n%s", describe(xs))
	}
	req0, resp0 := req.counters(), resp.counters()
	req.next()
	resp.next()
	handle1(t, a, req.packet(r2, len(r2), true, 0, 30))
	rest := len(s1) + 3000 - 1000
	handle1(t, a, resp.packet("tail of the first body", rest, true, uint64(len(r2)), 31))
	respRest := resp.counters()
	handle1(t, a, resp.packet(s2, len(s2), true, uint64(len(r2)), 32))
	ev2 := ev
	ev2.Index, ev2.End, ev2.ReqFirstTs, ev2.ReqLastTs, ev2.RespFirstTs, ev2.RespLastTs, ev2.EndTs = 1, uint8(EndFIN), 30, 30, 31, 32, 40
	ev2.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
	xs, _ := a.Handle(encodeExchange(t, ev2), nil)
	if len(xs) != 2 {
		t.Fatalf("%d exchanges, want 2:\n%s", len(xs), describe(xs))
	}
	one, two := xs[0], xs[1]
	wantResp1 := resp0
	addCounters(&wantResp1, &respRest)
	if one.Index != 0 || pathOf(one) != "/one" || one.Tx.RespBytes != int64(len(s1)+3000) || one.End != EndPipelined ||
		one.Request != dirOf(req0, 0) || one.Response != dirOf(wantResp1, 0) || one.RespFirst != 20 || one.RespLast != 31 {
		t.Errorf("first: %s", one)
	}
	if two.Index != 1 || pathOf(two) != "/two" || two.End != EndFIN || two.Request != dirOf(req.counters(), 0) ||
		two.Response != dirOf(subCounters(resp.counters(), respRest), 0) {
		t.Errorf("second: %s", two)
	}
}

// TestAssemblerLostEvents: events lost when the ring buffer is full leave
// the rest of the connection exact. A wire exchange whose request prefix
// was lost is reported with its L3/L4 facts (its counts not taken by the
// next transaction); a wire exchange lost whole (record and prefixes) still
// counts in the numbering; one whose record alone was lost gives its
// transaction (without counts) before the next one's.
func TestAssemblerLostEvents(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 3)
	req := &stream{t: t, tu: tu, dir: dirRequest, seq: 1001}
	resp := &stream{t: t, tu: tu, dir: dirResponse, seq: 5001}
	type step struct {
		path                          string
		reqLost, respLost, recordLost bool
	}
	steps := []step{
		{path: "/0"},
		{path: "/1", reqLost: true}, // reported with its L3/L4 facts before /2
		{path: "/2"},
		{path: "/3", reqLost: true, respLost: true, recordLost: true}, // gone whole
		{path: "/4"},                   // numbered on
		{path: "/5", recordLost: true}, // its transaction comes with /6's record
		{path: "/6"},
	}
	var got []*Exchange
	var counts [][2]tcDirCounters
	for i, st := range steps {
		r := "GET " + st.path + " HTTP/1.1\r\n\r\n"
		s := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		ts := uint64(100 * (i + 1))
		if raw := req.packet(r, len(r), true, 0, ts); !st.reqLost {
			handle1(t, a, raw)
		}
		if raw := resp.packet(s, len(s), true, uint64(len(r)), ts+1); !st.respLost {
			handle1(t, a, raw)
		}
		ev := ExchangeEvent{End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: tu, FirstTs: 1, Index: uint32(i),
			ReqFirstTs: ts, ReqLastTs: ts, RespFirstTs: ts + 1, RespLastTs: ts + 1, EndTs: ts + 2}
		ev.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
		counts = append(counts, ev.Dir)
		if !st.recordLost {
			xs, err := a.Handle(encodeExchange(t, ev), nil)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, xs...)
		}
		req.next()
		resp.next()
	}
	// #0 /0, #1 L4 (exchange 1), #2 /2, #4 /4, #5 /5 (no counts), #6 /6.
	want := []struct {
		index int
		path  string
		dir   [2]tcDirCounters
	}{
		{0, "/0", counts[0]}, {1, "", counts[1]}, {2, "/2", counts[2]}, {4, "/4", counts[4]},
		{5, "/5", [2]tcDirCounters{}}, {6, "/6", counts[6]},
	}
	if len(got) != len(want) {
		t.Fatalf("%d exchanges, want %d:\n%s", len(got), len(want), describe(got))
	}
	for i, w := range want {
		x := got[i]
		path := ""
		if x.Tx != nil {
			path = pathOf(x)
		}
		if x.Index != w.index || path != w.path || x.Request != dirOf(w.dir[0], 0) || x.Response != dirOf(w.dir[1], 0) {
			t.Errorf("#%d: %s, want index %d path %q counts %+v", i, x, w.index, w.path, w.dir)
		}
	}
	if st := a.Stats(); st.Unparsed != 1 || st.Parsed != 5 {
		t.Errorf("stats %+v", st)
	}
}

// TestAssemblerProtocolHint: the table's protocol (a Service port named
// http-...) picks the analyzer before payload detection: a request payload
// detection does not take for HTTP is parsed as HTTP on a port the table
// calls http, and not elsewhere.
func TestAssemblerProtocolHint(t *testing.T) {
	for _, proto := range []uint16{0, 1} {
		a := newTestAssembler(0)
		tu := testTuple("10.0.0.1:40000", "10.0.0.2:1900", 3)
		req := &stream{t: t, tu: tu, dir: dirRequest, seq: 1}
		resp := &stream{t: t, tu: tu, dir: dirResponse, seq: 1}
		r, s := "M-SEARCH * HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
		for _, raw := range [][]byte{req.packet(r, len(r), true, 0, 10), resp.packet(s, len(s), true, uint64(len(r)), 11)} {
			raw[unsafe.Offsetof(PayloadEvent{}.Proto)] = byte(proto)
			handle1(t, a, raw)
		}
		ev := ExchangeEvent{End: uint8(EndFIN), Phase: uint8(PhaseResponse), Proto: proto, Tuple: tu, FirstTs: 1,
			ReqFirstTs: 10, ReqLastTs: 10, RespFirstTs: 11, RespLastTs: 11, EndTs: 12}
		ev.Dir = [2]tcDirCounters{req.counters(), resp.counters()}
		x := handle1(t, a, encodeExchange(t, ev))
		if proto == 0 && x.Tx != nil {
			t.Errorf("tcp port: parsed %+v", x.Tx)
		}
		if proto == 1 && (x.Tx == nil || attrOf(x, "http.request.method_original").AsString() != "M-SEARCH" || x.Tx.StatusCode != 200) {
			t.Errorf("http port: %s", x)
		}
	}
}
