package tcsessions

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"

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
		MaxPending: max,
	})
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
		encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: 5, Ts: 10, Len: uint32(len(req)), Index: 3}, req),
		encodePayload(t, PayloadEvent{Dir: dirResponse, Tuple: tu, FirstTs: 5, Ts: 20, Len: 1448, Index: 3}, resp+"xxxx"),
	} {
		if x, err := a.Handle(raw); x != nil || err != nil {
			t.Fatalf("payload: %v %v", x, err)
		}
	}
	respLen := uint64(len(resp) + 100000)
	ev := ExchangeEvent{
		End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: tu, Index: 3,
		ConnFlags: ConnFromSYN, FirstTs: 5, SynTs: 5, SynackTs: 7,
		ReqFirstTs: 10, ReqLastTs: 11, RespFirstTs: 20, RespLastTs: 90, EndTs: 100,
		Flags: [2]uint32{0x18, 0x18},
	}
	ev.Dir[0] = tcDirCounters{Bytes: 300, Packets: 2, PayloadBytes: uint64(len(req)), NewBytes: uint64(len(req))}
	ev.Dir[1] = tcDirCounters{Bytes: 110000, Packets: 70, PayloadBytes: respLen + 1448, NewBytes: respLen, RetransPackets: 1}
	x, err := a.Handle(encodeExchange(t, ev))
	if err != nil || x == nil {
		t.Fatalf("exchange: %v %v", x, err)
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
	if s.Point != spans.PointNodeNIC || s.Kind != 0 || s.Tx != tx || s.Wire.Interface != "eth0" ||
		s.Wire.Response.RetransBytes != 1448 || s.Wire.HandshakeRTT != 2 || s.Wire.End != "next_request" || s.Wire.SeenFrom != "syn" {
		t.Errorf("session %+v wire %+v", s, s.Wire)
	}
	if st := a.Stats(); st != (AssemblerStats{Exchanges: 1, Payloads: 2, Parsed: 1}) || a.Pending() != 0 {
		t.Errorf("stats %+v pending %d", st, a.Pending())
	}
}

// TestAssemblerTLSAndReset: bytes no analyzer knows give an L3/L4-only
// transaction named after the table's protocol; a RST before the response
// is an error; an HTTP request cut by a RST is the parser's no_response.
func TestAssemblerTLSAndReset(t *testing.T) {
	a := newTestAssembler(0)
	tu := testTuple("[fd00::1]:40000", "[fd00::2]:443", 3)
	hello := "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
	a.Handle(encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: 1, Len: 517}, hello))
	ev := ExchangeEvent{End: uint8(EndRST), Phase: uint8(PhaseRequest), Proto: 3, Tuple: tu, FirstTs: 1,
		ReqFirstTs: 2, ReqLastTs: 2, EndTs: 9}
	ev.Dir[0] = tcDirCounters{Bytes: 600, Packets: 1, PayloadBytes: 517, NewBytes: 517}
	x, _ := a.Handle(encodeExchange(t, ev))
	if x.Tx != nil || x.Interface != "3" {
		t.Fatalf("TLS parsed: %s", x)
	}
	s := x.Session()
	if s.Tx.Protocol != "https" || s.Tx.Name != "https" || !s.Tx.NoResponse || s.Tx.ErrorType != ErrorTCPReset ||
		s.Tx.ReqBytes != 517 || s.Tx.ReqStart != 2 || s.Point != spans.PointPodVeth || s.Wire.End != "rst" {
		t.Errorf("L4 transaction %+v", s.Tx)
	}

	tu2 := testTuple("10.0.0.1:40001", "10.0.0.2:80", 3)
	a.Handle(encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu2, FirstTs: 4, Len: 18}, "GET / HTTP/1.1\r\n\r\n"))
	ev = ExchangeEvent{End: uint8(EndRST), Phase: uint8(PhaseRequest), Proto: 1, Tuple: tu2, FirstTs: 4,
		ReqFirstTs: 5, ReqLastTs: 5, EndTs: 6}
	ev.Dir[0] = tcDirCounters{PayloadBytes: 18, NewBytes: 18}
	x, _ = a.Handle(encodeExchange(t, ev))
	if x.Tx == nil || !x.Tx.NoResponse || x.Tx.ErrorType != http1.ErrorNoResponse {
		t.Errorf("reset HTTP request: %+v", x.Tx)
	}
	// No payload at all: the connection's life.
	ev = ExchangeEvent{End: uint8(EndFIN), Phase: uint8(PhaseIdle), Tuple: tu2, FirstTs: 40, EndTs: 50}
	x, _ = a.Handle(encodeExchange(t, ev))
	if tx := x.Session().Tx; tx.ReqStart != 40 || tx.ReqEnd != 50 || tx.ErrorType != "" || tx.Protocol != "tcp" {
		t.Errorf("idle: %+v", tx)
	}
}

// TestAssemblerBounds: prefixes whose record never comes are dropped
// oldest first beyond MaxPending and counted; bad events are errors.
func TestAssemblerBounds(t *testing.T) {
	a := newTestAssembler(4)
	for i := 0; i < 10; i++ {
		tu := testTuple("10.0.0.1:40000", "10.0.0.2:80", 3)
		a.Handle(encodePayload(t, PayloadEvent{Dir: dirRequest, Tuple: tu, FirstTs: uint64(i), Len: 3}, "GET"))
	}
	if a.Pending() != 4 || a.Stats().Orphans != 6 {
		t.Errorf("pending %d, stats %+v", a.Pending(), a.Stats())
	}
	for _, raw := range [][]byte{nil, {9, 0, 0}, {eventExchange, 1, 2}, {eventPayload, 0}} {
		if x, err := a.Handle(raw); err == nil || x != nil {
			t.Errorf("%v: %v %v", raw, x, err)
		}
	}
	// A payload event that claims more bytes than it has.
	raw := encodePayload(t, PayloadEvent{Dir: dirRequest, Len: 3}, "GET")
	raw[2] = 200
	if _, err := a.Handle(raw); err == nil || !strings.Contains(err.Error(), "claims") {
		t.Errorf("short payload: %v", err)
	}
	if a.Stats().BadEvents != 5 {
		t.Errorf("stats %+v", a.Stats())
	}
}
