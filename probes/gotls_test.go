package probes

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/link"

	"github.com/clovisor/clovisor/internal/ring"
	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes/internal/gotlsdemo"
)

// record is one ring-buffer record, decoded.
type record struct {
	conn    *ConnEvent
	data    *DataEvent // header only
	payload []byte
}

// goTLSTrace is the socket tracer with the Go crypto/tls prober attached
// to one binary, and a reader collecting its records.
type goTLSTrace struct {
	tr     *Tracer
	prober tlsProber
	links  []link.Link
	stop   func()
	done   chan error
	mu     sync.Mutex
	recs   []record
	closed bool
}

// testMode is the attach mode the kernel matrix asks for
// (CLOVISOR_TEST_MODE), tracepoint by default.
func testMode() string {
	if m := os.Getenv("CLOVISOR_TEST_MODE"); m != "" {
		return m
	}
	return ModeTracepoint
}

// openTLSFile opens path as the uprobe manager would.
func openTLSFile(t testing.TB, path string) *tlsFile {
	t.Helper()
	ef, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ef.Close() })
	exe, err := link.OpenExecutable(path)
	if err != nil {
		t.Fatal(err)
	}
	return &tlsFile{Path: path, Name: path, ELF: ef, Exe: exe}
}

// newGoTLSProberFor opens the tracer and the Go prober (closed when the
// test ends).
func newGoTLSProberFor(t testing.TB, o Options) (*Tracer, tlsProber) {
	t.Helper()
	testbed.RequireRoot(t)
	if o.Mode == "" {
		o.Mode = testMode()
	}
	tr, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newGoTLSProber(tr)
	if err != nil {
		tr.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Close()
		tr.Close()
	})
	return tr, p
}

func traceGoTLS(t *testing.T, bin string, o Options, cgroups ...uint64) *goTLSTrace {
	t.Helper()
	o.FilterCgroups = true
	tr, p := newGoTLSProberFor(t, o)
	for _, id := range cgroups {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	links, err := attachFile(p, openTLSFile(t, bin))
	if err != nil {
		t.Fatalf("attach %s: %v", bin, err)
	}
	t.Logf("go_tls prober: uprobe_multi=%v, %d links", p.(*goTLSProber).multi, len(links))
	ctx, cancel := context.WithCancel(context.Background())
	g := &goTLSTrace{tr: tr, prober: p, links: links, stop: cancel, done: make(chan error, 1)}
	go func() { g.done <- ring.Read(ctx, tr.Events, g.handle, nil) }()
	t.Cleanup(func() { g.close(t) })
	return g
}

func (g *goTLSTrace) handle(raw []byte) {
	var r record
	switch raw[0] {
	case EventConnOpen, EventConnClose:
		if len(raw) < int(unsafe.Sizeof(ConnEvent{})) {
			panic("short conn event")
		}
		ev := *(*ConnEvent)(unsafe.Pointer(&raw[0]))
		r.conn = &ev
	case EventData:
		hdr := int(unsafe.Offsetof(DataEvent{}.Data))
		ev := new(DataEvent)
		copy((*[1 << 16]byte)(unsafe.Pointer(ev))[:hdr], raw)
		if int(ev.Cap) > len(raw)-hdr {
			panic("short data event")
		}
		r.data = ev
		r.payload = bytes.Clone(raw[hdr : hdr+int(ev.Cap)])
	default:
		return
	}
	g.mu.Lock()
	g.recs = append(g.recs, r)
	g.mu.Unlock()
}

// records returns what has been read so far.
func (g *goTLSTrace) records() []record {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.recs)
}

