package http1

import (
	"reflect"
	"testing"

	"github.com/clovisor/clovisor/protocols"
)

// feedSplit feeds the two streams to p as chunks cut by ctrl and returns
// the transactions and the number of bytes fed (true counts). Each byte of
// ctrl makes one chunk: bit 0 its direction, bits 1-6 its captured length
// minus one, bit 7 a gap whose length is the next ctrl byte times 4 (when
// gaps is set). What ctrl leaves is fed in one chunk per direction, the
// requests first.
func feedSplit(t *testing.T, p protocols.Parser, streams [2][]byte, ctrl []byte, gaps bool) ([]*protocols.Transaction, int64) {
	var out []*protocols.Transaction
	var fed int64
	ts := uint64(0)
	feed := func(c protocols.Chunk) {
		ts++
		c.TS = ts
		fed += int64(c.Len)
		before := len(out)
		out = p.Feed(c, out)
		checkTx(t, out[before:], ts)
		checkBounds(t, p)
	}
	for i := 0; i < len(ctrl); i++ {
		b := ctrl[i]
		d := b & 1
		n := min(int(b>>1&0x3f)+1, len(streams[d]))
		gap := 0
		if gaps && b&0x80 != 0 && i+1 < len(ctrl) {
			i++
			gap = min(int(ctrl[i])*4, len(streams[d])-n)
		}
		c := protocols.Chunk{Dir: protocols.Direction(d), Data: streams[d][:n], Len: n + gap}
		streams[d] = streams[d][n+gap:]
		feed(c)
	}
	for d := range streams {
		if len(streams[d]) > 0 {
			feed(protocols.Chunk{Dir: protocols.Direction(d), Data: streams[d], Len: len(streams[d])})
		}
	}
	before := len(out)
	out = p.Close(ts+1, out)
	checkTx(t, out[before:], ts+1)
	if pp := p.(*parser); pp.qn != 0 || pp.s[0].inMsg || pp.s[1].inMsg {
		t.Fatalf("state left after Close: pending %d", pp.qn)
	}
	return out, fed
}

func checkTx(t *testing.T, txs []*protocols.Transaction, now uint64) {
	t.Helper()
	for _, x := range txs {
		switch {
		case x.Protocol != "http", x.Name == "", x.Summary == "":
			t.Fatalf("bad names: %+v", x)
		case x.ReqBytes < 0, x.RespBytes < 0:
			t.Fatalf("negative byte count: %+v", x)
		case x.ReqStart > x.ReqEnd, x.RespStart > x.RespEnd, x.ReqEnd > now, x.RespEnd > now:
			t.Fatalf("bad timestamps: %+v", x)
		case x.NoResponse && (x.RespBytes != 0 || x.StatusCode != 0 || x.RespStart != 0):
			t.Fatalf("response fields without response: %+v", x)
		case x.StatusCode != 0 && (x.StatusCode < 100 || x.StatusCode > 999):
			t.Fatalf("bad status: %+v", x)
		case x.StatusCode >= 400 && x.ErrorType == "", x.ServerFault && x.ErrorType == "":
			t.Fatalf("bad error: %+v", x)
		case x.NumAttrs() > maxAttrs || x.NumAttrs() < 4 || len(x.AllAttrs()) != x.NumAttrs():
			t.Fatalf("bad attributes: %+v", x)
		}
		for _, kv := range x.AllAttrs() {
			if !kv.Valid() {
				t.Fatalf("invalid attribute %v in %+v", kv, x)
			}
		}
	}
}

func checkBounds(t *testing.T, pp protocols.Parser) {
	t.Helper()
	p := pp.(*parser)
	if p.qn > p.cfg.maxPending || len(p.ring) > p.cfg.maxPending || len(p.free) > p.cfg.maxPending {
		t.Fatalf("queue not bounded: %d pending, ring %d, free %d", p.qn, len(p.ring), len(p.free))
	}
	for i := range p.s {
		if len(p.s[i].buf) > p.cfg.maxHeader {
			t.Fatalf("header buffer not bounded: %d", len(p.s[i].buf))
		}
		if p.s[i].n < 0 || p.s[i].body < 0 || p.s[i].remain < 0 {
			t.Fatalf("negative counts: %+v", p.s[i])
		}
	}
}

// comparable is a transaction without its timestamps.
func withoutTS(txs []*protocols.Transaction) []tx {
	var r []tx
	for _, x := range txs {
		w := toTx(x)
		w.ReqStart, w.ReqEnd, w.RespStart, w.RespEnd = 0, 0, 0, 0
		r = append(r, w)
	}
	return r
}

func FuzzParser(f *testing.F) {
	seeds := [][3]string{
		{getReq + getReq2, okResp + nfResp, "\x00\x03\x05\x07\x02"},
		{getReq + getReq, chunkedResp + okResp, "\xfe\xff\x01\x81\x03\x00"},
		{"POST /u HTTP/1.1\r\nContent-Length: 300\r\n\r\n" + string(make([]byte, 300)), "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nbody", "\x80\x10\x01\x02"},
		{"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x01a", "HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x01b", ""},
		{"CONNECT h:443 HTTP/1.1\r\n\r\n\x16\x03\x01", "HTTP/1.1 200 OK\r\n\r\n\x16\x03\x03", "\x00\x01"},
		{"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.0\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil close", "\x7e\x7f"},
		{"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "garbage\r\n\r\n", ""},
		{"PURGE http://u:p@h:1/p?sig=x HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "HTTP/1.1 204 No Content\r\n\r\n", "\x02\x02\x02\x03"},
		{"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n", "HTTP/1.1 500 E\r\nTransfer-Encoding: x\r\n\r\nabc", "\x81\x02\x01\x01\x01"},
	}
	for _, s := range seeds {
		f.Add([]byte(s[0]), []byte(s[1]), []byte(s[2]))
	}
	a := New(WithMaxPending(8), WithMaxHeaderBytes(512))
	f.Fuzz(func(t *testing.T, reqs, resps, ctrl []byte) {
		p := a.NewParser()
		out, fed := feedSplit(t, p, [2][]byte{reqs, resps}, ctrl, true)
		st := p.Stats()
		var counted int64
		for _, x := range out {
			counted += x.ReqBytes + x.RespBytes
		}
		// Every byte is in one transaction, garbage, or ignored.
		if ign := p.(*parser).ignored; st.Garbage < 0 || st.Resyncs < 0 || ign < 0 || counted+st.Garbage+ign != fed {
			t.Fatalf("bytes counted %d + garbage %d + ignored %d != fed %d", counted, st.Garbage, ign, fed)
		}

		// Without gaps, the requests then the responses: when nothing
		// was dropped, how the streams are split does not matter.
		p1 := a.NewParser()
		out1, _ := feedSplit(t, p1, [2][]byte{reqs, resps}, nil, false)
		var ctrl2 []byte
		for _, b := range ctrl {
			ctrl2 = append(ctrl2, b&^0x81) // requests only, no gaps
		}
		for _, b := range ctrl {
			ctrl2 = append(ctrl2, b&^0x80|1) // then responses
		}
		p2 := a.NewParser()
		out2, _ := feedSplit(t, p2, [2][]byte{reqs, resps}, ctrl2, false)
		if p1.Stats() == (protocols.ParserStats{}) && p2.Stats() == (protocols.ParserStats{}) {
			if w1, w2 := withoutTS(out1), withoutTS(out2); !reflect.DeepEqual(w1, w2) {
				t.Fatalf("split changed the result:\n whole %+v\n split %+v", w1, w2)
			}
		}
	})
}
