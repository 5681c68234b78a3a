package sockets_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/sockets"
	"github.com/clovisor/clovisor/spans"
)

// startTLS starts TLS tracing on the collector's tracer (closed before it).
func (c *collector) startTLS(t *testing.T, o probes.TLSOptions) *probes.TLSTracer {
	t.Helper()
	tt, err := c.tracer.StartTLS(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tt.Close(); err != nil {
			t.Errorf("closing TLS tracing: %v", err)
		}
	})
	return tt
}

// checkTLSSession checks one session of an HTTPS exchange seen through
// OpenSSL: kind, process, cgroup, addresses, method, path, status, body
// size, plaintext source and TLS version.
func checkTLSSession(t *testing.T, s *spans.Session, kind spans.Kind, comm string, pid int, cg uint64,
	server netip.AddrPort, client netip.Addr, path string, status int, bodySize int64, tlsVersion string) {
	t.Helper()
	if s.Kind != kind || s.Process.Comm != comm || (pid != 0 && int(s.Process.PID) != pid) || s.CgroupID != cg {
		t.Errorf("%s session: kind %d process %+v cgroup %d, want kind %d %s[%d] in %d", comm, s.Kind, s.Process, s.CgroupID, kind, comm, pid, cg)
	}
	if s.Server != server || s.Client.Addr() != client {
		t.Errorf("%s session: %s -> %s, want %s:* -> %s", comm, s.Client, s.Server, client, server)
	}
	tx := s.Tx
	if m := attr(tx, "http.request.method").AsString(); m != "GET" {
		t.Errorf("%s session: method %q", comm, m)
	}
	if p := attr(tx, "url.path").AsString(); p != path {
		t.Errorf("%s session: url.path %q, want %q", comm, p, path)
	}
	if tx.StatusCode != status || tx.Truncated || tx.NoResponse {
		t.Errorf("%s session: status %d truncated %v no response %v, want %d", comm, tx.StatusCode, tx.Truncated, tx.NoResponse, status)
	}
	if n := attr(tx, "http.response.body.size").AsInt64(); n != bodySize {
		t.Errorf("%s session: http.response.body.size %d, want %d", comm, n, bodySize)
	}
	if sch := attr(tx, "url.scheme").AsString(); kind == spans.Server && sch != "https" {
		t.Errorf("%s session: url.scheme %q, want https", comm, sch)
	}
	if s.PayloadSource != "openssl" {
		t.Errorf("%s session: payload source %q, want openssl", comm, s.PayloadSource)
	}
	if s.TLS == nil || s.TLS.Version != tlsVersion {
		t.Errorf("%s session: TLS %+v, want version %s", comm, s.TLS, tlsVersion)
	}
}

// TestOpenSSLSpansCurlNginx: curl fetches a file from nginx over HTTPS,
// once with TLS 1.3 and once with TLS 1.2: each exchange gives exactly
// one CLIENT span (curl) and one SERVER span (nginx) with the method,
// path, status and body size, clovisor.payload.source=openssl and the
// negotiated TLS version.
func TestOpenSSLSpansCurlNginx(t *testing.T) {
	p := testbed.NewTLSPair(t)
	testbed.RequireTool(t, "curl")
	p.WriteFile(t, "f.txt", []byte(strings.Repeat("s", 7000)))
	c := startTracer(t, 0, p.ClientCG.ID(), p.ServerCG.ID())
	c.startTLS(t, probes.TLSOptions{})
	server := netip.AddrPortFrom(p.ServerIP, p.Port)
	for i, v := range []struct{ flag, name string }{{"--tlsv1.3", "1.3"}, {"--tls-max", "1.2"}} {
		args := []string{"-sS", "--cacert", p.Cert.CertFile, "-o", "/dev/null", "-w", "%{http_code} %{size_download}", v.flag}
		if v.name == "1.2" {
			args = append(args, "1.2")
		}
		out := p.Client(t, nil, "curl", append(args, p.URL("/f.txt?try="+v.name))...)
		if out != "200 7000" {
			t.Fatalf("curl: %q", out)
		}
		got := c.wait(t, 2*(i+1))[2*i:]
		if len(got) != 2 {
			t.Fatalf("TLS %s: %d sessions, want 2: %s", v.name, len(got), describe(got))
		}
		for _, s := range got {
			if s.Kind == spans.Client {
				checkTLSSession(t, s, spans.Client, "curl", 0, p.ClientCG.ID(), server, p.ClientIP, "/f.txt", 200, 7000, v.name)
			} else {
				checkTLSSession(t, s, spans.Server, "nginx", 0, p.ServerCG.ID(), server, p.ClientIP, "/f.txt", 200, 7000, v.name)
			}
		}
		if byKind(got, spans.Client)[0].Process.PID == byKind(got, spans.Server)[0].Process.PID {
			t.Errorf("one process for both ends: %s", describe(got))
		}
	}
}

