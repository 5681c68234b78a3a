package sockets

import (
	"encoding/binary"
	"testing"
	"unsafe"

	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
)

// Hello records as a TLS client and server send them (only the fields the
// tracker reads are meaningful).

func handshakeRecord(recVersion uint16, msgType byte, body []byte) []byte {
	msg := append([]byte{msgType, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	rec := []byte{22, byte(recVersion >> 8), byte(recVersion), 0, 0}
	binary.BigEndian.PutUint16(rec[3:], uint16(len(msg)))
	return append(rec, msg...)
}

func extension(typ uint16, data []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(data)))
	return append(b, data...)
}

func withLen16(b []byte) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)
}

func clientHello(sni string) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression
	name := append([]byte{0}, withLen16([]byte(sni))...)
	body = append(body, withLen16(extension(0, withLen16(name)))...)
	return handshakeRecord(0x0301, 1, body)
}

func serverHello(version uint16) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...)
	body = append(body, 0, 0x13, 0x01, 0) // session id, suite, compression
	if version == 0x0304 {
		body = append(body, withLen16(extension(43, []byte{3, 4}))...)
	}
	return handshakeRecord(0x0303, 2, body)
}

// appData is an encrypted record of n bytes of ciphertext.
func appData(n int) []byte {
	b := []byte{23, 3, 3, byte(n >> 8), byte(n)}
	return append(b, make([]byte, n)...)
}

// tlsRecord is dataRecord for a TLS source: plaintext, no sequence number.
func tlsRecord(src, dir uint8, cookie, ts uint64, payload string, version uint16) []byte {
	r := dataRecord(dir, cookie, ts, 0, len(payload), []byte(payload), cliAddr, srvAddr)
	var ev probes.DataEvent
	hdr := (*[1 << 16]byte)(unsafe.Pointer(&ev))[:dataHeaderSize:dataHeaderSize]
	copy(hdr, r)
	ev.Source, ev.TlsVersion = src, version
	copy(r, hdr)
	return r
}

