package sockets

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/internal/vmtest"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/spans"
)

// Kernel TLS (kTLS) on both ends of a connection, with no handshake
// library: both ends take fixed keys, attach the "tls" ULP and give the
// kernel a TX and an RX key (AES-GCM-128, TLS 1.2 or 1.3), then speak
// HTTP/1.1 through plain socket calls while the kernel encrypts. The test
// binary is the program on both ends (EnvKTLSPeer), so it runs in the VM
// kernels' initramfs as it is. The host kernel of the build machines has
// no kTLS (CONFIG_TLS unset): the kernel matrix runs these tests in every
// mode of the VM kernels, which load the tls module.

// EnvKTLSPeer makes the test binary a kTLS peer (see KTLSPeer).
const EnvKTLSPeer = "CLOVISOR_TEST_KTLS_PEER"

// linux/tls.h and linux/tcp.h.
const (
	solTLS                 = 282
	tlsTX                  = 1
	tlsRX                  = 2
	tlsSetRecordType       = 1
	tlsGetRecordType       = 2
	tlsCipherAESGCM128     = 51
	tlsRecordHandshake     = 22
	tlsRecordAppData       = 23
	tlsMaxRecordPlain      = 16384
	tlsVersion12           = 0x0303
	tlsVersion13           = 0x0304
	ktlsPort12, ktlsPort13 = 8443, 8444
)

// ktlsKeys is one direction's AES-GCM-128 key material.
type ktlsKeys struct {
	key  [16]byte
	iv   [8]byte
	salt [4]byte
}

// The fixed keys both ends agree on: the client writes with clientWrite,
// the server with serverWrite.
var (
	ktlsClientWrite = ktlsKeys{key: [16]byte{0x11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
		iv: [8]byte{0xc1, 1, 2, 3, 4, 5, 6, 7}, salt: [4]byte{0xc5, 1, 2, 3}}
	ktlsServerWrite = ktlsKeys{key: [16]byte{0x22, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
		iv: [8]byte{0x51, 1, 2, 3, 4, 5, 6, 7}, salt: [4]byte{0x55, 1, 2, 3}}
)

// cryptoInfo is struct tls12_crypto_info_aes_gcm_128 (record sequence 0).
func (k ktlsKeys) cryptoInfo(version uint16) string {
	b := make([]byte, 40)
	binary.NativeEndian.PutUint16(b[0:], version)
	binary.NativeEndian.PutUint16(b[2:], tlsCipherAESGCM128)
	copy(b[4:12], k.iv[:])
	copy(b[12:28], k.key[:])
	copy(b[28:32], k.salt[:])
	return string(b)
}

// enableKTLS attaches the tls ULP to a connected socket and sets its keys.
func enableKTLS(fd int, version uint16, tx, rx ktlsKeys) error {
	if err := unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls"); err != nil {
		return fmt.Errorf(`setsockopt(TCP_ULP, "tls"): %w`, err)
	}
	if err := unix.SetsockoptString(fd, solTLS, tlsTX, tx.cryptoInfo(version)); err != nil {
		return fmt.Errorf("setsockopt(SOL_TLS, TLS_TX, AES-GCM-128, %#x): %w", version, err)
	}
	if err := unix.SetsockoptString(fd, solTLS, tlsRX, rx.cryptoInfo(version)); err != nil {
		return fmt.Errorf("setsockopt(SOL_TLS, TLS_RX, AES-GCM-128, %#x): %w", version, err)
	}
	return nil
}

// ktlsAvailable tries kernel TLS on a loopback connection of this
// process: an error says what the kernel lacks.
func ktlsAvailable() error {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(ln)
	lo := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if err := unix.Bind(ln, lo); err != nil {
		return err
	}
	if err := unix.Listen(ln, 1); err != nil {
		return err
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return err
	}
	c, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(c)
	if err := unix.Connect(c, sa); err != nil {
		return err
	}
	s, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	if err := unix.SetsockoptString(c, unix.SOL_TCP, unix.TCP_ULP, "tls"); err != nil {
		return fmt.Errorf(`the kernel has no kernel TLS (CONFIG_TLS, the "tls" module): setsockopt(TCP_ULP, "tls"): %w`, err)
	}
	if err := unix.SetsockoptString(c, solTLS, tlsTX, ktlsClientWrite.cryptoInfo(tlsVersion12)); err != nil {
		return fmt.Errorf("the kernel has kernel TLS but not AES-GCM-128 for it (crypto gcm(aes): modules gcm, ghash-generic, ctr): setsockopt(SOL_TLS, TLS_TX): %w", err)
	}
	return nil
}

// The scripted exchange: requests and responses byte for byte, and a
// handshake record (not application data) the server sends at the end.
var (
	ktlsRequests = []string{
		"GET /ktls/small HTTP/1.1\r\nHost: ktls.test\r\nUser-Agent: clovisor-ktls\r\n\r\n",
		"GET /ktls/big HTTP/1.1\r\nHost: ktls.test\r\nUser-Agent: clovisor-ktls\r\n\r\n",
		"POST /ktls/post HTTP/1.1\r\nHost: ktls.test\r\nUser-Agent: clovisor-ktls\r\nContent-Type: text/plain\r\nContent-Length: 300\r\n\r\n" +
			strings.Repeat("p", 300),
	}
	ktlsResponses = []string{
		"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5000\r\n\r\n" + strings.Repeat("s", 5000),
		"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 20000\r\n\r\n" + strings.Repeat("b", 20000),
		"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\ngot 300\n",
	}
	ktlsControl = "clovisor-ktls-handshake-record"
)

// How the peers move the bytes, so that every payload path is taken:
//   - client requests: write(2), but the POST with sendmsg(2) and a
//     TLS_SET_RECORD_TYPE control message saying application data;
//   - server requests: recvmsg(2) with room for TLS_GET_RECORD_TYPE;
//   - responses: write(2) and read(2);
//   - the final handshake record: sendmsg(2) with TLS_SET_RECORD_TYPE 22,
//     recvmsg(2) reading TLS_GET_RECORD_TYPE 22: never a data event.
const ktlsPOST = 2

// tlsRecordTypeCmsg is a SOL_TLS TLS_SET_RECORD_TYPE control message.
func tlsRecordTypeCmsg(typ byte) []byte {
	b := make([]byte, unix.CmsgSpace(1))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = solTLS, tlsSetRecordType
	h.SetLen(unix.CmsgLen(1))
	b[unix.CmsgLen(0)] = typ
	return b
}

// recvRecordType is recvmsg(2) with room for the record type; it returns
// the bytes read and the record type the kernel named.
func recvRecordType(fd int, buf []byte) (int, byte, error) {
	oob := make([]byte, unix.CmsgSpace(1))
	n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("recvmsg: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 || msgs[0].Header.Level != solTLS || msgs[0].Header.Type != tlsGetRecordType || len(msgs[0].Data) != 1 {
		return 0, 0, fmt.Errorf("recvmsg: control messages %+v (%v), want one TLS_GET_RECORD_TYPE", msgs, err)
	}
	return n, msgs[0].Data[0], nil
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		b = b[n:]
	}
	return nil
}