// pythonTLS is a Python program that serves HTTPS (server mode) or fetches
// a URL over HTTPS (client mode), through Python's ssl module (OpenSSL).
// The client checks that libssl is not mapped before `import ssl`, so that
// the library reaches the process by dlopen (the _ssl extension) only.
const pythonTLS = `
import sys
mode = sys.argv[1]
if mode == "client":
    maps = open("/proc/self/maps").read()
    if "libssl" in maps:
        print("libssl mapped before import ssl", file=sys.stderr)
        sys.exit(3)
import ssl, http.client, http.server
if mode == "server":
    addr, port, cert, key = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = b"py" * 1500
            self.send_response(201)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer((addr, port), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("ready", flush=True)
    srv.serve_forever()
else:
    host, port, cafile, path = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection(host, port, context=ctx)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    print(r.status, len(body))
`

// fourFuncs: the four functions are probed, entry and return: two
// uprobe_multi links (Linux 6.6+) or eight uprobes.
func fourFuncs(a probes.TLSAttachment) bool { return a.Probes == 2 || a.Probes == 8 }

// freshLibssl copies the machine's libssl.so.3 and libcrypto.so.3 into a
// folder of the test: files no process has mapped yet, so that TLS
// tracing must find them when a process loads them.
func freshLibssl(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"libssl.so.3", "libcrypto.so.3"} {
		src := filepath.Join("/usr/lib/x86_64-linux-gnu", name)
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatalf("libssl3 (Debian) is needed: %v", err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestOpenSSLPythonDlopen: a Python HTTPS server and a Python HTTPS client
// (ssl module), both started after the tracer. The client loads a copy of
// libssl that no process had mapped, by dlopen at `import ssl`: the
// manager attaches to it, named by the client's pid, before the client's
// first request, and both ends give spans with the plaintext's method,
// path and status.
func TestOpenSSLPythonDlopen(t *testing.T) {
	p := testbed.NewTLSPair(t)
	python := "/usr/bin/python3"
	if _, err := os.Stat(python); err != nil {
		python = testbed.RequireTool(t, "python3")
	}
	script := filepath.Join(t.TempDir(), "tls.py")
	if err := os.WriteFile(script, []byte(pythonTLS), 0o644); err != nil {
		t.Fatal(err)
	}
	lib := freshLibssl(t)
	c := startTracer(t, 0, p.ClientCG.ID(), p.ServerCG.ID())
	attached := make(chan probes.TLSAttachment, 16)
	tt := c.startTLS(t, probes.TLSOptions{OnAttach: func(a probes.TLSAttachment) { attached <- a }})

	const port = 9443
	ctx, cancel := context.WithCancel(context.Background())
	srv := p.ServerNS.Command(ctx, python, script, "server", p.ServerIP.String(), fmt.Sprint(port), p.Cert.CertFile, p.Cert.KeyFile)
	stdout, _ := srv.StdoutPipe()
	srv.Stderr = os.Stderr
	if err := p.ServerCG.Start(srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); srv.Wait() })
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
		io.Copy(io.Discard, stdout)
	}()
	select {
	case line := <-ready:
		if line != "ready\n" {
			t.Fatalf("python server: %q", line)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("python server not ready after 10 s")
	}
	// The server mapped the system's libssl at `import ssl`, perhaps the
	// first process to map it since the tracer started: its probes must be
	// in place before the client connects (a process's first SSL calls
	// made before then are not traced; see docs/benchmarks.md).
	deadline := time.Now().Add(10 * time.Second)
	for !systemLibsslAttached(tt.Attached(), lib) {
		if time.Now().After(deadline) {
			t.Fatalf("the python server's libssl was not attached within 10 s: %+v", tt.Attached())
		}
		time.Sleep(10 * time.Millisecond)
	}

	cmd, start := p.ClientCommand(context.Background(), python, script, "client", p.ServerIP.String(), fmt.Sprint(port), p.Cert.CertFile, "/py/path?q=1")
	cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+lib)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := start(); err != nil {
		t.Fatal(err)
	}
	clientPID := cmd.Process.Pid
	if err := cmd.Wait(); err != nil {
		t.Fatalf("python client: %v: %s", err, errb.String())
	}
	if out.String() != "201 3000\n" {
		t.Fatalf("python client printed %q", out.String())
	}
	// The copy was found in the client, which mapped it by dlopen.
	var found bool
	for _, a := range tt.Attached() {
		if a.Path == filepath.Join(lib, "libssl.so.3") {
			found = true
			if a.PID != clientPID || a.Impl != "openssl" || !fourFuncs(a) {
				t.Errorf("copy attached as %+v, want revealed by the client %d, openssl, SSL_read/write(_ex)", a, clientPID)
			}
		}
	}
	if !found {
		t.Errorf("the copy %s/libssl.so.3 was not attached: %+v", lib, tt.Attached())
	}
	got := c.wait(t, 2)
	if len(got) != 2 {
		t.Fatalf("%d sessions, want 2: %s", len(got), describe(got))
	}
	server := netip.AddrPortFrom(p.ServerIP, port)
	for _, s := range got {
		if s.Kind == spans.Client {
			checkTLSSession(t, s, spans.Client, "python3", clientPID, p.ClientCG.ID(), server, p.ClientIP, "/py/path", 201, 3000, "1.3")
		} else {
			checkTLSSession(t, s, spans.Server, "python3", srv.Process.Pid, p.ServerCG.ID(), server, p.ClientIP, "/py/path", 201, 3000, "1.3")
		}
	}
}

