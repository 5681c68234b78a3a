package tcsessions

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/spans"
)

// Direction counts one direction of an exchange.
type Direction struct {
	// Bytes are IP bytes (a GSO/GRO packet counts its headers once per
	// segment); Packets are wire packets.
	Bytes, Packets uint64
	// PayloadBytes are TCP payload bytes, retransmissions included.
	PayloadBytes uint64
	// NewBytes is how far the direction's stream advanced: its bytes
	// counted once, whatever was retransmitted or reordered. Over a whole
	// connection seen from its SYN it is exactly what the sender's
	// application wrote and the receiver's read.
	NewBytes uint64
	// RetransPackets counts packets with payload at or below the highest
	// sequence seen before them: retransmissions, or packets reordered on
	// the way (also between the CPUs of one host).
	RetransPackets uint64
	// Flags are the TCP flags seen (FIN 0x01 ... CWR 0x80).
	Flags uint8
}

// RetransBytes are the payload bytes that were sent again: PayloadBytes
// beyond NewBytes.
func (d Direction) RetransBytes() uint64 {
	if d.PayloadBytes < d.NewBytes {
		return 0
	}
	return d.PayloadBytes - d.NewBytes
}

// Exchange is one request/response exchange of a TCP connection as the tc
// programs saw it on one interface. Timestamps are the kernel's
// CLOCK_MONOTONIC in ns (0: not seen).
type Exchange struct {
	Interface string
	Ifindex   int
	Role      Role
	// Client and Server: the client is the end that sent the SYN (or, for
	// connections seen midstream, what the tables say, see RolesGuessed).
	Client, Server netip.AddrPort
	// Protocol is the name of the table entry that selected the
	// connection ("tcp" when none did).
	Protocol string
	// Index is the exchange's place on the connection (0, 1, ...).
	Index int
	// ConnStart is when the connection was first seen (with the tuple and
	// the interface, its identity).
	ConnStart uint64
	// SYN and SYNACK: the client's first SYN and the server's first
	// SYN-ACK (a retransmitted SYN's wait is between them).
	SYN, SYNACK uint64
	// ReqFirst, ReqLast, RespFirst, RespLast: the first and last packet
	// with new payload in each direction.
	ReqFirst, ReqLast, RespFirst, RespLast uint64
	// EndTS is when the record was made.
	EndTS uint64
	End   End
	Phase Phase
	// ConnFlags are the kernel's connection flags (Conn*).
	ConnFlags         uint32
	Request, Response Direction
	// RequestPrefix and ResponsePrefix are the captured starts of the
	// first new payload of each direction of an exchange no analyzer
	// read (nil when none arrived, or when Tx is set).
	RequestPrefix, ResponsePrefix []byte
	// Tx is the L7 transaction the analyzers read (nil when the payload
	// was not recognised, e.g. TLS).
	Tx *protocols.Transaction
	// ReqSeq0 is the TCP sequence number of the client's first byte,
	// when the SYN or SYN-ACK was seen (ConnSeq0).
	ReqSeq0 uint32
	// Workload names the workload of the exchange's end inside the pod
	// or the node (see ClientInside), "" when unknown.
	Workload string

	// pieceIdx is the wire exchange all the counted pieces came from,
	// -1 when mixed, 0 with none counted (+1 offset).
	pieceIdx int64
}

// EndPipelined: the record is one of several transactions the wire saw in
// one exchange (pipelined requests), not its last.
const EndPipelined End = 101

// ClientInside reports whether the exchange's client is the end behind the
// interface: inside the pod for a pod veth (its packets come in at the
// host side's ingress), inside the node for a node NIC (its packets leave
// through the NIC's egress).
func (x *Exchange) ClientInside() bool {
	in := x.ConnFlags&ConnClientIngress != 0
	if x.Role == RoleNode {
		return !in
	}
	return in
}

func (x *Exchange) dir(d int) *Direction {
	if d == 0 {
		return &x.Request
	}
	return &x.Response
}

func (x *Exchange) notePiece(k uint32) {
	switch x.pieceIdx {
	case 0:
		x.pieceIdx = int64(k) + 1
	case int64(k) + 1, -1:
	default:
		x.pieceIdx = -1
	}
}

// single reports whether every piece counted came from wire exchange k.
func (x *Exchange) single(k uint32) bool { return x.pieceIdx == int64(k)+1 }

