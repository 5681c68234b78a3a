package sockets

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
)

// rawData is one data event as read from the ring, with its payload.
type rawData struct {
	ev      probes.DataEvent
	payload []byte
}

// rawEvents collects a tracer's kernel events (tests of the TLS sources).
type rawEvents struct {
	opens, closes map[uint64]*probes.ConnEvent
	data          []rawData
}

// readRaw reads the ring until done says so or timeout passes.
func readRaw(t *testing.T, tr *probes.Tracer, timeout time.Duration, done func(*rawEvents) bool) *rawEvents {
	t.Helper()
	rd, err := ringbuf.NewReader(tr.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	r := &rawEvents{opens: map[uint64]*probes.ConnEvent{}, closes: map[uint64]*probes.ConnEvent{}}
	deadline := time.Now().Add(timeout)
	for !done(r) && time.Now().Before(deadline) {
		rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
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
				r.opens[ev.Cookie] = ev
			} else {
				r.closes[ev.Cookie] = ev
			}
		case probes.EventData:
			var d rawData
			p, err := decodeData(rec.RawSample, &d.ev)
			if err != nil {
				t.Fatal(err)
			}
			d.payload = bytes.Clone(p)
			r.data = append(r.data, d)
		}
	}
	return r
}

// rawStream is what one process sent or received on one socket from one
// source, in order.
type rawStream struct {
	bytes   uint64 // true byte count
	payload []byte // the captured prefixes, concatenated
	events  int
	tgids   map[uint32]bool
	cgroups map[uint64]bool
	comms   map[string]bool
	tlsVers map[uint16]bool
	first   []byte // the first event's payload
}

type streamKey struct {
	cookie uint64
	source uint8
	dir    uint8
}

func (r *rawEvents) streams() map[streamKey]*rawStream {
	out := map[streamKey]*rawStream{}
	for _, d := range r.data {
		k := streamKey{d.ev.Cookie, d.ev.Source, d.ev.Dir}
		s := out[k]
		if s == nil {
			s = &rawStream{tgids: map[uint32]bool{}, cgroups: map[uint64]bool{}, comms: map[string]bool{}, tlsVers: map[uint16]bool{}}
			s.first = d.payload
			out[k] = s
		}
		s.bytes += uint64(d.ev.Len)
		s.payload = append(s.payload, d.payload...)
		s.events++
		s.tgids[d.ev.Tgid] = true
		s.cgroups[d.ev.CgroupId] = true
		s.comms[cstring(d.ev.Comm[:])] = true
		s.tlsVers[d.ev.TlsVersion] = true
	}
	return out
}

// cookieOf finds the connection whose local end is local.
func (r *rawEvents) cookieOf(local netip.AddrPort) (uint64, *probes.ConnEvent) {
	for c, o := range r.opens {
		l, _ := endpoints(o.Tuple.Family, &o.Tuple.Saddr, &o.Tuple.Daddr, o.Tuple.Sport, o.Tuple.Dport)
		if l == local {
			return c, o
		}
	}
	return 0, nil
}