func readFull(fd int, b []byte) error {
	for off := 0; off < len(b); {
		n, err := unix.Read(fd, b[off:])
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("read: EOF after %d of %d bytes", off, len(b))
		}
		off += n
	}
	return nil
}

// KTLSPeer runs one end of the kTLS exchange (blocking sockets, raw
// system calls) and returns the exit code:
//
//	"server IP"          listen on IP:8443 (TLS 1.2) and IP:8444 (TLS 1.3),
//	                     print "listening", serve one connection on each,
//	                     in that order
//	"client IP:PORT V"   connect, kTLS version V (1.2 or 1.3), run the script
func KTLSPeer(spec string) int {
	f := strings.Fields(spec)
	var err error
	switch {
	case len(f) == 2 && f[0] == "server":
		err = ktlsServer(f[1])
	case len(f) == 3 && f[0] == "client":
		err = ktlsClient(f[1], f[2])
	default:
		err = fmt.Errorf("%s=%q: want \"server IP\" or \"client IP:PORT 1.2|1.3\"", EnvKTLSPeer, spec)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ktls peer:", err)
		return 1
	}
	return 0
}

// tcpSocket makes a blocking TCP socket with a send buffer that takes
// every write of the script at once (so each write is one call of the TLS
// layer, cut into records of at most 16 KiB).
func tcpSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func ktlsServer(ip string) error {
	addr, err := netip.ParseAddr(ip)
	if err != nil || !addr.Is4() {
		return fmt.Errorf("server address %q: want IPv4", ip)
	}
	var lns []int
	for _, port := range []int{ktlsPort12, ktlsPort13} {
		fd, err := tcpSocket()
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: addr.As4()}); err != nil {
			return fmt.Errorf("bind %s:%d: %w", ip, port, err)
		}
		if err := unix.Listen(fd, 4); err != nil {
			return err
		}
		lns = append(lns, fd)
	}
	fmt.Println("listening")
	for i, version := range []uint16{tlsVersion12, tlsVersion13} {
		fd, _, err := unix.Accept4(lns[i], unix.SOCK_CLOEXEC)
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		err = ktlsServe(fd, version)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("TLS %#x connection: %w", version, err)
		}
	}
	return nil
}

