package gobin

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"go/version"
)

// TLSLayout says where uprobes on crypto/tls.(*Conn).Read and Write find
// the connection's socket descriptor and TLS version in a Go program's
// memory (64-bit targets). The descriptor is reached from the *tls.Conn
// receiver through
//
//	tls.Conn.conn       net.Conn interface: {itab, data}
//	itab.hash           the dynamic type's hash: must be *net.TCPConn's
//	data -> net.TCPConn{conn{fd *netFD}}
//	netFD{pfd poll.FD{fdmu fdMutex; Sysfd int}}
type TLSLayout struct {
	// ConnConn is the offset of tls.Conn.conn, ConnVers of tls.Conn.vers
	// (uint16: the negotiated protocol version, 0x0303 or 0x0304),
	// ConnHandshakeDone of tls.Conn.isHandshakeComplete (an atomic.Bool:
	// a uint32, not 0 once the handshake has succeeded).
	ConnConn, ConnVers, ConnHandshakeDone uint64
	// ITabHash is the offset of the type hash in an itab (runtime.itab's
	// hash, internal/abi.ITab's Hash since Go 1.22).
	ITabHash uint64
	// TCPConnFD is the offset of the *netFD in a net.TCPConn (its
	// embedded net.conn's fd), NetFDSysfd of pfd.Sysfd in a net.netFD.
	TCPConnFD, NetFDSysfd uint64
	// TCPConnHash is the type hash of *net.TCPConn, the value ITabHash
	// holds in the itab of a net.Conn whose dynamic type it is.
	TCPConnHash uint32
}

// tlsLayouts are the layouts by Go release range [from, to), checked
// against the DWARF of binaries built by each Go release in the ranges
// (go1.21.13, go1.22.12, go1.23.12, go1.24.13, go1.25.7, go1.26.8) and, in
// the tests, of binaries those tests build. Releases outside the ranges
// are refused rather than guessed: a wrong offset yields no events or
// events of the wrong connection.
var tlsLayouts = []struct {
	from, to string
	layout   TLSLayout
	// typeHash is the compiler's type hash of that release
	// (cmd/compile/internal/types.TypeHash of the type's link string).
	typeHash func(linkString string) uint32
}{
	{"go1.21", "go1.24", tlsLayout121, typeHashNotSHA256},
	{"go1.24", "go1.25", tlsLayout121, typeHashSum16},
	{"go1.25", "go1.27", tlsLayout121, typeHashSum32},
}

// tlsLayout121 is the layout from Go 1.21 (which added tls.Conn.quic)
// to at least Go 1.26.
var tlsLayout121 = TLSLayout{ConnConn: 0, ConnVers: 72, ConnHandshakeDone: 40, ITabHash: 16, TCPConnFD: 0, NetFDSysfd: 16}

// TLSLayoutFor returns the layout of crypto/tls and net in binaries built
// by Go release goVersion (e.g. "go1.22.12").
func TLSLayoutFor(goVersion string) (TLSLayout, error) {
	for _, r := range tlsLayouts {
		if version.Compare(goVersion, r.from) >= 0 && version.Compare(goVersion, r.to) < 0 {
			l := r.layout
			l.TCPConnHash = r.typeHash("*net.TCPConn")
			return l, nil
		}
	}
	return TLSLayout{}, fmt.Errorf("built by %s: the crypto/tls and net struct layouts are known for Go %s to %s only",
		goVersion, tlsLayouts[0].from, lastRelease(tlsLayouts[len(tlsLayouts)-1].to))
}

// lastRelease names the release before the exclusive bound v ("go1.27"
// -> "go1.26").
func lastRelease(v string) string {
	var minor int
	if _, err := fmt.Sscanf(v, "go1.%d", &minor); err != nil {
		return "before " + v
	}
	return fmt.Sprintf("go1.%d", minor-1)
}

// typeHashNotSHA256 is the type hash of Go 1.20 to 1.23: the first 4 bytes
// of the complement of SHA-256 (cmd/internal/notsha256), little-endian.
func typeHashNotSHA256(s string) uint32 {
	h := sha256.Sum256([]byte(s))
	return ^binary.LittleEndian.Uint32(h[:4])
}

// typeHashSum16 is Go 1.24's: cmd/internal/hash.Sum16, bytes 8 to 24 of
// SHA-256 (with byte 0 flipped, which Sum16 drops).
func typeHashSum16(s string) uint32 {
	h := sha256.Sum256([]byte(s))
	return binary.LittleEndian.Uint32(h[8:12])
}

// typeHashSum32 is Go 1.25's and later: cmd/internal/hash.Sum32, SHA-256
// with byte 0 complemented.
func typeHashSum32(s string) uint32 {
	h := sha256.Sum256([]byte(s))
	h[0] ^= 0xff
	return binary.LittleEndian.Uint32(h[:4])
}