// startTLSTracing opens the socket tracer for the cgroups and starts TLS
// tracing on it.
func startTLSTracing(t *testing.T, o probes.TLSOptions, cgroups ...uint64) (*probes.Tracer, *probes.TLSTracer) {
	t.Helper()
	tr, err := probes.Open(probes.Options{Mode: AttachModeUnderTest(t), FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	for _, id := range cgroups {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	tt, err := tr.StartTLS(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tt.Close() })
	return tr, tt
}

// isTLSRecords reports whether b starts with a TLS record header
// (handshake, change cipher spec, alert or application data, TLS 1.x).
func isTLSRecords(b []byte) bool {
	return len(b) >= 5 && b[0] >= 0x14 && b[0] <= 0x17 && b[1] == 3 && b[2] <= 4
}

// pids of nginx workers: the children of the master.
func childPIDs(t *testing.T, pid int) []uint32 {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for _, f := range strings.Fields(string(raw)) {
		n, _ := strconv.Atoi(f)
		out = append(out, uint32(n))
	}
	return out
}

// TestOpenSSLKernelEvents: curl (OpenSSL 3, its own BIO) fetches a file
// over HTTPS from nginx (OpenSSL 3, a socket BIO) between two network
// namespaces. The OpenSSL uprobes report, on each side's socket cookie and
// with its process and cgroup, exactly the request curl wrote and the
// response nginx wrote, with the true byte counts and TLS 1.3; the same
// sockets' own events carry only TLS records.
func TestOpenSSLKernelEvents(t *testing.T) {
	p := testbed.NewTLSPair(t)
	testbed.RequireTool(t, "curl")
	body := strings.Repeat("tls!", 1500) // 6000 bytes
	p.WriteFile(t, "f.txt", []byte(body))
	tr, tt := startTLSTracing(t, probes.TLSOptions{}, p.ClientCG.ID(), p.ServerCG.ID())

	// nginx ran before the tracer: its libssl was found at start.
	var sawNginx bool
	for _, a := range tt.Attached() {
		if a.Impl == "openssl" && strings.HasSuffix(a.Path, "/libssl.so.3") {
			sawNginx = true
		}
	}
	if !sawNginx {
		t.Fatalf("libssl.so.3 not attached at start: %+v", tt.Attached())
	}

	// curl runs through the exec wrapper, probed before it starts.
	self, args := testbed.ProbedArgs(t, "curl", "-sS", "--cacert", p.Cert.CertFile,
		"-A", "clovisor-test", "-H", "X-Test: abc", "-o", "/dev/null", "-w", "%{local_port}", p.URL("/f.txt"))
	cmd, start := p.ClientCommand(context.Background(), self, args...)
	var out strings.Builder
	cmd.Stdout = &out
	if err := testbed.ProbedStart(t, cmd, start, ProbedIn(t, tt, SystemLibssl), SystemLibssl)(); err != nil {
		t.Fatal(err)
	}
	curlPID := uint32(cmd.Process.Pid)
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	localPort, err := strconv.Atoi(out.String())
	if err != nil {
		t.Fatalf("curl printed %q", out.String())
	}
	clientEnd := netip.AddrPortFrom(p.ClientIP, uint16(localPort))
	serverEnd := netip.AddrPortFrom(p.ServerIP, p.Port)

	r := readRaw(t, tr, 5*time.Second, func(r *rawEvents) bool { return len(r.closes) >= 2 })
	cc, co := r.cookieOf(clientEnd)
	var sc uint64
	var so *probes.ConnEvent
	for c, o := range r.opens {
		l, rem := endpoints(o.Tuple.Family, &o.Tuple.Saddr, &o.Tuple.Daddr, o.Tuple.Sport, o.Tuple.Dport)
		if l == serverEnd && rem == clientEnd {
			sc, so = c, o
		}
	}
	if co == nil || so == nil {
		t.Fatalf("no open events for %s (%v) and %s (%v)", clientEnd, co != nil, serverEnd, so != nil)
	}
	workers := childPIDs(t, p.Nginx.Cmd.Process.Pid)
	if len(workers) != 1 || so.Tgid != workers[0] {
		t.Fatalf("nginx workers %v, server socket accepted by %d", workers, so.Tgid)
	}
	nginxPID := workers[0]

	request := fmt.Sprintf("GET /f.txt HTTP/1.1\r\nHost: %s\r\nUser-Agent: clovisor-test\r\nAccept: */*\r\nX-Test: abc\r\n\r\n", serverEnd)
	streams := r.streams()
	check := func(what string, k streamKey, tgid uint32, cg uint64, comm string) *rawStream {
		t.Helper()
		s := streams[k]
		if s == nil {
			t.Errorf("%s: no events (cookie %d, source %d, dir %d)", what, k.cookie, k.source, k.dir)
			return &rawStream{}
		}
		if len(s.tgids) != 1 || !s.tgids[tgid] || len(s.cgroups) != 1 || !s.cgroups[cg] || len(s.comms) != 1 || !s.comms[comm] {
			t.Errorf("%s: processes %v cgroups %v comms %v, want %d in %d (%s)", what, s.tgids, s.cgroups, s.comms, tgid, cg, comm)
		}
		return s
	}
	ssl, sock := probes.SourceOpenSSL, probes.SourceSocket
	cSend := check("curl SSL_write", streamKey{cc, ssl, probes.DirSend}, curlPID, p.ClientCG.ID(), "curl")
	cRecv := check("curl SSL_read", streamKey{cc, ssl, probes.DirRecv}, curlPID, p.ClientCG.ID(), "curl")
	sRecv := check("nginx SSL_read", streamKey{sc, ssl, probes.DirRecv}, nginxPID, p.ServerCG.ID(), "nginx")
	sSend := check("nginx SSL_write", streamKey{sc, ssl, probes.DirSend}, nginxPID, p.ServerCG.ID(), "nginx")

	if string(cSend.payload) != request || cSend.bytes != uint64(len(request)) {
		t.Errorf("curl wrote %d bytes %q, want %q", cSend.bytes, cSend.payload, request)
	}
	if string(sRecv.payload) != request || sRecv.bytes != uint64(len(request)) {
		t.Errorf("nginx read %d bytes %q, want %q", sRecv.bytes, sRecv.payload, request)
	}
	// The response: headers, then the file.
	resp := string(sSend.payload)
	head, got, ok := strings.Cut(resp, "\r\n\r\n")
	if !ok || !strings.HasPrefix(head, "HTTP/1.1 200 OK\r\n") || !strings.Contains(head, "\r\nContent-Length: 6000") || got != body[:len(got)] {
		t.Errorf("nginx wrote %q...", resp[:min(len(resp), 300)])
	}
	if want := uint64(len(head) + 4 + len(body)); sSend.bytes != want || cRecv.bytes != want {
		t.Errorf("response of %d bytes: nginx wrote %d, curl read %d", want, sSend.bytes, cRecv.bytes)
	}
	if !bytes.HasPrefix(cRecv.payload, []byte(head)) {
		t.Errorf("curl read %q...", cRecv.payload[:min(len(cRecv.payload), 200)])
	}
	for what, s := range map[string]*rawStream{"curl send": cSend, "curl recv": cRecv, "nginx send": sSend, "nginx recv": sRecv} {
		if len(s.tlsVers) != 1 || !s.tlsVers[0x0304] {
			t.Errorf("%s: TLS versions %v, want 0x0304", what, s.tlsVers)
		}
	}
	// The sockets themselves carried TLS records, never the HTTP text.
	for _, k := range []streamKey{{cc, sock, probes.DirSend}, {cc, sock, probes.DirRecv}, {sc, sock, probes.DirSend}, {sc, sock, probes.DirRecv}} {
		s := streams[k]
		if s == nil || !isTLSRecords(s.first) || bytes.Contains(s.payload, []byte("HTTP/1.1")) || bytes.Contains(s.payload, []byte("tls!tls!")) {
			t.Errorf("socket rawStream %+v is not TLS records: %+v", k, s)
		}
	}
	if s := streams[streamKey{cc, sock, probes.DirSend}]; s != nil && s.first[0] != 0x16 {
		t.Errorf("curl's first bytes on the socket are not a TLS handshake record: % x", s.first[:5])
	}
	// Once a socket's plaintext came from OpenSSL, its own calls (TLS
	// records after the handshake) are no longer reported: in ring order,
	// no socket event of either end follows its first OpenSSL event. Each
	// end has such calls (curl receives the session tickets and the
	// response, nginx sends the response), which the kernel counted.
	for what, cookie := range map[string]uint64{"curl": cc, "nginx": sc} {
		firstPlain := -1
		for i, d := range r.data {
			if d.ev.Cookie != cookie {
				continue
			}
			if d.ev.Source == ssl && firstPlain < 0 {
				firstPlain = i
			}
			if d.ev.Source == sock && firstPlain >= 0 {
				t.Errorf("%s: a socket event of %d bytes (dir %d) after the first OpenSSL event", what, d.ev.Len, d.ev.Dir)
			}
		}
	}
	ks, err := tr.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if ks.CipherSkipped < 2 {
		t.Errorf("kernel counters %+v: want at least 2 socket calls skipped as ciphertext", ks)
	}
	st, err := tt.Stats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("OpenSSL counters: %+v; kernel %+v", st.OpenSSL, ks)
	// nginx: a socket BIO (its descriptor); curl: its own BIO (the socket
	// of its I/O during the call, or remembered from an earlier call).
	if st.OpenSSL.ByDescriptor < 2 || st.OpenSSL.ByIO < 2 || st.OpenSSL.Unbound != 0 || st.OpenSSL.BadLayout != 0 {
		t.Errorf("OpenSSL counters %+v", st.OpenSSL)
	}
}

// TestOpenSSLNestedCallsOnce: a program whose SSL_write_ex calls SSL_write
// and whose SSL_read_ex calls SSL_read several times (as some OpenSSL
// versions and forks nest their entry points) is reported once per
// application call, with the outer call's byte count: two sends (8 and 5
// bytes) and one 13-byte receive, bound by the thread's I/O (the SSL
// object's layout is unknown) to the program's socket.
func TestOpenSSLNestedCallsOnce(t *testing.T) {
	testbed.RequireRoot(t)
	clang := testbed.RequireTool(t, "clang-14")
	bin := filepath.Join(t.TempDir(), "nested_ssl")
	if out, err := exec.Command(clang, "-O1", "-o", bin, "testdata/nested_ssl.c").CombinedOutput(); err != nil {
		t.Fatalf("building: %v\n%s", err, out)
	}
	cg := testbed.NewCgroup(t, "nested")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 13)
		if _, err := io.ReadFull(c, buf); err == nil {
			for i := 0; i < 13; i += 3 { // the echo in pieces
				c.Write(buf[i:min(i+3, 13)])
				time.Sleep(2 * time.Millisecond)
			}
		}
	}()
	tr, tt := startTLSTracing(t, probes.TLSOptions{}, cg.ID())
	// The program waits for nothing: the exec wrapper makes sure it is
	// probed before it runs.
	self, args := testbed.ProbedArgs(t, bin, "127.0.0.1", fmt.Sprint(ln.Addr().(*net.TCPAddr).Port))
	cmd := exec.Command(self, args...)
	var out strings.Builder
	cmd.Stdout = &out
	if err := testbed.ProbedStart(t, cmd, func() error { return cg.Start(cmd) }, ProbedIn(t, tt, bin), bin)(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil || out.String() != "hello-explain\n" {
		t.Fatalf("nested_ssl: %v %q", err, out.String())
	}
	pid := uint32(cmd.Process.Pid)
	r := readRaw(t, tr, 3*time.Second, func(r *rawEvents) bool {
		n := 0
		for _, d := range r.data {
			if d.ev.Source == probes.SourceOpenSSL && d.ev.Tgid == pid {
				n++
			}
		}
		return n >= 3 && len(r.closes) >= 1
	})
	var got []string
	cookies := map[uint64]bool{}
	for _, d := range r.data {
		if d.ev.Source != probes.SourceOpenSSL || d.ev.Tgid != pid {
			continue
		}
		got = append(got, fmt.Sprintf("%d:%d:%s", d.ev.Dir, d.ev.Len, d.payload))
		cookies[d.ev.Cookie] = true
		if d.ev.TlsVersion != 0 || d.ev.CgroupId != cg.ID() {
			t.Errorf("event with TLS version %#x, cgroup %d", d.ev.TlsVersion, d.ev.CgroupId)
		}
	}
	want := []string{
		fmt.Sprintf("%d:8:hello-ex", probes.DirSend),
		fmt.Sprintf("%d:5:plain", probes.DirSend),
		fmt.Sprintf("%d:13:hello-explain", probes.DirRecv),
	}
	if !slices.Equal(got, want) {
		t.Errorf("OpenSSL events %q, want %q", got, want)
	}
	var sockCookie uint64
	for c, o := range r.opens {
		if o.Tgid == pid {
			sockCookie = c
		}
	}
	if len(cookies) != 1 || !cookies[sockCookie] || sockCookie == 0 {
		t.Errorf("events on sockets %v, the program's connection is %d", cookies, sockCookie)
	}
	st, err := tt.Stats()
	if err != nil {
		t.Fatal(err)
	}
	// One nested SSL_write, and at least four nested SSL_reads (13 bytes,
	// at most 4 per call).
	if st.OpenSSL.Nested < 5 || st.OpenSSL.ByIO < 3 {
		t.Errorf("OpenSSL counters %+v", st.OpenSSL)
	}
}