// TestOpenSSLStaticExec: a program with OpenSSL linked in statically
// (no libssl to map, no version banner: the SSL layout is unknown), run
// after the tracer started. The exec watch finds the executable itself and
// attaches to its SSL functions within the 300 ms the program waits
// before it connects; the plaintext is bound to the socket by
// the thread's I/O during each call, and both ends give their spans (the
// client's without a TLS version: it is read from the SSL object only
// where its layout is known).
func TestOpenSSLStaticExec(t *testing.T) {
	p := testbed.NewTLSPair(t)
	clang := testbed.RequireTool(t, "clang-14")
	if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/libssl.a"); err != nil {
		testbed.RequireTool(t, "libssl.a (libssl-dev)")
	}
	bin := filepath.Join(t.TempDir(), "ssl_client")
	if out, err := exec.Command(clang, "-O1", "-static", "-o", bin, "testdata/ssl_client.c", "-lssl", "-lcrypto", "-lpthread").CombinedOutput(); err != nil {
		t.Fatalf("building the static client: %v\n%s", err, out)
	}
	p.WriteFile(t, "s.txt", []byte(strings.Repeat("x", 2345)))
	c := startTracer(t, 0, p.ClientCG.ID(), p.ServerCG.ID())
	var mu sync.Mutex
	var attachedAt time.Time
	tt := c.startTLS(t, probes.TLSOptions{OnAttach: func(a probes.TLSAttachment) {
		if a.Path == bin {
			mu.Lock()
			attachedAt = time.Now()
			mu.Unlock()
		}
	}})
	started := time.Now()
	out := p.Client(t, nil, bin, p.ServerIP.String(), fmt.Sprint(p.Port), p.Cert.CertFile, "/s.txt", "300")
	mu.Lock()
	t.Logf("attached %v after the exec", attachedAt.Sub(started))
	mu.Unlock()
	var found bool
	for _, a := range tt.Attached() {
		if a.Path == bin {
			found = a.Impl == "openssl" && fourFuncs(a)
		}
	}
	if !found {
		t.Fatalf("the static client was not attached: %+v", tt.Attached())
	}
	got := c.wait(t, 2)
	if len(got) != 2 {
		t.Fatalf("%d sessions, want 2: %s", len(got), describe(got))
	}
	head := strings.TrimSpace(out)
	server := netip.AddrPortFrom(p.ServerIP, p.Port)
	for _, s := range got {
		// The response: nginx's headers and the 2345 bytes.
		if want := fmt.Sprint(s.Tx.RespBytes); want != head {
			t.Errorf("%d: response of %d bytes, the client read %s", s.Kind, s.Tx.RespBytes, head)
		}
		if s.Kind == spans.Client {
			// Unknown layout: the client's side does not know the version.
			checkTLSSession(t, s, spans.Client, "ssl_client", 0, p.ClientCG.ID(), server, p.ClientIP, "/s.txt", 200, 2345, "")
		} else {
			checkTLSSession(t, s, spans.Server, "nginx", 0, p.ServerCG.ID(), server, p.ClientIP, "/s.txt", 200, 2345, "1.3")
		}
	}
}