// waitFor waits until cond holds for the records read (or 10 s pass).
func (g *goTLSTrace) waitFor(t *testing.T, what string, cond func([]record) bool) []record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		recs := g.records()
		if cond(recs) {
			return recs
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not there after 10 s (%d records)", what, len(recs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// close detaches the uprobes, reads what the kernel has written, and
// closes the prober and the tracer.
func (g *goTLSTrace) close(t *testing.T) {
	if g.closed {
		return
	}
	g.closed = true
	var errs []error
	for _, l := range g.links {
		errs = append(errs, l.Close())
	}
	g.stop()
	errs = append(errs, <-g.done)
	if g.prober != nil {
		errs = append(errs, g.prober.Close())
	}
	errs = append(errs, g.tr.Close())
	if err := errors.Join(errs...); err != nil {
		t.Errorf("closing: %v", err)
	}
}

// connRecs is what the records say about one socket.
type connRecs struct {
	open, close  *ConnEvent
	plain, sock  [3][]*record // by direction (DirSend, DirRecv)
	plainStreams [3][]byte
	plainOrder   []*record // both directions, in the ring's order
	// sockAfterPlain counts socket events that came after the first
	// plaintext event in the ring's order, and before the connection's
	// close event (a send on a connection already reset, as the server's
	// close_notify once the client has gone, follows its close).
	sockAfterPlain int
}

func byCookie(recs []record) map[uint64]*connRecs {
	out := map[uint64]*connRecs{}
	get := func(c uint64) *connRecs {
		if out[c] == nil {
			out[c] = &connRecs{}
		}
		return out[c]
	}
	for i := range recs {
		r := &recs[i]
		switch {
		case r.conn != nil && r.conn.Kind == EventConnOpen:
			get(r.conn.Cookie).open = r.conn
		case r.conn != nil:
			get(r.conn.Cookie).close = r.conn
		case r.data.Source == SourceGoTLS:
			c := get(r.data.Cookie)
			c.plain[r.data.Dir] = append(c.plain[r.data.Dir], r)
			c.plainStreams[r.data.Dir] = append(c.plainStreams[r.data.Dir], r.payload...)
			c.plainOrder = append(c.plainOrder, r)
		case r.data.Source == SourceSocket:
			c := get(r.data.Cookie)
			c.sock[r.data.Dir] = append(c.sock[r.data.Dir], r)
			if len(c.plainOrder) > 0 && c.close == nil {
				c.sockAfterPlain++
			}
		}
	}
	return out
}

// goTLSVariants are the builds traced: the machine's Go and an older
// release, plain and stripped, and a stripped position-independent one.
var goTLSVariants = []gotlsdemo.Variant{
	{},
	{Stripped: true},
	{Go: gotlsdemo.OldGo},
	{Go: gotlsdemo.OldGo, Stripped: true},
	{Stripped: true, PIE: true},
}

// helloBody is what the demo server's /hello answers.
var helloBody = strings.Repeat("0123456789", 123) + "\n"

// TestGoTLSEvents runs the Go HTTPS client against the Go HTTPS server
// (two pods) for each build and checks the raw events: the plaintext of
// both ends comes as SOURCE_GO_TLS data events of the right sockets (the
// cookies, tuples, processes and cgroups of the socket tracer's own
// events for those connections, whose payload is TLS records), with TLS
// version 0x0304, and reassembles to exactly the requests and responses
// the programs exchanged.
func TestGoTLSEvents(t *testing.T) {
	for _, v := range goTLSVariants {
		t.Run(v.String(), func(t *testing.T) {
			bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), v)
			p := gotlsdemo.NewPair(t)
			srv := p.StartServer(t, bin)
			g := traceGoTLS(t, bin, Options{PayloadBytes: MaxPayload}, p.ClientCG.ID(), p.ServerCG.ID())
			out, clientPID := p.RunClient(t, bin, "client", p.URL(""))
			if want := "GET /hello 200 1231\nPOST /echo 200 3000\nGET /nope 404 19\nGET /hello 200 1231\n"; out != want {
				t.Fatalf("client printed\n%s\nwant\n%s", out, want)
			}
			// Both ends' sockets close once the client has exited.
			recs := g.waitFor(t, "both ends closed", func(recs []record) bool {
				closes := 0
				for _, c := range byCookie(recs) {
					if c.close != nil && len(c.plain[DirSend]) > 0 {
						closes++
					}
				}
				return closes == 2
			})
			checkGoTLSConns(t, byCookie(recs), clientPID, uint32(srv.Process.Pid), p)
			ks, err := g.tr.Stats()
			if err != nil || ks.DataLost != 0 || ks.PayloadFaults != 0 {
				t.Errorf("kernel stats %+v, %v", ks, err)
			}
		})
	}
}