// A TLS client connection: the socket carries the hellos and encrypted
// records; the plaintext comes from OpenSSL's uprobes. One span results,
// from the plaintext, with the handshake's facts; the ciphertext is never
// parsed.
func TestTLSPlaintextFromLibrary(t *testing.T) {
	for _, src := range []struct {
		id   uint8
		name string
	}{{probes.SourceOpenSSL, "openssl"}, {probes.SourceGoTLS, "go_tls"}} {
		t.Run(src.name, func(t *testing.T) {
			tk, s := newTestTracker(Config{})
			ch, sh := clientHello("svc.example"), serverHello(0x0304)
			tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 7, 1, cliAddr, srvAddr))
			tk.Handle(dataRecord(probes.DirSend, 7, 2, 1000, len(ch), ch, cliAddr, srvAddr))
			tk.Handle(dataRecord(probes.DirRecv, 7, 3, 5000, len(sh), sh, cliAddr, srvAddr))
			// Request: ciphertext on the socket, then the library's plaintext.
			ct := appData(len(req) + 17)
			tk.Handle(dataRecord(probes.DirSend, 7, 4, 1000+uint32(len(ch)), len(ct), ct, cliAddr, srvAddr))
			tk.Handle(tlsRecord(src.id, probes.DirSend, 7, 5, req, 0))
			rt := appData(len(resp) + 17)
			tk.Handle(dataRecord(probes.DirRecv, 7, 6, 5000+uint32(len(sh)), len(rt), rt, cliAddr, srvAddr))
			tk.Handle(tlsRecord(src.id, probes.DirRecv, 7, 7, resp, 0))
			tk.Handle(connRecord(probes.EventConnClose, 0, 7, 8, cliAddr, srvAddr))
			if len(s.got) != 1 {
				t.Fatalf("%d sessions, want 1: %s", len(s.got), describeAll(s.got))
			}
			x := s.got[0]
			if x.Kind != spans.Client || x.Tx.Summary != "GET /x?a=1 200" || x.Tx.StatusCode != 200 ||
				x.Tx.ReqBytes != int64(len(req)) || x.Tx.RespBytes != int64(len(resp)) || x.Tx.ReqStart != 5 || x.Tx.RespEnd != 7 {
				t.Errorf("session %s", describeAll(s.got))
			}
			if !hasAttr(x, "url.scheme", "https") {
				t.Errorf("url.scheme not https: %v", x.Tx.AllAttrs())
			}
			if x.PayloadSource != src.name {
				t.Errorf("payload source %q, want %q", x.PayloadSource, src.name)
			}
			want := spans.TLSInfo{Version: "1.3", Cipher: "TLS_AES_128_GCM_SHA256", ServerName: "svc.example"}
			if x.TLS == nil || *x.TLS != want {
				t.Errorf("TLS %+v, want %+v", x.TLS, want)
			}
			// The tag comes from the ClientHello's sequence number, as at the server.
			if x.ConnTag != 1<<32|1000 {
				t.Errorf("conn tag %#x", x.ConnTag)
			}
			st := tk.Stats()
			if st.TLSConns != 1 || st.PlaintextEvents != 2 || st.Unrecognized != 0 || st.GarbageBytes != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// A connection that predates the agent: the role comes from the hellos.
func TestTLSRoleFromHello(t *testing.T) {
	tk, s := newTestTracker(Config{})
	ch, sh := clientHello(""), serverHello(0x0303)
	// Seen from the server: ClientHello received, ServerHello sent.
	tk.Handle(dataRecord(probes.DirRecv, 3, 1, 10, len(ch), ch, srvAddr, cliAddr))
	tk.Handle(dataRecord(probes.DirSend, 3, 2, 90, len(sh), sh, srvAddr, cliAddr))
	tk.Handle(tlsRecord(probes.SourceOpenSSL, probes.DirRecv, 3, 3, req, 0x0303))
	tk.Handle(tlsRecord(probes.SourceOpenSSL, probes.DirSend, 3, 4, resp, 0x0303))
	if len(s.got) != 1 || s.got[0].Kind != spans.Server || s.got[0].Tx.StatusCode != 200 {
		t.Fatalf("%s", describeAll(s.got))
	}
	if x := s.got[0]; x.TLS == nil || x.TLS.Version != "1.2" || x.TLS.ServerName != "" || x.Client != cliAddr {
		t.Errorf("TLS %+v client %s", x.TLS, x.Client)
	}
}

// Kernel TLS and OpenSSL on one socket both see the plaintext: the first
// source keeps the connection, the other's events are counted and dropped.
func TestDuplicatePlaintextSources(t *testing.T) {
	tk, s := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 4, 1, cliAddr, srvAddr))
	tk.Handle(tlsRecord(probes.SourceKTLS, probes.DirSend, 4, 2, req, 0x0303))
	tk.Handle(tlsRecord(probes.SourceOpenSSL, probes.DirSend, 4, 3, req, 0x0303))
	tk.Handle(tlsRecord(probes.SourceKTLS, probes.DirRecv, 4, 4, resp, 0x0303))
	tk.Handle(tlsRecord(probes.SourceOpenSSL, probes.DirRecv, 4, 5, resp, 0x0303))
	if len(s.got) != 1 || s.got[0].PayloadSource != "ktls" || s.got[0].TLS == nil || s.got[0].TLS.Version != "1.2" ||
		s.got[0].Tx.ReqEnd != 2 || s.got[0].Tx.RespEnd != 4 {
		t.Fatalf("%s", describeAll(s.got))
	}
	if st := tk.Stats(); st.DuplicatePlaintext != 2 || st.PlaintextEvents != 4 {
		t.Errorf("stats %+v", st)
	}
}

// TLS without any plaintext source gives no span and no garbage: the
// encrypted bytes are not fed to an analyzer.
func TestTLSWithoutPlaintext(t *testing.T) {
	tk, s := newTestTracker(Config{})
	ch, sh := clientHello("a.example"), serverHello(0x0304)
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 5, 1, cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirSend, 5, 2, 0, len(ch), ch, cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirRecv, 5, 3, 0, len(sh), sh, cliAddr, srvAddr))
	for i := 0; i < 10; i++ {
		ct := appData(100)
		tk.Handle(dataRecord(probes.DirSend, 5, uint64(4+i), uint32(len(ch)+i*len(ct)), len(ct), ct, cliAddr, srvAddr))
	}
	tk.Handle(connRecord(probes.EventConnClose, 0, 5, 20, cliAddr, srvAddr))
	if st := tk.Stats(); len(s.got) != 0 || st.TLSConns != 1 || st.Unrecognized != 0 || st.GarbageBytes != 0 {
		t.Errorf("%d sessions, stats %+v", len(s.got), st)
	}
}

// Plain HTTP on the socket says so.
func TestPlainSocketSource(t *testing.T) {
	tk, s := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 6, 1, cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirSend, 6, 2, 0, len(req), []byte(req), cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirRecv, 6, 3, 0, len(resp), []byte(resp), cliAddr, srvAddr))
	if len(s.got) != 1 || s.got[0].PayloadSource != "socket" || s.got[0].TLS != nil {
		t.Fatalf("%s", describeAll(s.got))
	}
}

func hasAttr(s *spans.Session, key, value string) bool {
	for _, kv := range s.Tx.AllAttrs() {
		if string(kv.Key) == key && kv.Value.Emit() == value {
			return true
		}
	}
	return false
}