func ktlsServe(fd int, version uint16) error {
	if err := enableKTLS(fd, version, ktlsServerWrite, ktlsClientWrite); err != nil {
		return err
	}
	for i, req := range ktlsRequests {
		got := make([]byte, 0, len(req))
		buf := make([]byte, len(req))
		for len(got) < len(req) {
			n, typ, err := recvRecordType(fd, buf[:len(req)-len(got)])
			if err != nil {
				return err
			}
			if typ != tlsRecordAppData || n == 0 {
				return fmt.Errorf("request %d: record type %d, %d bytes", i, typ, n)
			}
			got = append(got, buf[:n]...)
		}
		if string(got) != req {
			return fmt.Errorf("request %d: got %q, want %q", i, got, req)
		}
		if err := writeAll(fd, []byte(ktlsResponses[i])); err != nil {
			return err
		}
	}
	n, err := unix.SendmsgN(fd, []byte(ktlsControl), tlsRecordTypeCmsg(tlsRecordHandshake), nil, 0)
	if err != nil || n != len(ktlsControl) {
		return fmt.Errorf("sendmsg of the handshake record: %d bytes, %v", n, err)
	}
	// Until the client closes.
	if n, err := unix.Read(fd, make([]byte, 64)); n != 0 || err != nil {
		return fmt.Errorf("read after the script: %d bytes, %v; want EOF", n, err)
	}
	return nil
}

func ktlsClient(server, v string) error {
	ap, err := netip.ParseAddrPort(server)
	if err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("server %q: want IPv4:port", server)
	}
	version := map[string]uint16{"1.2": tlsVersion12, "1.3": tlsVersion13}[v]
	if version == 0 {
		return fmt.Errorf("TLS version %q: want 1.2 or 1.3", v)
	}
	fd, err := tcpSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		return fmt.Errorf("connect %s: %w", server, err)
	}
	if err := enableKTLS(fd, version, ktlsClientWrite, ktlsServerWrite); err != nil {
		return err
	}
	for i, req := range ktlsRequests {
		if i == ktlsPOST {
			n, err := unix.SendmsgN(fd, []byte(req), tlsRecordTypeCmsg(tlsRecordAppData), nil, 0)
			if err != nil || n != len(req) {
				return fmt.Errorf("sendmsg of request %d: %d bytes, %v", i, n, err)
			}
		} else if err := writeAll(fd, []byte(req)); err != nil {
			return err
		}
		resp := make([]byte, len(ktlsResponses[i]))
		if err := readFull(fd, resp); err != nil {
			return fmt.Errorf("response %d: %w", i, err)
		}
		if string(resp) != ktlsResponses[i] {
			return fmt.Errorf("response %d: got %q, want %q", i, resp, ktlsResponses[i])
		}
	}
	buf := make([]byte, 256)
	n, typ, err := recvRecordType(fd, buf)
	if err != nil {
		return err
	}
	if typ != tlsRecordHandshake || string(buf[:n]) != ktlsControl {
		return fmt.Errorf("final record: type %d %q, want type %d %q", typ, buf[:n], tlsRecordHandshake, ktlsControl)
	}
	fmt.Printf("ok %s\n", v)
	return nil
}

// ktlsOverhead is what TLS adds to each record of AES-GCM-128 on the wire:
// the header (5), the explicit nonce (8, TLS 1.2) or the inner content
// type (1, TLS 1.3), and the tag (16).
func ktlsOverhead(version uint16) int {
	if version == tlsVersion13 {
		return 5 + 1 + 16
	}
	return 5 + 8 + 16
}

// ktlsWire is how many bytes the records of these writes take on the wire.
func ktlsWire(version uint16, writes ...string) uint64 {
	var n int
	for _, w := range writes {
		records := (len(w) + tlsMaxRecordPlain - 1) / tlsMaxRecordPlain
		n += len(w) + records*ktlsOverhead(version)
	}
	return uint64(n)
}

// ktlsEnv is a client and a server namespace, joined by a veth pair, and a
// cgroup for each end.
type ktlsEnv struct {
	srvNS, cliNS *testbed.Netns
	srvCG, cliCG *testbed.Cgroup
	srvIP        netip.Addr
	exe          string
}

// requireKTLS skips (outside a VM) or fails (in a vmtest VM, whose
// kernels have the tls module) when the kernel cannot do kernel TLS.
func requireKTLS(t *testing.T) {
	t.Helper()
	testbed.RequireRoot(t)
	if err := ktlsAvailable(); err != nil {
		if vmtest.InGuest() {
			t.Fatalf("kernel TLS is expected in the VM kernels: %v", err)
		}
		t.Skipf("Linux %s: %v. The kTLS tests run in the VM kernels of the kernel matrix (TestKernelMatrix)", probes.KernelRelease(), err)
	}
}