func checkGoTLSConns(t *testing.T, conns map[uint64]*connRecs, clientPID, serverPID uint32, p *gotlsdemo.Pair) {
	t.Helper()
	var client, server *connRecs
	for cookie, c := range conns {
		if len(c.plain[DirSend])+len(c.plain[DirRecv]) == 0 {
			continue
		}
		if c.open == nil {
			t.Fatalf("socket %#x: plaintext events, but no open event", cookie)
		}
		switch c.open.Role {
		case RoleClient:
			if client != nil {
				t.Fatalf("plaintext on two client sockets")
			}
			client = c
		case RoleServer:
			if server != nil {
				t.Fatalf("plaintext on two server sockets")
			}
			server = c
		}
	}
	if client == nil || server == nil {
		t.Fatalf("plaintext of the client: %v, of the server: %v", client != nil, server != nil)
	}
	for _, end := range []struct {
		name   string
		c      *connRecs
		pid    uint32
		cgroup uint64
		local  netip.Addr
	}{
		{"client", client, clientPID, p.ClientCG.ID(), gotlsdemo.ClientAddr.Addr()},
		{"server", server, serverPID, p.ServerCG.ID(), gotlsdemo.ServerAddr.Addr()},
	} {
		o := end.c.open
		if o.Tgid != end.pid || o.CgroupId != end.cgroup || string(bytes.TrimRight(o.Comm[:], "\x00")) != "prog" {
			t.Errorf("%s open: tgid %d cgroup %d comm %q, want %d in %d", end.name, o.Tgid, o.CgroupId, o.Comm, end.pid, end.cgroup)
		}
		if netip.AddrFrom4([4]byte(o.Tuple.Saddr[:4])) != end.local || o.Tuple.Family != 2 ||
			(end.name == "client" && o.Tuple.Dport != gotlsdemo.Port) || (end.name == "server" && o.Tuple.Sport != gotlsdemo.Port) {
			t.Errorf("%s open: tuple %+v", end.name, o.Tuple)
		}
		// Once the plaintext comes from crypto/tls, the socket's own
		// calls (TLS records) are not reported: the socket events are
		// the handshake's, before the first plaintext.
		if end.c.sockAfterPlain != 0 {
			t.Errorf("%s: %d socket events after the first plaintext event", end.name, end.c.sockAfterPlain)
		}
		for dir := DirSend; dir <= DirRecv; dir++ {
			var plain, cipher uint64
			for _, r := range end.c.plain[dir] {
				d := r.data
				if d.Tuple != o.Tuple || d.Tgid != end.pid || d.CgroupId != end.cgroup || d.Cookie != o.Cookie || d.Seq != 0 {
					t.Errorf("%s: plaintext event of tgid %d cgroup %d tuple %+v seq %d", end.name, d.Tgid, d.CgroupId, d.Tuple, d.Seq)
				}
				if d.TlsVersion != 0x0304 || d.Cap != d.Len || d.Len == 0 {
					t.Errorf("%s: plaintext event: TLS version %#x, %d of %d bytes", end.name, d.TlsVersion, d.Cap, d.Len)
				}
				plain += uint64(d.Len)
			}
			if len(end.c.sock[dir]) == 0 {
				t.Errorf("%s: no socket events in direction %d", end.name, dir)
			}
			for i, r := range end.c.sock[dir] {
				d := r.data
				// A send after the connection was reset (the server's
				// close_notify once the client has gone) finds the
				// socket's local port already released: the socket
				// tracer reports port 0 then.
				tupleOK := d.Tuple == o.Tuple || (d.Tuple.Sport == 0 && i == len(end.c.sock[dir])-1)
				if !tupleOK || d.Tgid != end.pid || d.CgroupId != end.cgroup {
					t.Errorf("%s: socket event of tgid %d cgroup %d tuple %+v dir %d len %d", end.name, d.Tgid, d.CgroupId, d.Tuple, d.Dir, d.Len)
				}
				// TLS records, starting with a handshake record (type
				// 22, version 3.x); never the plaintext.
				if (i == 0 && !bytes.HasPrefix(r.payload, []byte{22, 3})) || bytes.Contains(r.payload, []byte("HTTP/1.1")) {
					t.Errorf("%s: socket payload %d is not TLS: % x", end.name, i, r.payload[:min(len(r.payload), 16)])
				}
				cipher += uint64(d.Len)
			}
			if cipher == 0 || plain == 0 {
				t.Errorf("%s: %d bytes of plaintext, %d of handshake on the socket", end.name, plain, cipher)
			}
		}
	}
	// Each end received what the other sent, byte for byte.
	requests, responses := client.plainStreams[DirSend], server.plainStreams[DirSend]
	if !bytes.Equal(requests, server.plainStreams[DirRecv]) || !bytes.Equal(responses, client.plainStreams[DirRecv]) {
		t.Errorf("streams differ: client sent %d bytes, server received %d; server sent %d, client received %d",
			len(requests), len(server.plainStreams[DirRecv]), len(responses), len(client.plainStreams[DirRecv]))
	}
	// The streams are exactly the four exchanges.
	wants := []struct {
		line, body   string
		status, resp string
	}{
		{"GET /hello HTTP/1.1", "", "HTTP/1.1 200 OK", helloBody},
		{"POST /echo HTTP/1.1", strings.Repeat("p", 3000), "HTTP/1.1 200 OK", strings.Repeat("p", 3000)},
		{"GET /nope HTTP/1.1", "", "HTTP/1.1 404 Not Found", "404 page not found\n"},
		{"GET /hello HTTP/1.1", "", "HTTP/1.1 200 OK", helloBody},
	}
	reqCount, respCount := &countReader{r: bytes.NewReader(requests)}, &countReader{r: bytes.NewReader(responses)}
	reqs, resps := bufio.NewReader(reqCount), bufio.NewReader(respCount)
	var reqEnds, respEnds []uint64 // stream offsets where each message ends
	for i, w := range wants {
		if line, err := reqs.Peek(len(w.line) + 2); err != nil || string(line) != w.line+"\r\n" {
			t.Fatalf("request %d starts %q (%v), want %q", i, line, err, w.line)
		}
		req, err := http.ReadRequest(reqs)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, err := io.ReadAll(req.Body)
		if err != nil || string(body) != w.body {
			t.Errorf("request %d: body of %d bytes (%v), want %d", i, len(body), err, len(w.body))
		}
		if line, err := resps.Peek(len(w.status) + 2); err != nil || string(line) != w.status+"\r\n" {
			t.Fatalf("response %d starts %q (%v), want %q", i, line, err, w.status)
		}
		resp, err := http.ReadResponse(resps, req)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		body, err = io.ReadAll(resp.Body)
		if err != nil || string(body) != w.resp {
			t.Errorf("response %d: body of %d bytes (%v), want %d", i, len(body), err, len(w.resp))
		}
		reqEnds = append(reqEnds, reqCount.n-uint64(reqs.Buffered()))
		respEnds = append(respEnds, respCount.n-uint64(resps.Buffered()))
	}
	// At each end the events come in the order of cause and effect: a
	// response starts after its request is complete, the next request
	// after the response (the tracker pairs them in this order).
	for _, end := range []struct {
		name       string
		c          *connRecs
		reqDir     uint8
		reqs, resp []uint64
	}{{"client", client, DirSend, reqEnds, respEnds}, {"server", server, DirRecv, reqEnds, respEnds}} {
		var reqSeen, respSeen uint64
		for _, r := range end.c.plainOrder {
			if r.data.Dir == end.reqDir {
				// A request's first byte: the previous response is done.
				if k := slices.Index(end.reqs, reqSeen); reqSeen > 0 && k >= 0 && respSeen < end.resp[k] {
					t.Errorf("%s: request %d began after %d response bytes, response %d ends at %d", end.name, k+1, respSeen, k, end.resp[k])
				}
				reqSeen += uint64(r.data.Len)
				continue
			}
			// A response's first byte: its request is complete.
			k := 0
			if respSeen > 0 {
				k = slices.Index(end.resp, respSeen) + 1
			}
			if k >= 0 && (respSeen == 0 || k > 0) && k < len(end.reqs) && reqSeen < end.reqs[k] {
				t.Errorf("%s: response %d began after %d request bytes, request %d ends at %d", end.name, k, reqSeen, k, end.reqs[k])
			}
			respSeen += uint64(r.data.Len)
		}
	}
	if reqs.Buffered() != 0 || resps.Buffered() != 0 {
		t.Errorf("%d request and %d response bytes after the four exchanges", reqs.Buffered(), resps.Buffered())
	}
}

