// Package tlsrec recognises TLS records in a byte stream and reads the
// unencrypted facts of a handshake from its hello messages: the protocol
// version the server chose, its cipher suite, and the server name the
// client asked for. It never decrypts anything.
package tlsrec

import (
	"crypto/tls"
	"encoding/binary"
)

// Record content types (RFC 8446 section 5.1).
const (
	typeChangeCipherSpec = 20
	typeAlert            = 21
	typeHandshake        = 22
	typeApplicationData  = 23
)

// Handshake message types.
const (
	msgClientHello = 1
	msgServerHello = 2
)

// Extension types.
const (
	extServerName        = 0
	extSupportedVersions = 43
)

// IsRecord reports whether b starts with a TLS record header: a known
// content type, major version 3 and a length within the protocol's limit.
// A plaintext protocol's bytes (text, or binary protocols starting with
// their own framing) do not look like this.
func IsRecord(b []byte) bool {
	if len(b) < 5 {
		return false
	}
	if b[0] < typeChangeCipherSpec || b[0] > typeApplicationData || b[1] != 3 || b[2] > 4 {
		return false
	}
	n := int(binary.BigEndian.Uint16(b[3:5]))
	return n > 0 && n <= 1<<14+2048
}

// Hello holds what the hello messages of a handshake say in the clear.
type Hello struct {
	// Version is the negotiated protocol version (0x0303 for TLS 1.2,
	// 0x0304 for TLS 1.3), from the ServerHello; 0 until one is seen.
	Version uint16
	// CipherSuite is the server's choice (IANA number); 0 until seen.
	CipherSuite uint16
	// ServerName is the client's SNI, "" when none was sent.
	ServerName string
	// ClientHello and ServerHello tell which messages were read.
	ClientHello, ServerHello bool
}

// VersionName is "1.0" ... "1.3" for a TLS version number, "" for others.
func VersionName(v uint16) string {
	switch v {
	case 0x0301:
		return "1.0"
	case 0x0302:
		return "1.1"
	case 0x0303:
		return "1.2"
	case 0x0304:
		return "1.3"
	}
	return ""
}

// CipherName is the IANA name of a cipher suite ("" when unknown).
func CipherName(id uint16) string {
	if id == 0 {
		return ""
	}
	for _, s := range tls.CipherSuites() {
		if s.ID == id {
			return s.Name
		}
	}
	for _, s := range tls.InsecureCipherSuites() {
		if s.ID == id {
			return s.Name
		}
	}
	return ""
}

// Read reads the hello messages in the records at the start of b (the
// first bytes one side sent) into h. It reads only what b holds: a hello
// cut short by the capture is skipped, never misread. It reports whether
// it learned anything.
func (h *Hello) Read(b []byte) bool {
	learned := false
	for IsRecord(b) {
		n := int(binary.BigEndian.Uint16(b[3:5]))
		body := b[5:]
		if len(body) > n {
			body = body[:n]
		}
		if b[0] == typeHandshake && h.readHandshake(body) {
			learned = true
		}
		if len(b) < 5+n {
			break
		}
		b = b[5+n:]
	}
	return learned
}

// readHandshake reads a hello message at the start of a handshake
// record's body.
func (h *Hello) readHandshake(b []byte) bool {
	if len(b) < 4 {
		return false
	}
	n := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
	msg := b[4:]
	if len(msg) < n {
		return false // cut short: nothing is read from a partial hello
	}
	msg = msg[:n]
	switch b[0] {
	case msgClientHello:
		return h.readClientHello(msg)
	case msgServerHello:
		return h.readServerHello(msg)
	}
	return false
}

// reader walks a message, failing (ok=false) on the first short read.
type reader struct {
	b  []byte
	ok bool
}

func (r *reader) skip(n int) {
	if !r.ok || len(r.b) < n {
		r.ok = false
		return
	}
	r.b = r.b[n:]
}

func (r *reader) u8() int {
	if !r.ok || len(r.b) < 1 {
		r.ok = false
		return 0
	}
	v := int(r.b[0])
	r.b = r.b[1:]
	return v
}

func (r *reader) u16() int {
	if !r.ok || len(r.b) < 2 {
		r.ok = false
		return 0
	}
	v := int(binary.BigEndian.Uint16(r.b))
	r.b = r.b[2:]
	return v
}

func (r *reader) bytes(n int) []byte {
	if !r.ok || len(r.b) < n {
		r.ok = false
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

// extensions calls fn for each extension of an extensions block.
func (r *reader) extensions(fn func(typ int, data []byte)) {
	if !r.ok || len(r.b) == 0 {
		return // hellos may end without extensions
	}
	ext := &reader{b: r.bytes(r.u16()), ok: r.ok}
	for ext.ok && len(ext.b) >= 4 {
		typ := ext.u16()
		data := ext.bytes(ext.u16())
		if ext.ok {
			fn(typ, data)
		}
	}
}

func (h *Hello) readClientHello(msg []byte) bool {
	r := &reader{b: msg, ok: true}
	r.skip(2 + 32)  // legacy_version, random
	r.skip(r.u8())  // legacy_session_id
	r.skip(r.u16()) // cipher_suites
	r.skip(r.u8())  // legacy_compression_methods
	if !r.ok {
		return false
	}
	r.extensions(func(typ int, data []byte) {
		if typ != extServerName {
			return
		}
		// server_name_list: (name_type, host_name)*
		list := &reader{b: data, ok: true}
		names := &reader{b: list.bytes(list.u16()), ok: list.ok}
		for names.ok && len(names.b) >= 3 {
			typ := names.u8()
			name := names.bytes(names.u16())
			if names.ok && typ == 0 && validHostName(name) {
				h.ServerName = string(name)
				return
			}
		}
	})
	h.ClientHello = true
	return true
}

func (h *Hello) readServerHello(msg []byte) bool {
	r := &reader{b: msg, ok: true}
	version := r.u16()
	r.skip(32)     // random
	r.skip(r.u8()) // legacy_session_id_echo
	suite := r.u16()
	r.skip(1) // legacy_compression_method
	if !r.ok {
		return false
	}
	r.extensions(func(typ int, data []byte) {
		if typ == extSupportedVersions && len(data) == 2 {
			version = int(binary.BigEndian.Uint16(data))
		}
	})
	h.Version = uint16(version)
	h.CipherSuite = uint16(suite)
	h.ServerHello = true
	return true
}

// validHostName accepts the bytes of a DNS name as sent in SNI: letters,
// digits, '-', '.', '_' and at most 253 of them.
func validHostName(b []byte) bool {
	if len(b) == 0 || len(b) > 253 {
		return false
	}
	for _, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_':
		default:
			return false
		}
	}
	return true
}
