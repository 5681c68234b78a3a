package http1

import (
	"fmt"
	"math/rand"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"

	"github.com/clovisor/clovisor/protocols"
)

const (
	req  = protocols.Request
	resp = protocols.Response
)

// step is one chunk fed to the parser; n is its true length (0: len(data)).
type step struct {
	dir  protocols.Direction
	data string
	n    int
	ts   uint64
}

func (s step) chunk() protocols.Chunk {
	n := s.n
	if n == 0 {
		n = len(s.data)
	}
	return protocols.Chunk{Dir: s.dir, Data: []byte(s.data), Len: n, TS: s.ts}
}

// tx is the comparable form of a Transaction.
type tx struct {
	Name, Summary                        string
	ReqStart, ReqEnd, RespStart, RespEnd uint64
	ReqBytes, RespBytes                  int64
	StatusCode                           int
	ErrorType                            string
	ServerFault, Truncated, NoResponse   bool
	Attrs                                []string
}

func toTx(t *protocols.Transaction) tx {
	w := tx{
		Name: t.Name, Summary: t.Summary,
		ReqStart: t.ReqStart, ReqEnd: t.ReqEnd, RespStart: t.RespStart, RespEnd: t.RespEnd,
		ReqBytes: t.ReqBytes, RespBytes: t.RespBytes,
		StatusCode: t.StatusCode, ErrorType: t.ErrorType,
		ServerFault: t.ServerFault, Truncated: t.Truncated, NoResponse: t.NoResponse,
	}
	for _, kv := range t.AllAttrs() {
		w.Attrs = append(w.Attrs, string(kv.Key)+"="+kv.Value.Emit())
	}
	return w
}

// run feeds steps to a new parser, then closes it at ts 1000 when closeAt.
func run(t *testing.T, a protocols.Analyzer, steps []step, closeAt bool) ([]tx, protocols.ParserStats) {
	t.Helper()
	p := a.NewParser()
	var out []*protocols.Transaction
	var fed int64
	for _, s := range steps {
		c := s.chunk()
		fed += int64(max(c.Len, len(c.Data)))
		out = p.Feed(c, out)
	}
	if closeAt {
		out = p.Close(1000, out)
		// Every byte is in one transaction, garbage, or ignored.
		counted := p.Stats().Garbage + p.(*parser).ignored
		for _, x := range out {
			counted += x.ReqBytes + x.RespBytes
		}
		if counted != fed {
			t.Errorf("%d bytes accounted for, %d fed", counted, fed)
		}
	}
	var got []tx
	for _, x := range out {
		if x.Protocol != "http" {
			t.Errorf("Protocol = %q", x.Protocol)
		}
		got = append(got, toTx(x))
	}
	return got, p.Stats()
}

func check(t *testing.T, got, want []tx) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("got %d transactions, want %d", len(got), len(want))
		for i, g := range got {
			t.Logf("got[%d] = %+v", i, g)
		}
	}
	for i := 0; i < len(got) && i < len(want); i++ {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Errorf("transaction %d:\n got  %+v\n want %+v", i, got[i], want[i])
		}
	}
}

func n64(s string) int64 { return int64(len(s)) }

func sz(key string, n int) string { return key + "=" + strconv.Itoa(n) }

const (
	getReq  = "GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"
	okResp  = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
	getReq2 = "GET /b HTTP/1.1\r\nHost: example.com:8080\r\n\r\n"
	nfResp  = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
)

// getOK is the transaction of getReq/okResp at timestamps 1..4.
func getOK(rs, re, ps, pe uint64) tx {
	return tx{
		Name: "GET", Summary: "GET /index.html?q=1 200",
		ReqStart: rs, ReqEnd: re, RespStart: ps, RespEnd: pe,
		ReqBytes: n64(getReq), RespBytes: n64(okResp), StatusCode: 200,
		Attrs: []string{
			"http.request.method=GET", "url.path=/index.html", "url.query=q=1", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"user_agent.original=curl/8.0", "server.address=example.com",
			"http.response.body.size=5", sz("http.request.size", len(getReq)), sz("http.response.size", len(okResp)),
		},
	}
}

func get2NF(rs, re, ps, pe uint64) tx {
	return tx{
		Name: "GET", Summary: "GET /b 404",
		ReqStart: rs, ReqEnd: re, RespStart: ps, RespEnd: pe,
		ReqBytes: n64(getReq2), RespBytes: n64(nfResp), StatusCode: 404, ErrorType: "404",
		Attrs: []string{
			"http.request.method=GET", "url.path=/b", "url.scheme=http",
			"http.response.status_code=404", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=example.com", "server.port=8080",
			"http.response.body.size=0", sz("http.request.size", len(getReq2)), sz("http.response.size", len(nfResp)),
		},
	}
}