// TestGoTLSNotMine: files without Go crypto/tls are not the prober's:
// ELF programs and libraries of other languages, and a Go program
// without TLS; a damaged Go binary is an error that names the file and
// what is wrong, and nothing is attached.
func TestGoTLSNotMine(t *testing.T) {
	_, p := newGoTLSProberFor(t, Options{})
	noTLS := gotlsdemo.Build(t, gotlsdemo.NoTLSSource, gotlsdemo.Variant{Stripped: true})
	libc, _ := filepath.Glob("/lib/x86_64-linux-gnu/libc.so.6")
	for _, path := range append([]string{"/bin/true", noTLS}, libc...) {
		links, err := attachFile(p, openTLSFile(t, path))
		if !errors.Is(err, errNotMine) || len(links) != 0 {
			t.Errorf("%s: %d links, %v; want errNotMine", path, len(links), err)
		}
	}

	// The demo with its symbol table's header damaged, on disk.
	good := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	data, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	ef, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	data[ef.Section(".gopclntab").Offset] ^= 0xff
	bad := filepath.Join(t.TempDir(), "damaged")
	if err := os.WriteFile(bad, data, 0o755); err != nil {
		t.Fatal(err)
	}
	links, err := attachFile(p, openTLSFile(t, bad))
	if err == nil || errors.Is(err, errNotMine) || len(links) != 0 ||
		!strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), "header magic") {
		t.Errorf("damaged binary: %d links, %v", len(links), err)
	}
	t.Logf("damaged binary: %v", err)
}

