package http1

import (
	"testing"

	"github.com/clovisor/clovisor/protocols"
)

// A typical small keep-alive exchange: an 80-byte request, a 150-byte
// response with a 20-byte body.
const (
	benchReq  = "GET /api/v1/items?id=42 HTTP/1.1\r\nHost: svc.local:8080\r\nUser-Agent: bench/1.0\r\n\r\n"
	benchResp = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: bench\r\nContent-Length: 20\r\n\r\n{\"id\":42,\"ok\":true}\n"
)

func BenchmarkKeepAliveGET(b *testing.B) {
	p := New().NewParser()
	rq := protocols.Chunk{Dir: protocols.Request, Data: []byte(benchReq), Len: len(benchReq)}
	rs := protocols.Chunk{Dir: protocols.Response, Data: []byte(benchResp), Len: len(benchResp)}
	out := make([]*protocols.Transaction, 0, 1)
	b.SetBytes(int64(len(benchReq) + len(benchResp)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		rq.TS = uint64(2 * i)
		rs.TS = uint64(2*i + 1)
		out = p.Feed(rq, out[:0])
		out = p.Feed(rs, out)
		if len(out) != 1 {
			b.Fatalf("got %d transactions", len(out))
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
}

func BenchmarkChunkedResponse(b *testing.B) {
	// A response of 16 chunks of 256 bytes, sent in 4 writes that split
	// chunks and chunk-size lines.
	resp := "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
	data := make([]byte, 256)
	for i := range data {
		data[i] = 'a' + byte(i%26)
	}
	for i := 0; i < 16; i++ {
		resp += "100\r\n" + string(data) + "\r\n"
	}
	resp += "0\r\n\r\n"
	var chunks []protocols.Chunk
	for i, q := 0, len(resp)/4+1; i < len(resp); i += q {
		d := []byte(resp[i:min(i+q, len(resp))])
		chunks = append(chunks, protocols.Chunk{Dir: protocols.Response, Data: d, Len: len(d)})
	}
	p := New().NewParser()
	rq := protocols.Chunk{Dir: protocols.Request, Data: []byte(benchReq), Len: len(benchReq)}
	out := make([]*protocols.Transaction, 0, 1)
	b.SetBytes(int64(len(benchReq) + len(resp)))
	b.ReportAllocs()
	for b.Loop() {
		out = p.Feed(rq, out[:0])
		for _, c := range chunks {
			out = p.Feed(c, out)
		}
		if len(out) != 1 || out[0].RespBytes != int64(len(resp)) {
			b.Fatalf("got %d transactions", len(out))
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
}

func BenchmarkDetect(b *testing.B) {
	a := New()
	data := []byte(benchReq)
	for b.Loop() {
		if !a.Detect(protocols.Request, data) {
			b.Fatal("not detected")
		}
	}
}
