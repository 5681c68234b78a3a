package spans

import (
	"net/netip"

	"github.com/clovisor/clovisor/protocols"
)

// Kind says which side of a connection a session was seen from.
type Kind uint8

const (
	// Server: the traced process accepted the connection.
	Server Kind = iota + 1
	// Client: the traced process connected.
	Client
)

// Point names where Clovisor saw the bytes (clovisor.point).
type Point string

const (
	PointSocket Point = "socket"
	// PointPodVeth: tc programs on the host side of a pod's veth.
	PointPodVeth Point = "pod_veth"
	// PointNodeNIC: tc programs on a node's network interface.
	PointNodeNIC Point = "node_nic"
)

// Process is the traced process that owns the socket.
type Process struct {
	PID  uint32 // thread-group id (what ps calls the pid)
	Comm string // kernel comm, the executable name truncated to 15 bytes
	// Exe is the executable's base name when user space could read it
	// (longer than Comm), "" otherwise.
	Exe string
}

// Session is one request/response exchange on one connection, as one point
// of visibility saw it: the unit Clovisor exports as one span.
type Session struct {
	Point Point
	Kind  Kind
	// Client and Server are the two ends of the connection. Client is
	// the side that connected.
	Client, Server netip.AddrPort
	// Transport is "tcp" or "udp".
	Transport string

	Process Process
	// CgroupID is the inode of the socket owner's cgroup v2 directory;
	// CgroupPath its path below the cgroup2 mount ("" if unknown).
	CgroupID   uint64
	CgroupPath string

	// ConnID identifies the connection (the socket cookie), Index the
	// exchange's place on it (0, 1, ...), so that the two ends of one
	// exchange can be tied together.
	ConnID uint64
	Index  int
	// ConnTag, when non-zero, is a value both ends of the connection
	// observe identically, such as the client's TCP initial sequence number
	// (the server learns it from the SYN). It is mixed into the IDs that
	// link the two ends of an exchange (see the package doc), so that a
	// later connection reusing the same address pair is not taken for this
	// one. Both ends must fill it the same way, or both leave it 0.
	ConnTag uint64

	Tx *protocols.Transaction

	// PayloadSource, for socket sessions, is where the plaintext the
	// analyzer read came from: "socket" (the socket calls' own buffers),
	// "openssl", "go_tls" (uprobes on a TLS library) or "ktls" (a socket
	// with kernel TLS). Empty for wire sessions.
	PayloadSource string
	// TLS describes the connection's TLS, nil when it was not TLS (as far
	// as was seen). It is not modified once a Session holds it.
	TLS *TLSInfo

	// Wire, set for sessions seen on the wire (Point PointPodVeth or
	// PointNodeNIC), holds the L3/L4 facts of the exchange; see wire.go
	// for the attributes it adds. Such sessions have no Process and no
	// cgroup: their spans carry neither process.* nor clovisor.cgroup.*
	// attributes. nil for socket-level sessions.
	Wire *Wire
}

// TLSInfo is what is known of a connection's TLS.
type TLSInfo struct {
	// Version is "1.2", "1.3", ... ("" when not known).
	Version string
	// Cipher is the cipher suite's IANA name ("" when not known).
	Cipher string
	// ServerName is the server name the client asked for (SNI).
	ServerName string
}