func newKTLSEnv(t *testing.T) *ktlsEnv {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	e := &ktlsEnv{srvNS: testbed.NewNetns(t, "ktls-srv"), cliNS: testbed.NewNetns(t, "ktls-cli"),
		srvCG: testbed.NewCgroup(t, "ktls-srv"), cliCG: testbed.NewCgroup(t, "ktls-cli"),
		srvIP: netip.MustParseAddr("10.201.9.2"), exe: exe}
	testbed.VethPair(t, e.cliNS, e.srvNS, netip.MustParsePrefix("10.201.9.1/24"), netip.PrefixFrom(e.srvIP, 24))
	return e
}

// startServer starts the kTLS server and waits until it listens; wait
// returns its error once both connections are served.
func (e *ktlsEnv) startServer(t *testing.T) (pid uint32, wait func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	cmd := e.srvNS.Command(ctx, e.exe)
	cmd.Env = append(os.Environ(), EnvKTLSPeer+"=server "+e.srvIP.String())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srvCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		ready := false
		for sc.Scan() {
			if sc.Text() == "listening" && !ready {
				ready = true
				done <- nil
			}
		}
		if !ready {
			done <- errors.New("exited before listening")
		}
	}()
	select {
	case err := <-done:
		if err != nil {
			cancel()
			cmd.Wait()
			t.Fatalf("kTLS server: %v: %s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		cancel()
		t.Fatalf("kTLS server did not listen: %s", stderr.String())
	}
	var waited bool
	wait = func() error {
		if waited {
			return nil
		}
		waited = true
		defer cancel()
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("kTLS server: %v: %s", err, stderr.String())
		}
		return nil
	}
	t.Cleanup(func() { cancel(); wait() })
	return uint32(cmd.Process.Pid), wait
}

// client runs the kTLS client for one TLS version and returns its pid.
func (e *ktlsEnv) client(t *testing.T, port int, version string) uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := e.cliNS.Command(ctx, e.exe)
	cmd.Env = append(os.Environ(), EnvKTLSPeer+"=client "+netip.AddrPortFrom(e.srvIP, uint16(port)).String()+" "+version)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := e.cliCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil || strings.TrimSpace(out.String()) != "ok "+version {
		t.Fatalf("kTLS client (TLS %s): %v: %s", version, err, out.String())
	}
	return uint32(cmd.Process.Pid)
}

// ktlsSocket is what the kernel reported about one end of a connection.
type ktlsSocket struct {
	open, close *probes.ConnEvent
	data        [3][]ktlsData // by direction (DirSend, DirRecv)
}

type ktlsData struct {
	ev      probes.DataEvent
	payload []byte
}