// TestGoTLSProgramUnchanged: the traced program behaves exactly as the
// untraced one: the same bytes of a large download (SHA-256 of each of
// several 4 MB downloads over one connection) untraced, traced, and when
// the tracer is closed in the middle of the connection; the server keeps
// running throughout. While traced, both ends' plaintext byte counts agree.
func TestGoTLSProgramUnchanged(t *testing.T) {
	bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	p := gotlsdemo.NewPair(t)
	srv := p.StartServer(t, bin)
	const size, count = 4 << 20, 6
	h := sha256.Sum256(bigBody(size))
	want := strings.Repeat(fmt.Sprintf("200 %d %x\n", size, h), count)
	url := p.URL(fmt.Sprintf("/big?n=%d", size))

	untraced, _ := p.RunClient(t, bin, "download", url, fmt.Sprint(count))
	if untraced != want {
		t.Fatalf("untraced download:\n%s\nwant\n%s", untraced, want)
	}

	g := traceGoTLS(t, bin, Options{PayloadBytes: 64}, p.ClientCG.ID(), p.ServerCG.ID())
	traced, _ := p.RunClient(t, bin, "download", url, fmt.Sprint(count))
	if traced != untraced {
		t.Errorf("traced download:\n%s\nuntraced:\n%s", traced, untraced)
	}
	recs := g.waitFor(t, "the whole download", func(recs []record) bool {
		var n uint64
		for _, c := range byCookie(recs) {
			for _, r := range c.plain[DirRecv] {
				if r.data.CgroupId == p.ClientCG.ID() {
					n += uint64(r.data.Len)
				}
			}
		}
		return n >= size*count
	})
	var got [2]uint64 // server sent, client received
	for _, c := range byCookie(recs) {
		for _, r := range c.plain[DirSend] {
			if r.data.CgroupId == p.ServerCG.ID() {
				got[0] += uint64(r.data.Len)
			}
		}
		for _, r := range c.plain[DirRecv] {
			if r.data.CgroupId == p.ClientCG.ID() {
				got[1] += uint64(r.data.Len)
			}
		}
	}
	if got[0] != got[1] || got[1] < size*count || got[1] > size*count+count*1024 {
		t.Errorf("server sent %d plaintext bytes, client received %d (bodies: %d)", got[0], got[1], size*count)
	}
	ks, err := g.tr.Stats()
	if err != nil || ks.DataLost != 0 {
		t.Errorf("kernel stats %+v, %v", ks, err)
	}
	g.close(t)

	// Closed while the client is in the middle of its downloads.
	g = traceGoTLS(t, bin, Options{PayloadBytes: 64}, p.ClientCG.ID(), p.ServerCG.ID())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := p.Client(ctx, bin, "download", url, fmt.Sprint(count))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.ClientCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() {
		t.Fatalf("client printed nothing: %v", sc.Err())
	}
	fmt.Fprintln(&out, sc.Text())
	g.waitFor(t, "plaintext of the second download", func(recs []record) bool {
		for _, c := range byCookie(recs) {
			if len(c.plain[DirRecv]) > 0 && c.open != nil && c.open.Role == RoleClient {
				var n uint64
				for _, r := range c.plain[DirRecv] {
					n += uint64(r.data.Len)
				}
				return n > size+size/4
			}
		}
		return false
	})
	g.close(t)
	for sc.Scan() {
		fmt.Fprintln(&out, sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("client: %v", err)
	}
	if out.String() != untraced {
		t.Errorf("download with the tracer closed midway:\n%s\nuntraced:\n%s", out.String(), untraced)
	}
	if err := srv.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("server: %v", err)
	}
	if again, _ := p.RunClient(t, bin, "client", p.URL("")); !strings.HasPrefix(again, "GET /hello 200 1231\n") {
		t.Errorf("server after the tracer closed: %q", again)
	}
}