// TestOpenSSLSidecar: a plaintext application (curl) talks HTTP to a
// local TLS-originating proxy (nginx, proxy_pass https://) on 127.0.0.1,
// which forwards to the TLS server in the other namespace. The
// application's hop gives L7 spans from the socket's own bytes (no TLS);
// the proxy's outbound hop is TLS on the socket (the handshake read in the
// clear names the cipher) and its L7 spans come from the OpenSSL uprobes
// of both nginx processes.
func TestOpenSSLSidecar(t *testing.T) {
	p := testbed.NewTLSPair(t)
	testbed.RequireTool(t, "curl")
	p.WriteFile(t, "side.txt", []byte(strings.Repeat("c", 4321)))
	const proxyPort = 18080
	p.StartTLSProxy(t, proxyPort)
	c := startTracer(t, 0, p.ClientCG.ID(), p.ServerCG.ID())
	c.startTLS(t, probes.TLSOptions{})
	out := p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
		fmt.Sprintf("http://127.0.0.1:%d/up/side.txt", proxyPort))
	if out != "200 4321" {
		t.Fatalf("curl through the proxy: %q", out)
	}
	got := c.wait(t, 4)
	if len(got) != 4 {
		t.Fatalf("%d sessions, want 4: %s", len(got), describe(got))
	}
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), proxyPort)
	server := netip.AddrPortFrom(p.ServerIP, p.Port)
	var app, tlsHop int
	for _, s := range got {
		switch s.Server {
		case local: // curl -> proxy, plaintext on the socket
			app++
			wantComm := map[spans.Kind]string{spans.Client: "curl", spans.Server: "nginx"}[s.Kind]
			if s.Process.Comm != wantComm || s.CgroupID != p.ClientCG.ID() || s.PayloadSource != "socket" || s.TLS != nil {
				t.Errorf("application hop: %s", describe([]*spans.Session{s}))
			}
			if path := attr(s.Tx, "url.path").AsString(); path != "/up/side.txt" || s.Tx.StatusCode != 200 {
				t.Errorf("application hop: path %q status %d", path, s.Tx.StatusCode)
			}
			if n := attr(s.Tx, "http.response.body.size").AsInt64(); n != 4321 {
				t.Errorf("application hop: body %d bytes", n)
			}
		case server: // proxy -> server, TLS on the socket
			tlsHop++
			cg := map[spans.Kind]uint64{spans.Client: p.ClientCG.ID(), spans.Server: p.ServerCG.ID()}[s.Kind]
			// nginx 1.22 originates TLS 1.2 unless told otherwise.
			checkTLSSession(t, s, s.Kind, "nginx", 0, cg, server, p.ClientIP, "/side.txt", 200, 4321, "1.2")
			if s.TLS == nil || s.TLS.Cipher == "" || s.TLS.ServerName != "server" {
				t.Errorf("TLS hop: cipher and SNI not read from the handshake on the socket: %+v", s.TLS)
			}
		default:
			t.Errorf("unexpected session %s", describe([]*spans.Session{s}))
		}
	}
	if app != 2 || tlsHop != 2 {
		t.Errorf("%d application-hop and %d TLS-hop sessions, want 2 and 2: %s", app, tlsHop, describe(got))
	}
}

// TestOpenSSLStopMidTransfer: TLS tracing and the socket tracer stop while
// curl is downloading a file over HTTPS from nginx (8 MiB rate-limited to
// 4 MiB/s): the transfer completes and the file arrives intact.
func TestOpenSSLStopMidTransfer(t *testing.T) {
	p := testbed.NewTLSPair(t)
	testbed.RequireTool(t, "curl")
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>11)
	}
	p.WriteFile(t, "big.bin", data)
	tr, err := probes.Open(probes.Options{Mode: sockets.AttachModeUnderTest(t), FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for _, id := range []uint64{p.ClientCG.ID(), p.ServerCG.ID()} {
		if err := tr.AddCgroup(id); err != nil {
			t.Fatal(err)
		}
	}
	tt, err := tr.StartTLS(context.Background(), probes.TLSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "big.bin")
	cmd, start := p.ClientCommand(context.Background(), "curl", "-sS", "--cacert", p.Cert.CertFile, "--limit-rate", "4M",
		"-o", dst, "-w", "%{http_code} %{size_download}", p.URL("/big.bin"))
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	st, err := tt.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if err := tt.Close(); err != nil {
		t.Error(err)
	}
	if err := tr.Close(); err != nil {
		t.Error(err)
	}
	stopped := time.Now()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("curl: %v: %s", err, errb.String())
	}
	t.Logf("tracing stopped after %d SSL calls, %v before the transfer ended", st.OpenSSL.Calls, time.Since(stopped))
	if st.OpenSSL.Calls == 0 || time.Since(stopped) < 100*time.Millisecond {
		t.Errorf("tracing did not stop in the middle of a traced transfer (%d calls, %v)", st.OpenSSL.Calls, time.Since(stopped))
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if out.String() != fmt.Sprintf("200 %d", len(data)) || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Errorf("curl: %q, %d bytes, sha256 equal: %v", out.String(), len(got), sha256.Sum256(got) == sha256.Sum256(data))
	}
}