// ktlsEvents reads the ring buffer until want close events arrived (or
// 10 s passed), feeding every record to tk too, and returns the sockets in
// the order of their first event. An open event starts a new socket even
// for a cookie seen before: the kprobe mode's cookies are socket
// addresses, which a later socket may reuse.
func ktlsEvents(t *testing.T, tr *probes.Tracer, tk *Tracker, want int) []*ktlsSocket {
	t.Helper()
	rd, err := ringbuf.NewReader(tr.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var socks []*ktlsSocket
	cur := map[uint64]*ktlsSocket{}
	get := func(cookie uint64, open bool) *ktlsSocket {
		if cur[cookie] == nil || open {
			cur[cookie] = &ktlsSocket{}
			socks = append(socks, cur[cookie])
		}
		return cur[cookie]
	}
	closes := 0
	for deadline := time.Now().Add(10 * time.Second); closes < want && time.Now().Before(deadline); {
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		rec, err := rd.Read()
		if err != nil {
			continue
		}
		tk.Handle(rec.RawSample)
		switch rec.RawSample[0] {
		case probes.EventConnOpen, probes.EventConnClose:
			ev := new(probes.ConnEvent)
			if err := decodeConn(rec.RawSample, ev); err != nil {
				t.Fatal(err)
			}
			if ev.Kind == probes.EventConnOpen {
				get(ev.Cookie, true).open = ev
			} else {
				get(ev.Cookie, false).close = ev
				closes++
			}
		case probes.EventData:
			var d ktlsData
			payload, err := decodeData(rec.RawSample, &d.ev)
			if err != nil {
				t.Fatal(err)
			}
			d.payload = slices.Clone(payload)
			s := get(d.ev.Cookie, false)
			s.data[d.ev.Dir] = append(s.data[d.ev.Dir], d)
		}
	}
	tk.Flush(MonotonicNow())
	if closes < want {
		t.Fatalf("%d close events after 10 s, want %d", closes, want)
	}
	return socks
}

// checkStream checks one direction of one socket: only kTLS events, no
// sequence numbers, the context's TLS version, each payload the plaintext
// at its place in the stream, and the byte counts adding up to the
// stream exactly.
func checkStream(t *testing.T, what string, events []ktlsData, stream string, version uint16, payloadCap int) {
	t.Helper()
	off := 0
	for i, d := range events {
		ev := d.ev
		if ev.Source != probes.SourceKTLS {
			t.Errorf("%s event %d: source %d, want %d (ktls); %d bytes %q", what, i, ev.Source, probes.SourceKTLS, ev.Len, d.payload)
			continue
		}
		if ev.Seq != 0 || ev.TlsVersion != version {
			t.Errorf("%s event %d: seq %d, TLS version %#x; want 0, %#x", what, i, ev.Seq, ev.TlsVersion, version)
		}
		if want := min(int(ev.Len), payloadCap); int(ev.Cap) != want {
			t.Errorf("%s event %d: %d of %d bytes captured, want %d", what, i, ev.Cap, ev.Len, want)
		}
		end := off + len(d.payload)
		if end > len(stream) || string(d.payload) != stream[off:end] {
			t.Errorf("%s event %d: payload at offset %d is %.80q, want %.80q", what, i, off, d.payload, stream[min(off, len(stream)):min(end, len(stream))])
		}
		off += int(ev.Len)
	}
	if off != len(stream) {
		t.Errorf("%s: %d events of %d plaintext bytes in all, want %d", what, len(events), off, len(stream))
	}
}

// TestKTLS: kernel TLS on both ends of a TLS 1.2 and a TLS 1.3
// connection (client and server in network namespaces and cgroups of their
// own), traced in the attach mode under test. Each end's data events are
// the plaintext, byte for byte and in exact counts, as source ktls with the
// connection's TLS version, no sequence number, the cookie and addresses of
// the end's open event; none carries ciphertext (source socket) or the
// handshake record sent at the end; the TCP counters show the records on
// the wire. The tracker makes one CLIENT and one SERVER session per
// request, with method, path, status, body sizes, payload source ktls and
// TLS version.
func TestKTLS(t *testing.T) {
	requireKTLS(t)
	mode := AttachModeUnderTest(t)
	e := newKTLSEnv(t)
	const payloadCap = probes.MaxPayload
	tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true, PayloadBytes: payloadCap})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Mode != mode {
		t.Fatalf("tracer attached in mode %s, asked for %s", tr.Mode, mode)
	}
	st := tr.KTLS()
	wantHooks := map[string][]string{
		probes.ModeKprobe: {"kprobe/tls_sw_sendmsg", "kretprobe/tls_sw_sendmsg", "kprobe/tls_sw_recvmsg", "kretprobe/tls_sw_recvmsg",
			"kprobe/tls_device_sendmsg", "kretprobe/tls_device_sendmsg"},
		probes.ModeFentry: {"fexit/tls_sw_sendmsg", "fexit/tls_sw_recvmsg", "fexit/tls_device_sendmsg"},
	}[mode]
	if !st.Traced || (wantHooks != nil && !slices.Equal(st.Hooks, wantHooks)) {
		t.Fatalf("kernel TLS state %+v; want traced with hooks %v", st, wantHooks)
	}
	t.Logf("%s mode: kernel TLS seen by %v %s", mode, st.Hooks, st.Reason)
	for _, cg := range []*testbed.Cgroup{e.srvCG, e.cliCG} {
		if err := tr.AddCgroup(cg.ID()); err != nil {
			t.Fatal(err)
		}
	}
	var sessions []*spans.Session
	tk := NewTracker(Config{Analyzers: protocols.NewRegistry(http1.New()),
		Sink: func(s *spans.Session) { sessions = append(sessions, s) }})

	// In a VM nothing else moves TCP data: count the hooks' runs during
	// the exchange, to show which of them kernel TLS passes.
	var runsBefore map[string]uint64
	if vmtest.InGuest() {
		stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			t.Fatalf("BPF run statistics: %v", err)
		}
		defer stats.Close()
		runsBefore = programRuns(t, tr)
	}
	serverPID, serverDone := e.startServer(t)
	versions := []struct {
		name    string
		port    int
		version uint16
	}{{"1.2", ktlsPort12, tlsVersion12}, {"1.3", ktlsPort13, tlsVersion13}}
	clientPID := map[string]uint32{}
	for _, v := range versions {
		clientPID[v.name] = e.client(t, v.port, v.name)
	}
	if err := serverDone(); err != nil {
		t.Fatal(err)
	}
	socks := ktlsEvents(t, tr, tk, 2*len(versions))
	if runsBefore != nil {
		runs := programRuns(t, tr)
		for name := range runs {
			runs[name] -= runsBefore[name]
		}
		t.Logf("%s mode: program runs during the kTLS exchanges: %v", mode, runs)
		// The TCP data hooks of the kprobe and fentry modes never run for
		// kernel TLS; their kTLS hooks do. (skb_copy_datagram_iter, in
		// the kprobe mode, may run within tls_sw_recvmsg: it reports
		// nothing there, as the socket-source check above shows.)
		zero, busy := map[string][]string{
			probes.ModeKprobe: {"kp_tcp_sendmsg", "krp_tcp_sendmsg", "kp_tcp_recvmsg", "krp_tcp_recvmsg"},
			probes.ModeFentry: {"fx_tcp_sendmsg", "fx_tcp_recvmsg"},
		}[mode], map[string][]string{
			probes.ModeKprobe: {"kp_tls_sendmsg", "krp_tls_sendmsg", "kp_tls_recvmsg", "krp_tls_recvmsg"},
			probes.ModeFentry: {"fx_tls_sw_sendmsg", "fx_tls_sw_recvmsg"},
		}[mode]
		for _, name := range zero {
			if n, ok := runs[name]; !ok || n != 0 {
				t.Errorf("%s ran %d times (present %v) during kTLS-only traffic, want 0", name, n, ok)
			}
		}
		for _, name := range busy {
			if runs[name] == 0 {
				t.Errorf("%s did not run during the kTLS exchanges", name)
			}
		}
	}

	requests, responses := strings.Join(ktlsRequests, ""), strings.Join(ktlsResponses, "")
	for _, v := range versions {
		t.Run(v.name, func(t *testing.T) {
			server := netip.AddrPortFrom(e.srvIP, uint16(v.port))
			var cli, srv *ktlsSocket
			for _, s := range socks {
				if s.open == nil {
					continue
				}
				local, remote := endpoints(s.open.Tuple.Family, &s.open.Tuple.Saddr, &s.open.Tuple.Daddr, s.open.Tuple.Sport, s.open.Tuple.Dport)
				switch {
				case s.open.Role == probes.RoleClient && remote == server:
					cli = s
				case s.open.Role == probes.RoleServer && local == server:
					srv = s
				}
			}
			if cli == nil || srv == nil {
				t.Fatalf("open events: client %v, server %v (sockets %d)", cli != nil, srv != nil, len(socks))
			}
			if cli.open.Tgid != clientPID[v.name] || cli.open.CgroupId != e.cliCG.ID() || srv.open.CgroupId != e.srvCG.ID() {
				t.Errorf("client open: tgid %d cgroup %d, want %d, %d; server cgroup %d, want %d",
					cli.open.Tgid, cli.open.CgroupId, clientPID[v.name], e.cliCG.ID(), srv.open.CgroupId, e.srvCG.ID())
			}
			for _, end := range []struct {
				name       string
				s          *ktlsSocket
				sent, recd string
				control    string // the handshake record's bytes, sent but no data
				writes     []string
			}{
				{"client", cli, requests, responses, "", ktlsRequests},
				{"server", srv, responses, requests, ktlsControl, append(slices.Clone(ktlsResponses), ktlsControl)},
			} {
				s := end.s
				for dir, stream := range map[uint8]string{probes.DirSend: end.sent, probes.DirRecv: end.recd} {
					what := fmt.Sprintf("%s %s", end.name, map[uint8]string{probes.DirSend: "send", probes.DirRecv: "recv"}[dir])
					checkStream(t, what, s.data[dir], stream, v.version, payloadCap)
					for _, d := range s.data[dir] {
						if d.ev.Tuple != s.open.Tuple || d.ev.CgroupId != s.open.CgroupId {
							t.Errorf("%s: event tuple %+v cgroup %d, open event's %+v %d", what, d.ev.Tuple, d.ev.CgroupId, s.open.Tuple, s.open.CgroupId)
							break
						}
					}
				}
				if len(s.data[probes.DirSend]) == 0 || len(s.data[probes.DirRecv]) == 0 {
					continue
				}
				first := string(s.data[probes.DirSend][0].payload)
				wantLine := map[string]string{"client": "GET /ktls/small HTTP/1.1\r\n", "server": "HTTP/1.1 200 OK\r\n"}[end.name]
				if !strings.HasPrefix(first, wantLine) {
					t.Errorf("%s: first send %.40q, want the line %q", end.name, first, wantLine)
				}
				// What TCP carried: the records, each larger than its
				// plaintext by the cipher's overhead. TCP counts
				// retransmitted bytes again (a loaded emulated VM can
				// retransmit): then at most a segment each more.
				if s.close == nil {
					t.Errorf("%s: no close event", end.name)
				} else if want, retrans := ktlsWire(v.version, end.writes...), uint64(s.close.TotalRetrans); s.close.BytesSent < want ||
					s.close.BytesSent > want+retrans*64<<10 || (retrans == 0 && s.close.BytesSent != want) {
					t.Errorf("%s: TCP sent %d bytes (%d segments retransmitted), want %d: %d bytes of plaintext in %s records",
						end.name, s.close.BytesSent, retrans, want, len(strings.Join(end.writes, "")), v.name)
				} else if retrans != 0 {
					t.Logf("%s: TCP sent %d bytes: %d of records and %d retransmitted in %d segments", end.name, s.close.BytesSent, want, s.close.BytesSent-want, retrans)
				}
			}

			// The sessions of this connection.
			var got []*spans.Session
			for _, s := range sessions {
				if s.Server == server {
					got = append(got, s)
				}
			}
			type want struct {
				method, path      string
				status            int
				reqBody, respBody int64
			}
			wants := []want{{"GET", "/ktls/small", 200, 0, 5000}, {"GET", "/ktls/big", 200, 0, 20000}, {"POST", "/ktls/post", 200, 300, 8}}
			if len(got) != 2*len(wants) {
				t.Fatalf("%d sessions, want %d: %s", len(got), 2*len(wants), describeSessions(got))
			}
			for _, kind := range []spans.Kind{spans.Client, spans.Server} {
				var ss []*spans.Session
				for _, s := range got {
					if s.Kind == kind {
						ss = append(ss, s)
					}
				}
				if len(ss) != len(wants) {
					t.Fatalf("kind %d: %d sessions: %s", kind, len(ss), describeSessions(got))
				}
				for i, s := range ss {
					w, tx := wants[i], s.Tx
					if m, p := txAttr(tx, "http.request.method"), txAttr(tx, "url.path"); m != w.method || p != w.path || tx.StatusCode != w.status {
						t.Errorf("kind %d #%d: %s %s %d, want %s %s %d", kind, i, m, p, tx.StatusCode, w.method, w.path, w.status)
					}
					if n := txAttrInt(tx, "http.response.body.size"); n != w.respBody {
						t.Errorf("kind %d #%d: response body %d, want %d", kind, i, n, w.respBody)
					}
					if n := txAttrInt(tx, "http.request.body.size"); n != w.reqBody {
						t.Errorf("kind %d #%d: request body %d, want %d", kind, i, n, w.reqBody)
					}
					if tx.ReqBytes != int64(len(ktlsRequests[i])) || tx.RespBytes != int64(len(ktlsResponses[i])) {
						t.Errorf("kind %d #%d: %d/%d bytes, want %d/%d", kind, i, tx.ReqBytes, tx.RespBytes, len(ktlsRequests[i]), len(ktlsResponses[i]))
					}
					if s.PayloadSource != "ktls" || s.TLS == nil || s.TLS.Version != v.name || s.Index != i {
						t.Errorf("kind %d #%d: payload source %q, TLS %+v, index %d; want ktls, version %s, index %d", kind, i, s.PayloadSource, s.TLS, s.Index, v.name, i)
					}
					if wantPID := map[spans.Kind]uint32{spans.Client: clientPID[v.name], spans.Server: serverPID}[kind]; s.Process.PID != wantPID {
						t.Errorf("kind %d #%d: pid %d, want %d", kind, i, s.Process.PID, wantPID)
					}
					if s.CgroupID != map[spans.Kind]uint64{spans.Client: e.cliCG.ID(), spans.Server: e.srvCG.ID()}[kind] {
						t.Errorf("kind %d #%d: cgroup %d", kind, i, s.CgroupID)
					}
				}
			}
		})
	}
	// The spans made of these sessions, as exported.
	spanAttrs := exportedSpans(t, sessions)
	if len(spanAttrs) != 2*2*len(ktlsRequests) {
		t.Errorf("%d spans exported, want %d", len(spanAttrs), 2*2*len(ktlsRequests))
	}
	for i, a := range spanAttrs {
		port, _ := strconv.Atoi(a["server.port"])
		version := map[int]string{ktlsPort12: "1.2", ktlsPort13: "1.3"}[port]
		if a["clovisor.payload.source"] != "ktls" || a["tls.protocol.name"] != "tls" || a["tls.protocol.version"] != version ||
			a["url.scheme"] != "https" || a["http.response.status_code"] != "200" || !slices.Contains([]string{"GET", "POST"}, a["http.request.method"]) ||
			!strings.HasPrefix(a["url.path"], "/ktls/") || version == "" {
			t.Errorf("span %d: attributes %v; want clovisor.payload.source=ktls, tls.protocol.name=tls, tls.protocol.version=%s, url.scheme=https, a /ktls/ path, status 200", i, a, version)
		}
	}

	// Nothing else was reported: every socket with events is one of the
	// four ends above.
	if len(socks) != 2*len(versions) {
		t.Errorf("events for %d sockets, want %d", len(socks), 2*len(versions))
	}
	if st := tk.Stats(); st.BadEvents != 0 || st.GapBytes != 0 || st.DuplicatePlaintext != 0 || st.TLSConns != 0 {
		t.Errorf("tracker stats %+v", st)
	}
	if ks, err := tr.Stats(); err != nil || ks.DataLost != 0 || ks.ConnLost != 0 || ks.PayloadFaults != 0 {
		t.Errorf("kernel stats %+v %v", ks, err)
	}
}