// HandshakeRTT is the client's first SYN to the server's first SYN-ACK on
// the interface (0 when not seen): the round trip, plus the waits of
// retransmitted SYNs, which the client waited too.
func (x *Exchange) HandshakeRTT() time.Duration {
	if x.SYN == 0 || x.SYNACK < x.SYN {
		return 0
	}
	return time.Duration(x.SYNACK - x.SYN)
}

// RolesGuessed reports whether the server was taken to be the end with the
// lower port because nothing else said.
func (x *Exchange) RolesGuessed() bool { return x.ConnFlags&ConnRolesGuessed != 0 }

func (x *Exchange) seenFrom() string {
	switch {
	case x.ConnFlags&ConnFromSYN != 0:
		return "syn"
	case x.ConnFlags&ConnFromSYNACK != 0:
		return "synack"
	case x.ConnFlags&ConnFromMidstream != 0:
		return "midstream"
	}
	return ""
}

func dirOf(c tcDirCounters, flags uint32) Direction {
	return Direction{
		Bytes: c.Bytes, Packets: c.Packets, PayloadBytes: c.PayloadBytes,
		NewBytes: c.NewBytes, RetransPackets: c.RetransPackets, Flags: uint8(flags),
	}
}

// ErrorTCPReset is the error.type of an exchange without L7 that ended
// with a RST before its response was complete.
const ErrorTCPReset = "tcp_reset"

// transaction returns the exchange's transaction: the analyzer's, with the
// wire's timestamps, or one built from the L4 facts.
func (x *Exchange) transaction() *protocols.Transaction {
	if x.Tx != nil {
		return x.Tx
	}
	tx := &protocols.Transaction{
		Protocol:  x.Protocol,
		Name:      x.Protocol,
		ReqStart:  x.ReqFirst,
		ReqEnd:    x.ReqLast,
		RespStart: x.RespFirst,
		RespEnd:   x.RespLast,
		ReqBytes:  int64(x.Request.NewBytes),
		RespBytes: int64(x.Response.NewBytes),
	}
	if tx.ReqStart == 0 && tx.RespStart == 0 {
		// No payload: the connection's life on the wire.
		tx.ReqStart = x.ConnStart
		tx.ReqEnd = x.EndTS
	}
	tx.NoResponse = x.Phase != PhaseResponse
	if x.End == EndRST && x.Phase != PhaseResponse {
		tx.ErrorType = ErrorTCPReset
		tx.ServerFault = true
	}
	tx.Summary = fmt.Sprintf("%s %d/%dB %s", x.Protocol, tx.ReqBytes, tx.RespBytes, x.End)
	return tx
}

// Session returns the exchange as a span's session: Point pod_veth or
// node_nic, the L3/L4 facts in Wire, the L7 transaction when the payload
// was recognised. Its Kind is the side the end behind the interface plays
// (see ClientInside); when the connection was seen from its SYN or SYN-ACK
// it carries the first request byte's sequence number (ConnTag) and its
// index, as the socket sessions of the same exchange do, so that its span
// joins their trace (see the spans package); else Index is -1.
func (x *Exchange) Session() *spans.Session {
	point := spans.PointPodVeth
	if x.Role == RoleNode {
		point = spans.PointNodeNIC
	}
	s := &spans.Session{
		Point:     point,
		Kind:      spans.Server,
		Client:    x.Client,
		Server:    x.Server,
		Transport: "tcp",
		ConnID:    x.ConnStart,
		Index:     -1,
		Tx:        x.transaction(),
		Wire: &spans.Wire{
			Interface:    x.Interface,
			Request:      wireDir(x.Request),
			Response:     wireDir(x.Response),
			HandshakeRTT: x.HandshakeRTT(),
			End:          x.End.String(),
			SeenFrom:     x.seenFrom(),
			RolesGuessed: x.RolesGuessed(),
			Workload:     x.Workload,
		},
	}
	if x.ClientInside() {
		s.Kind = spans.Client
	}
	if x.ConnFlags&ConnSeq0 != 0 {
		s.Index = x.Index
		s.ConnTag = ConnTag(x.ReqSeq0)
	}
	return s
}

// ConnTag is spans.Session.ConnTag for a connection whose client's first
// byte has TCP sequence number seq (the socket tracer's form).
func ConnTag(seq uint32) uint64 { return 1<<32 | uint64(seq) }

func wireDir(d Direction) spans.WireDirection {
	return spans.WireDirection{
		Bytes: d.Bytes, Packets: d.Packets, PayloadBytes: d.PayloadBytes,
		RetransPackets: d.RetransPackets, RetransBytes: d.RetransBytes(), TCPFlags: d.Flags,
	}
}