func TestDetect(t *testing.T) {
	a := New()
	for _, c := range []struct {
		dir  protocols.Direction
		data string
		want bool
	}{
		{req, "GET / HTTP/1.1\r\n", true},
		{req, "GET ", true},
		{req, "POST /x", true},
		{req, "DELETE /x HTTP/1.0", true},
		{req, "QUERY /x HTTP/1.1", true},
		{req, "OPTIONS * HTTP/1.1\r\n", true},
		{req, "CONNECT example.com:443 HTTP/1.1\r\n", true},
		{req, "PURGE /cache HTTP/1.1\r\n", true},
		{req, "M-SEARCH http://h/ HTTP/1.1\r\n", true},
		{req, "PURGE /cache", false},                   // no version seen
		{req, "PURGE cache HTTP/1.1\r\n", false},       // not " /" nor " http"
		{req, "PURGE /x\r\nHost: HTTP/1.1\r\n", false}, // version on another line
		{req, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false},
		{req, "get / HTTP/1.1\r\n", false},
		{req, "GET/ HTTP/1.1", false},
		{req, "GET", false},
		{req, "", false},
		{req, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", false},
		{req, "HTTP/1.1 200 OK\r\n", false},
		{resp, "HTTP/1.1 200 OK\r\n", true},
		{resp, "HTTP/1.0 404 Not Found\r\n", true},
		{resp, "HTTP/1.1", false},
		{resp, "HTTP/2 200\r\n", false},
		{resp, "GET / HTTP/1.1\r\n", false},
		{protocols.Direction(7), "GET / HTTP/1.1\r\n", false},
	} {
		if got := a.Detect(c.dir, []byte(c.data)); got != c.want {
			t.Errorf("Detect(%v, %q) = %v, want %v", c.dir, c.data, got, c.want)
		}
	}
	if a.Name() != "http" {
		t.Errorf("Name() = %q", a.Name())
	}
	b := New(WithKnownMethods("GET", "PURGE"))
	if !b.Detect(req, []byte("PURGE cache")) || !b.Detect(req, []byte("GET /")) {
		t.Error("known methods not used by Detect")
	}
}

func TestKeepAlive(t *testing.T) {
	got, st := run(t, New(), []step{
		{req, getReq, 0, 1}, {resp, okResp, 0, 2},
		{req, getReq2, 0, 3}, {resp, nfResp, 0, 4},
		{req, getReq, 0, 5}, {resp, okResp, 0, 6},
	}, true)
	check(t, got, []tx{getOK(1, 1, 2, 2), get2NF(3, 3, 4, 4), getOK(5, 5, 6, 6)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestPipelining(t *testing.T) {
	// Three requests, then three responses; in separate and in shared
	// chunks.
	got, st := run(t, New(), []step{
		{req, getReq, 0, 1}, {req, getReq2, 0, 2}, {req, getReq, 0, 3},
		{resp, okResp, 0, 4}, {resp, nfResp, 0, 5}, {resp, okResp, 0, 6},
	}, false)
	check(t, got, []tx{getOK(1, 1, 4, 4), get2NF(2, 2, 5, 5), getOK(3, 3, 6, 6)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
	got, _ = run(t, New(), []step{
		{req, getReq + getReq2 + getReq, 0, 1},
		{resp, okResp + nfResp, 0, 2}, {resp, okResp, 0, 3},
	}, false)
	check(t, got, []tx{getOK(1, 1, 2, 2), get2NF(1, 1, 2, 2), getOK(1, 1, 3, 3)})
}

const chunkedResp = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" +
	"4\r\nWiki\r\n5;name=\"val\"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n"

func chunkedTx(pe uint64) tx {
	return tx{
		Name: "GET", Summary: "GET /index.html?q=1 200",
		ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: pe,
		ReqBytes: n64(getReq), RespBytes: n64(chunkedResp), StatusCode: 200,
		Attrs: []string{
			"http.request.method=GET", "url.path=/index.html", "url.query=q=1", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"user_agent.original=curl/8.0", "server.address=example.com",
			"http.response.body.size=23", sz("http.request.size", len(getReq)), sz("http.response.size", len(chunkedResp)),
		},
	}
}

func TestChunkedSplitEverywhere(t *testing.T) {
	// The chunked response and a keep-alive one after it, split in three
	// chunks (ts 2, 3, 4) at every pair of positions.
	a := New()
	full := chunkedResp + okResp
	L := len(chunkedResp)
	for i := 1; i < len(full); i++ {
		for j := i; j < len(full); j++ {
			tsAt := func(pos int) uint64 {
				switch {
				case pos < i:
					return 2
				case pos < j:
					return 3
				}
				return 4
			}
			steps := []step{{req, getReq + getReq, 0, 1}, {resp, full[:i], 0, 2}}
			if j > i {
				steps = append(steps, step{resp, full[i:j], 0, 3})
			}
			steps = append(steps, step{resp, full[j:], 0, 4})
			got, st := run(t, a, steps, false)
			want := []tx{chunkedTx(tsAt(L - 1)), getOK(1, 1, tsAt(L), 4)}
			if !reflect.DeepEqual(got, want) || st != (protocols.ParserStats{}) {
				t.Fatalf("split %d/%d: stats %+v\n got  %+v\n want %+v", i, j, st, got, want)
			}
		}
	}
}

func TestByteByByte(t *testing.T) {
	// Every message fed one byte per chunk, with the timestamp of each
	// byte its offset.
	var steps []step
	ts := uint64(0)
	add := func(dir protocols.Direction, s string) (first, last uint64) {
		for i := 0; i < len(s); i++ {
			ts++
			steps = append(steps, step{dir, s[i : i+1], 0, ts})
		}
		return ts - uint64(len(s)) + 1, ts
	}
	rs, re := add(req, getReq)
	ps, pe := add(resp, chunkedResp)
	rs2, re2 := add(req, getReq2)
	ps2, pe2 := add(resp, nfResp)
	got, st := run(t, New(), steps, false)
	w := chunkedTx(pe)
	w.ReqStart, w.ReqEnd, w.RespStart = rs, re, ps
	check(t, got, []tx{w, get2NF(rs2, re2, ps2, pe2)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestBodyGaps(t *testing.T) {
	// A POST whose 10000-byte body is captured only in part, over three
	// chunks, and a response whose 100000-byte body is captured as 200.
	head := "POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10000\r\n\r\n"
	body := strings.Repeat("x", 100)
	rhead := "HTTP/1.1 201 Created\r\nContent-Length: 100000\r\n\r\n"
	got, st := run(t, New(), []step{
		{req, head + body, len(head) + 4000, 1},
		{req, body, 3000, 2},
		{req, "", 3000, 3},
		{resp, rhead + body + body, len(rhead) + 100000, 4},
		{req, getReq2, 0, 5}, {resp, nfResp, 0, 6},
	}, false)
	check(t, got, []tx{{
		Name: "POST", Summary: "POST /upload 201",
		ReqStart: 1, ReqEnd: 3, RespStart: 4, RespEnd: 4,
		ReqBytes: n64(head) + 10000, RespBytes: n64(rhead) + 100000, StatusCode: 201,
		Attrs: []string{
			"http.request.method=POST", "url.path=/upload", "url.scheme=http",
			"http.response.status_code=201", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=h", "http.request.body.size=10000", "http.response.body.size=100000",
			sz("http.request.size", len(head)+10000), sz("http.response.size", len(rhead)+100000),
		},
	}, get2NF(5, 5, 6, 6)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestChunkedGapInData(t *testing.T) {
	// The gap only covers chunk data: the parser stays in step.
	rhead := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
	data := strings.Repeat("y", 0x100)
	full := rhead + "100\r\n" + data + "\r\n" + "3\r\nabc\r\n0\r\n\r\n"
	first := rhead + "100\r\n" + data[:10]
	got, st := run(t, New(), []step{
		{req, getReq2, 0, 1},
		{resp, first, len(rhead) + 5 + 0x100, 2},
		{resp, full[len(rhead)+5+0x100:], 0, 3},
		{req, getReq2, 0, 4}, {resp, nfResp, 0, 5},
	}, false)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /b 200",
		ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 3,
		ReqBytes: n64(getReq2), RespBytes: n64(full), StatusCode: 200,
		Attrs: []string{
			"http.request.method=GET", "url.path=/b", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=example.com", "server.port=8080",
			"http.response.body.size=259", sz("http.request.size", len(getReq2)), sz("http.response.size", len(full)),
		},
	}, get2NF(4, 4, 5, 5)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestChunkedLostSyncResync(t *testing.T) {
	// The gap swallows a chunk-size line: the exchange is truncated,
	// the bytes up to the next response are garbage, the next response
	// resynchronises.
	rhead := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
	d := strings.Repeat("z", 16)
	full := rhead + "10\r\n" + d + "\r\n10\r\n" + d + "\r\n0\r\n\r\n"
	captured := rhead + "10\r\n" + d[:8]
	tail := "\r\n0\r\n\r\n" // a later chunk with the rest: garbage
	got, st := run(t, New(), []step{
		{req, getReq2, 0, 1},
		{resp, captured, len(full) - len(tail), 2},
		{resp, tail, 0, 3},
		{req, getReq2, 0, 4}, {resp, nfResp, 0, 5},
	}, false)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /b 200",
		ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(getReq2), RespBytes: int64(len(full) - len(tail)), StatusCode: 200, Truncated: true,
		Attrs: []string{
			"http.request.method=GET", "url.path=/b", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=example.com", "server.port=8080",
			"http.response.body.size=16", sz("http.request.size", len(getReq2)), sz("http.response.size", len(full)-len(tail)),
		},
	}, get2NF(4, 4, 5, 5)})
	if want := (protocols.ParserStats{Garbage: int64(len(tail)), Resyncs: 1}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestTruncatedHeader(t *testing.T) {
	// Only a prefix of the request's header section was captured.
	full := "GET /a/b?sig=SECRETSIG&x=1 HTTP/1.1\r\nHost: example.com\r\nCookie: session=SECRETCOOKIE\r\nUser-Agent: Mozilla/5.0\r\n\r\n"
	cut := strings.Index(full, "Cookie") + 10
	for _, c := range []struct {
		name  string
		cut   int
		attrs []string
		sum   string
	}{
		{"in fields", cut, []string{
			"http.request.method=GET", "url.path=/a/b", "url.query=sig=REDACTED&x=1", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=example.com",
		}, "GET /a/b?sig=REDACTED&x=1 200"},
		{"in target", 16, []string{
			"http.request.method=GET", "url.path=/a/b", "url.query=sig=REDACTED", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http",
		}, "GET /a/b?sig=REDACTED 200"},
		{"in version", 32, []string{
			"http.request.method=GET", "url.path=/a/b", "url.query=sig=REDACTED&x=1", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http",
		}, "GET /a/b?sig=REDACTED&x=1 200"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, st := run(t, New(), []step{
				{req, full[:c.cut], len(full), 1},
				{resp, okResp, 0, 2},
				{req, getReq2, 0, 3}, {resp, nfResp, 0, 4},
			}, false)
			attrs := append(c.attrs, "http.response.body.size=5",
				sz("http.request.size", len(full)), sz("http.response.size", len(okResp)))
			check(t, got, []tx{{
				Name: "GET", Summary: c.sum,
				ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
				ReqBytes: n64(full), RespBytes: n64(okResp), StatusCode: 200, Truncated: true,
				Attrs: attrs,
			}, get2NF(3, 3, 4, 4)})
			if want := (protocols.ParserStats{Resyncs: 1}); st != want {
				t.Errorf("stats = %+v, want %+v", st, want)
			}
		})
	}
}

func TestTruncatedResponseHeader(t *testing.T) {
	full := "HTTP/1.1 503 Service Unavailable\r\nSet-Cookie: a=SECRET\r\nContent-Length: 4\r\n\r\nbusy"
	got, st := run(t, New(), []step{
		{req, getReq2, 0, 1},
		{resp, full[:20], len(full), 2},
		{req, getReq2, 0, 3}, {resp, nfResp, 0, 4},
	}, false)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /b 503",
		ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(getReq2), RespBytes: n64(full), StatusCode: 503, ErrorType: "503", ServerFault: true, Truncated: true,
		Attrs: []string{
			"http.request.method=GET", "url.path=/b", "url.scheme=http",
			"http.response.status_code=503", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=example.com", "server.port=8080",
			sz("http.request.size", len(getReq2)), sz("http.response.size", len(full)),
		},
	}, get2NF(3, 3, 4, 4)})
	if want := (protocols.ParserStats{Resyncs: 1}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestHeaderOverflow(t *testing.T) {
	big := "GET /big HTTP/1.1\r\nHost: h\r\nX-Big: " + strings.Repeat("b", 20000) + "\r\n\r\n"
	var steps []step
	for i := 0; i < len(big); i += 1000 {
		steps = append(steps, step{req, big[i:min(i+1000, len(big))], 0, uint64(1 + i/1000)})
	}
	last := steps[len(steps)-1].ts
	steps = append(steps, step{resp, nfResp, 0, 100}, step{req, getReq2, 0, 101}, step{resp, nfResp, 0, 102})
	got, st := run(t, New(), steps, false)
	// The section is cut at 16 KiB, in the chunk of ts 17; the rest of
	// that chunk is counted, the later chunks of the request are garbage.
	reqBytes := int64(17000)
	w := get2NF(101, 101, 102, 102)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /big 404",
		ReqStart: 1, ReqEnd: 17, RespStart: 100, RespEnd: 100,
		ReqBytes: reqBytes, RespBytes: n64(nfResp), StatusCode: 404, ErrorType: "404", Truncated: true,
		Attrs: []string{
			"http.request.method=GET", "url.path=/big", "url.scheme=http",
			"http.response.status_code=404", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=h", "http.response.body.size=0",
			"http.request.size=17000", sz("http.response.size", len(nfResp)),
		},
	}, w})
	if want := (protocols.ParserStats{Garbage: int64(len(big)) - reqBytes, Resyncs: 1}); st != want {
		t.Errorf("stats = %+v, want %+v (last ts %d)", st, want, last)
	}
}

func TestNoBodyResponses(t *testing.T) {
	head := "HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n"
	headResp := "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
	del := "DELETE /d HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
	noContent := "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"
	cond := "GET /c HTTP/1.0\r\nIf-None-Match: \"x\"\r\n\r\n"
	notMod := "HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
	got, st := run(t, New(), []step{
		{req, head + del + cond, 0, 1},
		{resp, headResp + noContent + notMod + okResp, 0, 2}, // okResp: an orphan
	}, false)
	check(t, got, []tx{{
		Name: "HEAD", Summary: "HEAD /h 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(head), RespBytes: n64(headResp), StatusCode: 200,
		Attrs: []string{"http.request.method=HEAD", "url.path=/h", "url.scheme=http", "http.response.status_code=200",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=h",
			sz("http.request.size", len(head)), sz("http.response.size", len(headResp))},
	}, {
		Name: "DELETE", Summary: "DELETE /d 204", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(del), RespBytes: n64(noContent), StatusCode: 204,
		Attrs: []string{"http.request.method=DELETE", "url.path=/d", "url.scheme=http", "http.response.status_code=204",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=h",
			"http.request.body.size=0", sz("http.request.size", len(del)), sz("http.response.size", len(noContent))},
	}, {
		Name: "GET", Summary: "GET /c 304", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(cond), RespBytes: n64(notMod), StatusCode: 304,
		Attrs: []string{"http.request.method=GET", "url.path=/c", "url.scheme=http", "http.response.status_code=304",
			"network.protocol.name=http", "network.protocol.version=1.0",
			sz("http.request.size", len(cond)), sz("http.response.size", len(notMod))},
	}})
	// The fourth response answers no request: garbage, parsed to the end.
	if want := (protocols.ParserStats{Garbage: n64(okResp)}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestContinue(t *testing.T) {
	head := "PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\n"
	cont := "HTTP/1.1 100 Continue\r\n\r\n"
	early := "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
	final := "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
	got, st := run(t, New(), []step{
		{req, head, 0, 1}, {resp, cont, 0, 2}, {req, "abc", 0, 3}, {req, "def", 0, 4},
		{resp, early, 0, 5}, {resp, final, 0, 6},
	}, false)
	check(t, got, []tx{{
		Name: "PUT", Summary: "PUT /f 201", ReqStart: 1, ReqEnd: 4, RespStart: 2, RespEnd: 6,
		ReqBytes: n64(head) + 6, RespBytes: n64(cont + early + final), StatusCode: 201,
		Attrs: []string{"http.request.method=PUT", "url.path=/f", "url.scheme=http", "http.response.status_code=201",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=h",
			"http.request.body.size=6", "http.response.body.size=2",
			sz("http.request.size", len(head)+6), sz("http.response.size", len(cont+early+final))},
	}})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestEarlyResponse(t *testing.T) {
	// The server answers before the request body is complete: the
	// transaction waits for the end of the request.
	head := "POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n"
	r := "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"
	p := New().NewParser()
	out := p.Feed(step{req, head + "12345", 0, 1}.chunk(), nil)
	out = p.Feed(step{resp, r, 0, 2}.chunk(), out)
	if len(out) != 0 {
		t.Fatalf("emitted before the request ended: %+v", toTx(out[0]))
	}
	out = p.Feed(step{req, "67890", 0, 3}.chunk(), out)
	if len(out) != 1 {
		t.Fatalf("got %d transactions", len(out))
	}
	g := toTx(out[0])
	if g.ReqEnd != 3 || g.ReqBytes != n64(head)+10 || g.StatusCode != 413 || g.ErrorType != "413" || g.ServerFault {
		t.Errorf("got %+v", g)
	}
}

func TestUpgrade(t *testing.T) {
	up := "GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
	sw := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
	got, st := run(t, New(), []step{
		{req, up, 0, 1}, {resp, sw + "\x81\x05hello", 0, 2},
		{req, "\x81\x85abcdefghi", 0, 3}, {resp, "GET / HTTP/1.1\r\n\r\n", 0, 4}, {req, getReq, 0, 5},
	}, true)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /chat 101", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(up), RespBytes: n64(sw), StatusCode: 101,
		Attrs: []string{"http.request.method=GET", "url.path=/chat", "url.scheme=http", "http.response.status_code=101",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=h",
			sz("http.request.size", len(up)), sz("http.response.size", len(sw))},
	}})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestConnectTunnel(t *testing.T) {
	c := "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic U0VDUkVU\r\n\r\n"
	ok := "HTTP/1.1 200 Connection Established\r\n\r\n"
	got, st := run(t, New(), []step{
		{req, c, 0, 1}, {resp, ok, 0, 2},
		{req, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 0, 3}, {resp, "\x16\x03\x03\x00\x7a", 0, 4},
	}, true)
	check(t, got, []tx{{
		Name: "CONNECT", Summary: "CONNECT example.com:443 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(c), RespBytes: n64(ok), StatusCode: 200,
		Attrs: []string{"http.request.method=CONNECT", "url.scheme=http", "http.response.status_code=200",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=example.com", "server.port=443",
			sz("http.request.size", len(c)), sz("http.response.size", len(ok))},
	}})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestCloseDelimited(t *testing.T) {
	r := "GET /old HTTP/1.0\r\nUser-Agent: Wget/1.0\r\n\r\n"
	h := "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n"
	got, st := run(t, New(), []step{
		{req, r, 0, 1}, {resp, h + "<html>", 0, 2}, {resp, "more", 100, 3},
	}, true)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /old 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 3,
		ReqBytes: n64(r), RespBytes: n64(h) + 106, StatusCode: 200,
		Attrs: []string{"http.request.method=GET", "url.path=/old", "url.scheme=http", "http.response.status_code=200",
			"network.protocol.name=http", "network.protocol.version=1.0", "user_agent.original=Wget/1.0",
			"http.response.body.size=106", sz("http.request.size", len(r)), sz("http.response.size", len(h)+106)},
	}})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestClose(t *testing.T) {
	// Two pipelined requests, one response: the second has none.
	got, _ := run(t, New(), []step{
		{req, getReq2 + getReq, 0, 1}, {resp, nfResp, 0, 2},
	}, true)
	check(t, got, []tx{get2NF(1, 1, 2, 2), {
		Name: "GET", Summary: "GET /index.html?q=1 -", ReqStart: 1, ReqEnd: 1,
		ReqBytes: n64(getReq), ErrorType: "no_response", ServerFault: true, NoResponse: true,
		Attrs: []string{"http.request.method=GET", "url.path=/index.html", "url.query=q=1", "url.scheme=http",
			"network.protocol.name=http", "network.protocol.version=1.1",
			"user_agent.original=curl/8.0", "server.address=example.com", sz("http.request.size", len(getReq))},
	}})

	// The response is cut by the close.
	cut := "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + strings.Repeat("c", 50)
	got, _ = run(t, New(), []step{{req, getReq2, 0, 1}, {resp, cut, 0, 2}}, true)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /b 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(getReq2), RespBytes: n64(cut), StatusCode: 200, ErrorType: "response_truncated", ServerFault: true,
		Attrs: []string{"http.request.method=GET", "url.path=/b", "url.scheme=http", "http.response.status_code=200",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=example.com", "server.port=8080",
			"http.response.body.size=50", sz("http.request.size", len(getReq2)), sz("http.response.size", len(cut))},
	}})

	// The request's header section is not complete at the close.
	part := "POST /form HTTP/1.1\r\nHost: h\r\nContent-Le"
	got, st := run(t, New(), []step{{req, part, 0, 1}}, true)
	check(t, got, []tx{{
		Name: "POST", Summary: "POST /form -", ReqStart: 1, ReqEnd: 1,
		ReqBytes: n64(part), ErrorType: "no_response", ServerFault: true, NoResponse: true, Truncated: true,
		Attrs: []string{"http.request.method=POST", "url.path=/form", "url.scheme=http",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=h", sz("http.request.size", len(part))},
	}})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}

	// The parser is reusable after Close.
	p := New().NewParser()
	out := p.Close(5, p.Feed(step{req, getReq, 0, 1}.chunk(), nil))
	out = p.Feed(step{req, getReq2, 0, 6}.chunk(), out)
	out = p.Feed(step{resp, nfResp, 0, 7}.chunk(), out)
	if len(out) != 2 || toTx(out[1]).Summary != "GET /b 404" {
		t.Errorf("after Close: %d transactions", len(out))
	}
	// Close stamps what it flushed with the close time, and only that.
	if out[0].CloseTS != 5 || out[1].CloseTS != 0 {
		t.Errorf("CloseTS = %d, %d; want 5, 0", out[0].CloseTS, out[1].CloseTS)
	}
}

func TestGarbage(t *testing.T) {
	rnd := rand.New(rand.NewSource(1))
	random := make([]byte, 4096)
	rnd.Read(random)
	random[0], random[2000] = 0xff, 0xff
	clientHello := "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + strings.Repeat("\x00", 32) + "\x00\x00\x20\xcc\xa8\xcc\xa9\xc0\x2f"
	for _, c := range []struct {
		name  string
		steps []step
	}{
		{"random", []step{{req, string(random[:2000]), 0, 1}, {resp, string(random[2000:]), 0, 2}}},
		{"random with gap", []step{{req, string(random[:100]), 5000, 1}, {req, string(random[100:200]), 0, 2}}},
		{"tls", []step{{req, clientHello, 0, 1}, {resp, "\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03", 0, 2}}},
		{"http/0.9", []step{{req, "GET /\r\n\r\n", 0, 1}}},
		{"no version", []step{{req, "GET / \r\nHost: x\r\n\r\n", 0, 1}}},
		{"bad version", []step{{req, "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 0, 1}}},
		{"lower case", []step{{req, "hello world\r\n\r\n", 0, 1}}},
		{"half line", []step{{req, "GET /x HTT", 0, 1}, {req, "X/1.1\r\n\r\n", 0, 2}}},
		{"control in target", []step{{req, "GET /\x01 HTTP/1.1\r\n\r\n", 0, 1}}},
		{"bad status", []step{{req, "HTTP/1.1 abc\r\n\r\n", 0, 1}, {resp, "HTTP/1.1 abc\r\n\r\n", 0, 1}}},
		{"short status", []step{{resp, "HTTP/1.1 20\r\n\r\n", 0, 1}}},
		{"orphan response", []step{{resp, okResp, 0, 1}}},
		{"json", []step{{req, `{"a": 1}` + "\n\n", 0, 1}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var total int64
			for _, s := range c.steps {
				total += int64(max(s.n, len(s.data)))
			}
			got, st := run(t, New(), c.steps, true)
			check(t, got, nil)
			if st.Garbage != total {
				t.Errorf("garbage = %d, want %d", st.Garbage, total)
			}
		})
	}
}

func TestGarbageThenResync(t *testing.T) {
	got, st := run(t, New(), []step{
		{req, "\x00\x01garbage", 0, 1}, {req, "more garbage", 0, 2},
		{req, getReq2, 0, 3}, {resp, nfResp, 0, 4},
	}, false)
	check(t, got, []tx{get2NF(3, 3, 4, 4)})
	if want := (protocols.ParserStats{Garbage: 21, Resyncs: 1}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestUnknownMethod(t *testing.T) {
	r := "PURGE /cache/item HTTP/1.1\r\nHost: cdn\r\n\r\n"
	got, _ := run(t, New(), []step{{req, r, 0, 1}, {resp, okResp, 0, 2}}, false)
	check(t, got, []tx{{
		Name: "HTTP", Summary: "PURGE /cache/item 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(r), RespBytes: n64(okResp), StatusCode: 200,
		Attrs: []string{"http.request.method=_OTHER", "http.request.method_original=PURGE", "url.path=/cache/item",
			"url.scheme=http", "http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=cdn", "http.response.body.size=5", sz("http.request.size", len(r)), sz("http.response.size", len(okResp))},
	}})
	// With the method known, it is reported as it is.
	got, _ = run(t, New(WithKnownMethods("PURGE")), []step{{req, r, 0, 1}, {resp, okResp, 0, 2}}, false)
	if len(got) != 1 || got[0].Name != "PURGE" || got[0].Attrs[0] != "http.request.method=PURGE" || got[0].Attrs[1] != "url.path=/cache/item" {
		t.Errorf("got %+v", got)
	}
}

func TestRedaction(t *testing.T) {
	r := "GET /s3/obj?AWSAccessKeyId=SECRET1&Signature=SECRET2&sig=SECRET3&X-Goog-Signature=SECRET4" +
		"&X-Amz-Signature=SECRET5&X-Amz-Credential=SECRET6&X-Amz-Security-Token=SECRET7&token=SECRET8" +
		"&SIG=keep&flag&empty= HTTP/1.1\r\n" +
		"Host: bucket.example\r\nAuthorization: Bearer SECRET9\r\nCookie: id=SECRET10\r\n" +
		"Proxy-Authorization: Basic SECRET11\r\nX-Api-Key: SECRET12\r\nUser-Agent: ua/1\r\n\r\n"
	rs := "HTTP/1.1 403 Forbidden\r\nSet-Cookie: id=SECRET13; HttpOnly\r\nWWW-Authenticate: SECRET14\r\nContent-Length: 2\r\n\r\nno"
	p := New(WithRedactedQueryParams("token")).NewParser()
	out := p.Feed(step{req, r, 0, 1}.chunk(), nil)
	out = p.Feed(step{resp, rs, 0, 2}.chunk(), out)
	if len(out) != 1 {
		t.Fatalf("got %d transactions", len(out))
	}
	q := "AWSAccessKeyId=REDACTED&Signature=REDACTED&sig=REDACTED&X-Goog-Signature=REDACTED" +
		"&X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED&token=REDACTED" +
		"&SIG=keep&flag&empty="
	check(t, []tx{toTx(out[0])}, []tx{{
		Name: "GET", Summary: "GET /s3/obj?" + q + " 403", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(r), RespBytes: n64(rs), StatusCode: 403, ErrorType: "403",
		Attrs: []string{"http.request.method=GET", "url.path=/s3/obj", "url.query=" + q, "url.scheme=http",
			"http.response.status_code=403", "network.protocol.name=http", "network.protocol.version=1.1",
			"user_agent.original=ua/1", "server.address=bucket.example",
			"http.response.body.size=2", sz("http.request.size", len(r)), sz("http.response.size", len(rs))},
	}})
	if dump := fmt.Sprintf("%#v %+v", *out[0], toTx(out[0])); strings.Contains(dump, "SECRET") {
		t.Errorf("a secret leaked: %s", dump)
	}
	// The same with the messages truncated and cut at every byte.
	a := New(WithRedactedQueryParams("token"))
	for i := 1; i < len(r); i++ {
		for _, gap := range []int{0, len(r)} {
			p := a.NewParser()
			out := p.Feed(step{req, r[:i], gap, 1}.chunk(), nil)
			out = p.Feed(step{req, r[i:], 0, 2}.chunk(), out)
			out = p.Feed(step{resp, rs[:min(i, len(rs))], gap, 3}.chunk(), out)
			out = p.Close(4, out)
			for _, x := range out {
				if dump := fmt.Sprintf("%#v %+v", *x, toTx(x)); strings.Contains(dump, "SECRET") {
					t.Fatalf("cut %d gap %d: a secret leaked: %s", i, gap, dump)
				}
			}
		}
	}
}

func TestAbsoluteForm(t *testing.T) {
	r := "GET http://user:SECRETPW@proxy.example:8080/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n"
	got, _ := run(t, New(), []step{{req, r, 0, 1}, {resp, okResp, 0, 2}}, false)
	check(t, got, []tx{{
		Name: "GET", Summary: "GET /p/q?x=1 200", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(r), RespBytes: n64(okResp), StatusCode: 200,
		Attrs: []string{"http.request.method=GET", "url.path=/p/q", "url.query=x=1", "url.scheme=http",
			"http.response.status_code=200", "network.protocol.name=http", "network.protocol.version=1.1",
			"server.address=proxy.example", "server.port=8080",
			"http.response.body.size=5", sz("http.request.size", len(r)), sz("http.response.size", len(okResp))},
	}})
	for _, c := range []struct{ target, path, query, host, port string }{
		{"HTTPS://[2001:db8::1]:8443", "/", "", "2001:db8::1", "8443"},
		{"http://h.example?a=b", "/", "a=b", "h.example", ""},
		{"http://h.example#frag", "/", "", "h.example", ""},
		{"http://h.example:99999/x", "/x", "", "h.example", ""},
		{"/frag?a=1#f", "/frag", "a=1", "", ""},
		{"/frag#f?a=1", "/frag", "", "", ""},
	} {
		r := "GET " + c.target + " HTTP/1.1\r\n\r\n"
		got, _ := run(t, New(), []step{{req, r, 0, 1}}, true)
		if len(got) != 1 {
			t.Fatalf("%s: %d transactions", c.target, len(got))
		}
		want := []string{"http.request.method=GET", "url.path=" + c.path}
		if c.query != "" {
			want = append(want, "url.query="+c.query)
		}
		if strings.HasPrefix(c.target, "HTTPS") {
			want = append(want, "url.scheme=https")
		} else {
			want = append(want, "url.scheme=http")
		}
		want = append(want, "network.protocol.name=http", "network.protocol.version=1.1")
		if c.host != "" {
			want = append(want, "server.address="+c.host)
		}
		if c.port != "" {
			want = append(want, "server.port="+c.port)
		}
		want = append(want, sz("http.request.size", len(r)))
		if !reflect.DeepEqual(got[0].Attrs, want) {
			t.Errorf("%s:\n got  %q\n want %q", c.target, got[0].Attrs, want)
		}
	}
}

func TestAsteriskAndHost(t *testing.T) {
	r := "OPTIONS * HTTP/1.1\r\nhOsT:  [::1]:8080 \r\nuser-AGENT:\tx y \r\n\r\n"
	got, _ := run(t, New(), []step{{req, r, 0, 1}, {resp, nfResp, 0, 2}}, false)
	check(t, got, []tx{{
		Name: "OPTIONS", Summary: "OPTIONS * 404", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(r), RespBytes: n64(nfResp), StatusCode: 404, ErrorType: "404",
		Attrs: []string{"http.request.method=OPTIONS", "url.path=*", "url.scheme=http", "http.response.status_code=404",
			"network.protocol.name=http", "network.protocol.version=1.1", "user_agent.original=x y",
			"server.address=::1", "server.port=8080", "http.response.body.size=0",
			sz("http.request.size", len(r)), sz("http.response.size", len(nfResp))},
	}})
}

func TestChunkedRequestAndServerError(t *testing.T) {
	r := "POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
	rs := "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"
	got, _ := run(t, New(), []step{{req, r, 0, 1}, {resp, rs, 0, 2}}, false)
	check(t, got, []tx{{
		Name: "POST", Summary: "POST /api 502", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(r), RespBytes: n64(rs), StatusCode: 502, ErrorType: "502", ServerFault: true,
		Attrs: []string{"http.request.method=POST", "url.path=/api", "url.scheme=http", "http.response.status_code=502",
			"network.protocol.name=http", "network.protocol.version=1.1",
			"http.request.body.size=3", "http.response.body.size=3",
			sz("http.request.size", len(r)), sz("http.response.size", len(rs))},
	}})
}

func TestBadContentLength(t *testing.T) {
	r := "POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
	got, st := run(t, New(), []step{{req, r, 0, 1}, {resp, nfResp, 0, 2}}, false)
	if len(got) != 1 || !got[0].Truncated || got[0].ReqBytes != n64(r) || got[0].StatusCode != 404 {
		t.Errorf("got %+v", got)
	}
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
	r = "POST /x HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc"
	got, _ = run(t, New(), []step{{req, r, 0, 1}, {resp, nfResp, 0, 2}}, false)
	if len(got) != 1 || got[0].Truncated || got[0].ReqBytes != n64(r) {
		t.Errorf("got %+v", got)
	}
}

func TestBoundedPending(t *testing.T) {
	p := New(WithMaxPending(4)).NewParser()
	var out []*protocols.Transaction
	for i := 0; i < 10; i++ {
		out = p.Feed(step{req, getReq2, 0, uint64(i + 1)}.chunk(), out)
	}
	if len(out) != 6 {
		t.Fatalf("evicted %d, want 6", len(out))
	}
	for _, x := range out {
		if !x.NoResponse || !x.Truncated || x.ErrorType != "" || x.ServerFault {
			t.Errorf("evicted: %+v", toTx(x))
		}
	}
	if pp := p.(*parser); pp.qn != 4 || len(pp.ring) > 4 {
		t.Errorf("pending %d, ring %d", pp.qn, len(pp.ring))
	}
	// The next response goes to the oldest request still held (ts 7).
	out = p.Feed(step{resp, nfResp, 0, 20}.chunk(), out[:0])
	if len(out) != 1 || out[0].ReqStart != 7 || out[0].StatusCode != 404 {
		t.Fatalf("got %d", len(out))
	}
	out = p.Close(30, out[:0])
	if len(out) != 3 || out[0].ErrorType != "no_response" {
		t.Fatalf("close: %d", len(out))
	}
}

func TestRespLostAtClose(t *testing.T) {
	// When the response direction had lost sync, requests left without
	// a response at the close are not counted as failures.
	got, _ := run(t, New(), []step{
		{req, getReq2, 0, 1}, {resp, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 0, 2},
		{req, getReq2, 0, 3},
	}, true)
	if len(got) != 2 || !got[0].Truncated || got[0].StatusCode != 200 ||
		!got[1].NoResponse || !got[1].Truncated || got[1].ErrorType != "" {
		t.Errorf("got %+v", got)
	}
}

func TestStrayCRLF(t *testing.T) {
	// Empty lines between messages are ignored (RFC 9112 2.2).
	got, st := run(t, New(), []step{
		{req, getReq2 + "\r\n", 0, 1}, {resp, nfResp, 0, 2}, {req, "\r\n" + getReq2, 0, 3}, {resp, nfResp, 0, 4},
	}, false)
	check(t, got, []tx{get2NF(1, 1, 2, 2), get2NF(3, 3, 4, 4)})
	if st != (protocols.ParserStats{}) {
		t.Errorf("stats = %+v", st)
	}
}

func TestPipelinedResponseInGap(t *testing.T) {
	// The second of three pipelined responses is all in the gap of the
	// chunk holding the first: it is paired with its request, truncated,
	// and the third resynchronises with the third request.
	got, st := run(t, New(), []step{
		{req, getReq + getReq2 + getReq, 0, 1},
		{resp, okResp, len(okResp) + len(nfResp), 2},
		{resp, okResp, 0, 3},
	}, false)
	check(t, got, []tx{getOK(1, 1, 2, 2), {
		Name: "GET", Summary: "GET /b -", ReqStart: 1, ReqEnd: 1, RespStart: 2, RespEnd: 2,
		ReqBytes: n64(getReq2), RespBytes: n64(nfResp), Truncated: true,
		Attrs: []string{"http.request.method=GET", "url.path=/b", "url.scheme=http",
			"network.protocol.name=http", "network.protocol.version=1.1", "server.address=example.com", "server.port=8080",
			sz("http.request.size", len(getReq2)), sz("http.response.size", len(nfResp))},
	}, getOK(1, 1, 3, 3)})
	if want := (protocols.ParserStats{Resyncs: 1}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestBadDirection(t *testing.T) {
	got, st := run(t, New(), []step{{protocols.Direction(2), getReq, 0, 1}, {req, "", 10, 2}}, true)
	check(t, got, nil)
	if want := (protocols.ParserStats{Garbage: n64(getReq) + 10}); st != want {
		t.Errorf("stats = %+v, want %+v", st, want)
	}
}

func TestChunkSizeForms(t *testing.T) {
	// Leading zeros, upper-case hex, bare LF line ends, whitespace before
	// an extension.
	rs := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" +
		"00000000000000000A\r\n0123456789\r\n1 ;a=b\n-\n0\n\n"
	got, st := run(t, New(), []step{{req, getReq2, 0, 1}, {resp, rs, 0, 2}, {req, getReq2, 0, 3}, {resp, nfResp, 0, 4}}, false)
	if len(got) != 2 || got[0].Truncated || got[0].RespBytes != n64(rs) ||
		got[0].Attrs[8] != "http.response.body.size=11" || st != (protocols.ParserStats{}) {
		t.Errorf("got %+v, stats %+v", got, st)
	}
	// A size too large for any body loses sync.
	rs = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\n"
	got, _ = run(t, New(), []step{{req, getReq2, 0, 1}, {resp, rs, 0, 2}}, false)
	if len(got) != 1 || !got[0].Truncated || got[0].RespBytes != n64(rs) {
		t.Errorf("got %+v", got)
	}
}

// TestLazyAttributes: the transaction carries its attributes in compact
// form (Lazy, no list) until read; AllAttrs and NumAttrs agree; url.scheme
// is replaced in place (TLS plaintext), another key makes the list first.
func TestLazyAttributes(t *testing.T) {
	p := New().NewParser()
	out := p.Feed(protocols.Chunk{Dir: protocols.Request, Data: []byte("GET /a?b=1 HTTP/1.1\r\nHost: x:8080\r\nUser-Agent: ua\r\n\r\n"), Len: 53, TS: 1}, nil)
	out = p.Feed(protocols.Chunk{Dir: protocols.Response, Data: []byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), Len: 40, TS: 2}, out)
	if len(out) != 1 {
		t.Fatalf("%d transactions", len(out))
	}
	x := out[0]
	if x.Attrs != nil || x.Lazy == nil {
		t.Fatalf("Attrs %v, Lazy %v: want the compact form only", x.Attrs, x.Lazy)
	}
	emit := func(a []attribute.KeyValue) string {
		var s []string
		for _, kv := range a {
			s = append(s, string(kv.Key)+"="+kv.Value.Emit())
		}
		return strings.Join(s, " ")
	}
	want := "http.request.method=GET url.path=/a url.query=b=1 url.scheme=http http.response.status_code=200 " +
		"network.protocol.name=http network.protocol.version=1.1 user_agent.original=ua server.address=x server.port=8080 " +
		"http.response.body.size=2 http.request.size=53 http.response.size=40"
	if got := emit(x.AllAttrs()); got != want || x.NumAttrs() != 13 {
		t.Errorf("attributes (%d):\n got  %s\n want %s", x.NumAttrs(), got, want)
	}
	// Appended after attributes already there.
	if got := x.AppendAttrs([]attribute.KeyValue{attribute.Int("a", 1)}); len(got) != 14 || got[0].Key != "a" || got[1].Key != "http.request.method" {
		t.Errorf("AppendAttrs: %s", emit(got))
	}
	if !x.ReplaceAttr(attribute.String("url.scheme", "https")) || x.Attrs != nil || x.Lazy == nil {
		t.Fatalf("url.scheme not replaced in place: Attrs %v", x.Attrs)
	}
	if got := emit(x.AllAttrs()); got != strings.Replace(want, "url.scheme=http", "url.scheme=https", 1) {
		t.Errorf("after ReplaceAttr: %s", got)
	}
	if !x.ReplaceAttr(attribute.String("server.address", "y")) || x.Lazy != nil || len(x.Attrs) != 13 {
		t.Fatalf("server.address: Lazy %v, Attrs %d", x.Lazy, len(x.Attrs))
	}
	if got := emit(x.AllAttrs()); got != strings.Replace(strings.Replace(want, "url.scheme=http", "url.scheme=https", 1), "server.address=x", "server.address=y", 1) {
		t.Errorf("after ReplaceAttr of server.address: %s", got)
	}
	if x.ReplaceAttr(attribute.String("no.such", "v")) || x.NumAttrs() != 13 {
		t.Errorf("a missing key was replaced or added")
	}
}