// exportedSpans exports the sessions through spans.Exporter (OTLP mode,
// into memory) and returns each span's attributes as strings, with its
// kind under "span.kind".
func exportedSpans(t *testing.T, sessions []*spans.Session) []map[string]string {
	t.Helper()
	mem := tracetest.NewInMemoryExporter()
	exp, err := spans.New(context.Background(), spans.Config{Output: spans.OutputOTLP, Exporter: mem},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Shutdown(context.Background())
	for _, s := range sessions {
		exp.Export(s)
	}
	if err := exp.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	var out []map[string]string
	for _, sp := range mem.GetSpans() {
		a := map[string]string{"span.kind": sp.SpanKind.String()}
		for _, kv := range sp.Attributes {
			a[string(kv.Key)] = kv.Value.Emit()
		}
		out = append(out, a)
	}
	return out
}

// programRuns returns how often each of the tracer's programs ran (with
// BPF run statistics enabled).
func programRuns(t *testing.T, tr *probes.Tracer) map[string]uint64 {
	t.Helper()
	runs := map[string]uint64{}
	for name, p := range tr.Programs() {
		st, err := p.Stats()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		runs[name] = st.RunCount
	}
	return runs
}

func txAttr(tx *protocols.Transaction, key string) string {
	for _, kv := range tx.AllAttrs() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

func txAttrInt(tx *protocols.Transaction, key string) int64 {
	n, _ := strconv.ParseInt(txAttr(tx, key), 10, 64)
	return n
}

func describeSessions(ss []*spans.Session) string {
	var b strings.Builder
	for _, s := range ss {
		fmt.Fprintf(&b, "\n  kind=%d %s -> %s pid=%d source=%s idx=%d %s", s.Kind, s.Client, s.Server, s.Process.PID, s.PayloadSource, s.Index, s.Tx.Summary)
	}
	return b.String()
}

// TestKTLSModuleLoadedLater: a tracer started while the tls module is not
// loaded says so, hooks kernel TLS once the module loads (kprobe and
// fentry modes: the module's functions), and then reports kTLS plaintext.
// It unloads and reloads the module, so it runs only in a vmtest VM.
func TestKTLSModuleLoadedLater(t *testing.T) {
	if !vmtest.InGuest() {
		t.Skip("unloads and reloads the tls module: runs only in a vmtest VM (TestKernelMatrix)")
	}
	requireKTLS(t)
	mode := AttachModeUnderTest(t)
	const ko = "/lib/modules/tls.ko" // where vmtest's /init loads it from
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v: %s", name, args, err, out)
		}
	}
	loaded := func() bool { _, err := os.Stat("/sys/module/tls"); return err == nil }
	// Sockets of earlier tests may hold the module for a moment.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, err := exec.Command("rmmod", "tls").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rmmod tls: %v: %s", err, out)
		}
	}
	t.Cleanup(func() {
		if !loaded() {
			run("insmod", ko)
		}
	})
	e := newKTLSEnv(t)
	tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	st := tr.KTLS()
	if mode == probes.ModeTracepoint {
		if !st.Traced {
			t.Errorf("tracepoint mode: kernel TLS state %+v, want traced (no hooks of its own)", st)
		}
	} else if st.Traced || !strings.Contains(st.Reason, "tls module is not loaded") {
		t.Errorf("%s mode without the tls module: state %+v, want untraced, saying the module is not loaded", mode, st)
	}
	run("insmod", ko)
	for deadline := time.Now().Add(5 * time.Second); !tr.KTLS().Traced; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("kernel TLS not hooked 5 s after the tls module loaded: %+v", tr.KTLS())
		}
	}
	t.Logf("%s mode: hooked after the module loaded: %+v", mode, tr.KTLS())
	for _, cg := range []*testbed.Cgroup{e.srvCG, e.cliCG} {
		if err := tr.AddCgroup(cg.ID()); err != nil {
			t.Fatal(err)
		}
	}
	tk := NewTracker(Config{})
	_, serverDone := e.startServer(t)
	e.client(t, ktlsPort12, "1.2")
	e.client(t, ktlsPort13, "1.3")
	if err := serverDone(); err != nil {
		t.Fatal(err)
	}
	socks := ktlsEvents(t, tr, tk, 4)
	var sent, recd int
	for _, s := range socks {
		for dir, ds := range s.data {
			for _, d := range ds {
				if d.ev.Source != probes.SourceKTLS {
					t.Errorf("source %d event of %d bytes", d.ev.Source, d.ev.Len)
				}
				if uint8(dir) == probes.DirSend {
					sent += int(d.ev.Len)
				} else {
					recd += int(d.ev.Len)
				}
			}
		}
	}
	want := 2 * len(strings.Join(ktlsRequests, "")+strings.Join(ktlsResponses, ""))
	if sent != want || recd != want {
		t.Errorf("kTLS plaintext sent %d, received %d bytes; want %d each", sent, recd, want)
	}
}