// bigBody is the demo server's /big body (program/main.go).
func bigBody(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// countReader counts the bytes read through it.
type countReader struct {
	r io.Reader
	n uint64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += uint64(n)
	return n, err
}

// TestGoTLSWriteWithHandshake: a client that writes on a new tls.Conn
// without a handshake first (crypto/tls does the handshake inside that
// Write): the request is reported at the Write's return, complete and
// with the TLS version, and the answer read after it.
func TestGoTLSWriteWithHandshake(t *testing.T) {
	bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	p := gotlsdemo.NewPair(t)
	p.StartServer(t, bin)
	g := traceGoTLS(t, bin, Options{PayloadBytes: MaxPayload}, p.ClientCG.ID(), p.ServerCG.ID())
	req := "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
	out, clientPID := p.RunClient(t, bin, "raw", netip.AddrPortFrom(gotlsdemo.ServerAddr.Addr(), gotlsdemo.Port).String(), req)
	recs := g.waitFor(t, "the client's plaintext", func(recs []record) bool {
		for _, c := range byCookie(recs) {
			if c.open != nil && c.open.Tgid == clientPID && c.close != nil {
				return true
			}
		}
		return false
	})
	for _, c := range byCookie(recs) {
		if c.open == nil || c.open.Tgid != clientPID {
			continue
		}
		if len(c.plainOrder) == 0 || c.plainOrder[0].data.Dir != DirSend || string(c.plainStreams[DirSend]) != req {
			t.Fatalf("client sent %q", c.plainStreams[DirSend])
		}
		for _, r := range c.plainOrder {
			if r.data.TlsVersion != 0x0304 {
				t.Errorf("event of %d bytes: TLS version %#x", r.data.Len, r.data.TlsVersion)
			}
		}
		resp := string(c.plainStreams[DirRecv])
		if fmt.Sprint(len(resp)) != strings.TrimSpace(out) || !strings.HasPrefix(resp, "HTTP/1.1 200 OK\r\n") || !strings.HasSuffix(resp, "\r\n\r\n"+helloBody) {
			t.Errorf("client received %d bytes (it says %s): %q", len(resp), out, resp)
		}
		return
	}
	t.Fatal("no events of the client's connection")
}

// TestGoTLSThroughManager: the agent's way. The Go server runs before TLS
// tracing starts; StartTLS finds its executable through the process's
// memory maps and the Go prober attaches to it, in the server's process
// (the tracer filters by cgroup: probes per process); the client, started
// later from the same file through the exec wrapper, is probed in its own
// process before it runs; both ends' plaintext arrives as in
// TestGoTLSEvents. Close detaches.
func TestGoTLSThroughManager(t *testing.T) {
	bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{Go: gotlsdemo.OldGo, Stripped: true})
	p := gotlsdemo.NewPair(t)
	srv := p.StartServer(t, bin)
	tr, err := Open(Options{Mode: testMode(), FilterCgroups: true, PayloadBytes: MaxPayload})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{p.ClientCG.ID(), p.ServerCG.ID()} {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := &goTLSTrace{tr: tr, stop: cancel, done: make(chan error, 1)}
	go func() { g.done <- ring.Read(ctx, tr.Events, g.handle, nil) }()
	t.Cleanup(func() { g.close(t) })
	tt, err := tr.StartTLS(context.Background(), TLSOptions{Rescan: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer tt.Close()
	var goTLS []TLSAttachment
	for _, a := range tt.Attached() {
		if a.Impl == "go_tls" {
			goTLS = append(goTLS, a)
		}
	}
	if len(goTLS) != 1 || goTLS[0].Path != bin || goTLS[0].PID != srv.Process.Pid || goTLS[0].Probes == 0 || goTLS[0].AllProcesses {
		t.Fatalf("go_tls attachments %+v, want one for %s in pid %d", goTLS, bin, srv.Process.Pid)
	}
	ctx, cancelClient := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancelClient()
	self, args := testbed.ProbedArgs(t, bin, "client", p.Cert, p.URL(""))
	client := p.ClientNS.Command(ctx, self, args...)
	client.Stderr = os.Stderr
	var stdout bytes.Buffer
	client.Stdout = &stdout
	probed := func(pid int) bool {
		for _, a := range tt.Active() {
			if a.Impl == "go_tls" && a.PID == pid && a.Path == bin {
				return true
			}
		}
		return false
	}
	if err := testbed.ProbedStart(t, client, func() error { return p.ClientCG.Start(client) }, probed, bin)(); err != nil {
		t.Fatal(err)
	}
	if err := client.Wait(); err != nil {
		t.Fatalf("client: %v\n%s", err, stdout.String())
	}
	out, clientPID := stdout.String(), uint32(client.Process.Pid)
	if want := "GET /hello 200 1231\nPOST /echo 200 3000\nGET /nope 404 19\nGET /hello 200 1231\n"; out != want {
		t.Fatalf("client printed %q", out)
	}
	recs := g.waitFor(t, "both ends closed", func(recs []record) bool {
		closes := 0
		for _, c := range byCookie(recs) {
			if c.close != nil && len(c.plain[DirSend]) > 0 {
				closes++
			}
		}
		return closes == 2
	})
	checkGoTLSConns(t, byCookie(recs), clientPID, uint32(srv.Process.Pid), p)
	// (The exec wrapper, a Go program with crypto/tls too, was probed as
	// well.)
	var pids []int
	for _, a := range tt.Attached() {
		if a.Impl == "go_tls" && a.Path == bin {
			pids = append(pids, a.PID)
		}
	}
	if len(pids) != 2 || pids[0] != srv.Process.Pid || pids[1] != int(clientPID) {
		t.Errorf("go_tls attachments of %s in processes %v, want %d (server) and %d (client): %+v", bin, pids, srv.Process.Pid, clientPID, tt.Attached())
	}
	start := time.Now()
	if err := tt.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("TLS tracing closed in %v", time.Since(start))
}

func countGoTLS(as []TLSAttachment) int {
	n := 0
	for _, a := range as {
		if a.Impl == "go_tls" {
			n++
		}
	}
	return n
}

// TestGoTLSPayloadBytesLive checks that SetPayloadBytes reaches the Go
// crypto/tls uprobe object: loaded at 64 bytes, every plaintext event of
// the client's exchange has cap min(len, 64) and one event has cap 64;
// after SetPayloadBytes(300), the next exchange's events have cap
// min(len, 300) and one has cap 300. A Go TLS object loaded after the
// change starts with 300 too.
func TestGoTLSPayloadBytesLive(t *testing.T) {
	bin := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{})
	p := gotlsdemo.NewPair(t)
	p.StartServer(t, bin)
	g := traceGoTLS(t, bin, Options{PayloadBytes: 64}, p.ClientCG.ID(), p.ServerCG.ID())
	const want = "GET /hello 200 1231\nPOST /echo 200 3000\nGET /nope 404 19\nGET /hello 200 1231\n"
	// exchange runs the client and checks the plaintext events of its
	// connection (those after the first skip records).
	exchange := func(skip, wantCap int) int {
		t.Helper()
		out, clientPID := p.RunClient(t, bin, "client", p.URL(""))
		if out != want {
			t.Fatalf("client printed\n%s\nwant\n%s", out, want)
		}
		// The client's plaintext: 3000 bytes of POST body sent, 1231 bytes
		// of a response body received.
		recs := g.waitFor(t, "the client's plaintext", func(recs []record) bool {
			var sent, recvd uint64
			for _, r := range recs[min(skip, len(recs)):] {
				if r.data != nil && r.data.Source == SourceGoTLS && r.data.Tgid == clientPID {
					if r.data.Dir == DirSend {
						sent += uint64(r.data.Len)
					} else {
						recvd += uint64(r.data.Len)
					}
				}
			}
			return sent >= 3000 && recvd >= 1231*2
		})
		full := 0
		for _, r := range recs[skip:] {
			if r.data == nil || r.data.Source != SourceGoTLS || r.data.Tgid != clientPID {
				continue
			}
			if c := int(min(r.data.Len, uint32(wantCap))); int(r.data.Cap) != c || len(r.payload) != c {
				t.Errorf("plaintext event of %d bytes: cap %d (%d payload bytes), want %d", r.data.Len, r.data.Cap, len(r.payload), c)
			}
			if int(r.data.Cap) == wantCap {
				full++
			}
		}
		if full == 0 {
			t.Errorf("no plaintext event with cap %d", wantCap)
		}
		return len(recs)
	}
	n := exchange(0, 64)
	if err := g.tr.SetPayloadBytes(300); err != nil {
		t.Fatal(err)
	}
	exchange(n, 300)

	later, err := newGoTLSProber(g.tr)
	if err != nil {
		t.Fatal(err)
	}
	defer later.Close()
	var v uint32
	if err := later.(*goTLSProber).objs.PayloadCap.Get(&v); err != nil || v != 300 {
		t.Fatalf("payload_cap of a Go TLS object loaded after SetPayloadBytes(300): %d, %v", v, err)
	}
}
