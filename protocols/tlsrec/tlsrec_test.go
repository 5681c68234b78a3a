package tlsrec

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"
)

// recorder keeps the first write of a connection.
type recorder struct {
	net.Conn
	mu    sync.Mutex
	first []byte
}

func (r *recorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	if r.first == nil {
		r.first = bytes.Clone(b)
	}
	r.mu.Unlock()
	return r.Conn.Write(b)
}

func (r *recorder) First() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.first
}

func testCert(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "svc.example"},
		DNSNames: []string{"svc.example"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// handshake runs a real crypto/tls handshake over a pipe and returns the
// first bytes each side sent: the ClientHello and ServerHello flights.
func handshake(t *testing.T, maxVersion uint16, sni string) (client, server []byte) {
	t.Helper()
	a, b := net.Pipe()
	ca, sb := &recorder{Conn: a}, &recorder{Conn: b}
	srv := tls.Server(sb, &tls.Config{Certificates: []tls.Certificate{testCert(t)}, MaxVersion: maxVersion})
	cli := tls.Client(ca, &tls.Config{ServerName: sni, InsecureSkipVerify: true, MaxVersion: maxVersion})
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	a.Close()
	b.Close()
	return ca.First(), sb.First()
}

func TestReadHellos(t *testing.T) {
	for _, tc := range []struct {
		max     uint16
		sni     string
		version string
	}{
		{tls.VersionTLS13, "svc.example", "1.3"},
		{tls.VersionTLS12, "svc.example", "1.2"},
		{tls.VersionTLS13, "", "1.3"},
	} {
		ch, sh := handshake(t, tc.max, tc.sni)
		if !IsRecord(ch) || !IsRecord(sh) {
			t.Fatalf("hello flights not recognised as TLS records: % x / % x", ch[:5], sh[:5])
		}
		var h Hello
		if !h.Read(ch) || !h.ClientHello || h.ServerHello {
			t.Fatalf("ClientHello not read: %+v", h)
		}
		if h.ServerName != tc.sni {
			t.Errorf("SNI %q, want %q", h.ServerName, tc.sni)
		}
		if !h.Read(sh) || !h.ServerHello {
			t.Fatalf("ServerHello not read: %+v", h)
		}
		if got := VersionName(h.Version); got != tc.version {
			t.Errorf("max %x: version %q (%#x), want %s", tc.max, got, h.Version, tc.version)
		}
		name := CipherName(h.CipherSuite)
		if name == "" || !bytes.HasPrefix([]byte(name), []byte("TLS_")) {
			t.Errorf("cipher %#x named %q", h.CipherSuite, name)
		}
		// Every prefix cut short of the hello is skipped, never misread.
		for n := 0; n < len(ch); n++ {
			var p Hello
			p.Read(ch[:n])
			if p.ServerName != "" && p.ServerName != tc.sni {
				t.Fatalf("prefix %d: SNI %q", n, p.ServerName)
			}
		}
		for n := 0; n < 5+4+38; n++ {
			var p Hello
			if p.Read(sh[:n]) {
				t.Fatalf("a %d-byte prefix of the ServerHello was read: %+v", n, p)
			}
		}
	}
}

func TestIsRecord(t *testing.T) {
	for _, b := range []string{
		"GET / HTTP/1.1\r\n", "HTTP/1.1 200 OK\r\n", "*1\r\n$4\r\nPING\r\n", "", "\x16\x03", "\x16\x02\x01\x00\x10",
		"\x16\x03\x01\x00\x00", "\x18\x03\x03\x00\x10", "\x17\x03\x05\x00\x10",
	} {
		if IsRecord([]byte(b)) {
			t.Errorf("IsRecord(%q) = true", b)
		}
	}
	for _, b := range []string{"\x16\x03\x01\x02\x00", "\x17\x03\x03\x40\x11", "\x15\x03\x03\x00\x02", "\x14\x03\x03\x00\x01"} {
		if !IsRecord([]byte(b)) {
			t.Errorf("IsRecord(%q) = false", b)
		}
	}
}

func FuzzRead(f *testing.F) {
	f.Add([]byte("\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var h Hello
		h.Read(b)
		if h.ServerName != "" && !validHostName([]byte(h.ServerName)) {
			t.Fatalf("invalid server name %q", h.ServerName)
		}
	})
}