// TestOpenSSL11Client: OpenSSL 1.1.1's s_client (libssl.so.1.1, found when
// a first program of that library starts after the tracer) sends an HTTP
// request to nginx (OpenSSL 3) over TLS 1.3: the client's side gives a
// CLIENT span with the path and status, bound by the SSL object's
// descriptor (the 1.1.1 layout), and nginx its SERVER span.
func TestOpenSSL11Client(t *testing.T) {
	p := testbed.NewTLSPair(t)
	bin, libDir := testbed.OpenSSL11(t)
	p.WriteFile(t, "old.txt", []byte(strings.Repeat("o", 1111)))
	c := startTracer(t, 0, p.ClientCG.ID(), p.ServerCG.ID())
	tt := c.startTLS(t, probes.TLSOptions{})
	env := []string{"LD_LIBRARY_PATH=" + libDir}
	// A first program of the library reveals it: openssl's interactive
	// prompt, which runs until its input ends. (A new library is probed
	// some tens of ms after a process maps it: see docs/benchmarks.md.)
	prompt, startPrompt := p.ClientCommand(context.Background(), bin)
	prompt.Env = append(os.Environ(), env...)
	stdin, err := prompt.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := startPrompt(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); prompt.Wait() }()
	lib := filepath.Join(libDir, "libssl.so.1.1")
	deadline := time.Now().Add(5 * time.Second)
	for !slices.ContainsFunc(tt.Attached(), func(a probes.TLSAttachment) bool {
		return a.Path == lib && fourFuncs(a) && a.PID == prompt.Process.Pid
	}) {
		if time.Now().After(deadline) {
			t.Fatalf("%s not attached: %+v", lib, tt.Attached())
		}
		time.Sleep(10 * time.Millisecond)
	}
	before, _ := tt.Stats()
	server := netip.AddrPortFrom(p.ServerIP, p.Port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := p.ClientNS.Command(ctx, bin, "s_client", "-connect", server.String(), "-CAfile", p.Cert.CertFile, "-quiet")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(fmt.Sprintf("GET /old.txt HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", server))
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := p.ClientCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("s_client: %v\n%s", err, errb.String())
	}
	if !strings.HasPrefix(out.String(), "HTTP/1.1 200 OK\r\n") || !strings.HasSuffix(out.String(), strings.Repeat("o", 1111)) {
		t.Fatalf("s_client printed %q", out.String())
	}
	got := c.wait(t, 2)
	if len(got) != 2 {
		t.Fatalf("%d sessions, want 2: %s", len(got), describe(got))
	}
	for _, s := range got {
		if s.Kind == spans.Client {
			checkTLSSession(t, s, spans.Client, "openssl", cmd.Process.Pid, p.ClientCG.ID(), server, p.ClientIP, "/old.txt", 200, 1111, "1.3")
		} else {
			checkTLSSession(t, s, spans.Server, "nginx", 0, p.ServerCG.ID(), server, p.ClientIP, "/old.txt", 200, 1111, "1.3")
		}
	}
	after, _ := tt.Stats()
	// s_client's SSL objects use socket BIOs: found by their descriptor,
	// as nginx's; none through the thread's I/O.
	if d := after.OpenSSL.ByDescriptor - before.OpenSSL.ByDescriptor; d < 4 || after.OpenSSL.ByIO != before.OpenSSL.ByIO || after.OpenSSL.BadLayout != 0 {
		t.Errorf("OpenSSL counters %+v -> %+v", before.OpenSSL, after.OpenSSL)
	}
}

// systemLibsslAttached: some libssl.so.3 other than the copy in dir is
// probed.
func systemLibsslAttached(list []probes.TLSAttachment, dir string) bool {
	for _, a := range list {
		if filepath.Base(a.Path) == "libssl.so.3" && filepath.Dir(a.Path) != dir {
			return true
		}
	}
	return false
}
