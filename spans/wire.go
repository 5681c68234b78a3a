package spans

import (
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// Wire is what tc programs saw of one exchange on one network interface:
// counts per direction (request: client to server), TCP flags, the
// handshake's round trip, and why the record ended.
type Wire struct {
	// Interface is the interface's name (network.interface.name).
	Interface string
	// Request and Response are the exchange's packets in each direction.
	Request, Response WireDirection
	// HandshakeRTT is the time from the client's SYN to the server's
	// SYN-ACK on this interface (0 when the handshake was not seen). On
	// a server pod's veth it is the server's own delay; on a client's,
	// the round trip to the server.
	HandshakeRTT time.Duration
	// End says why the record was made: "next_request" (keep-alive),
	// "fin", "rst" or "reused" (a new SYN on the same addresses).
	End string
	// SeenFrom says how the connection was first seen: "syn", "synack"
	// or "midstream" (already open when tracing began).
	SeenFrom string
	// RolesGuessed is set when nothing said which end is the server (a
	// connection picked up midstream with no table matching it): the end
	// with the lower port was taken for the server.
	RolesGuessed bool
	// Workload names the workload of the exchange's end behind the
	// interface (the pod of a pod veth, the local workload on a node
	// NIC): the span's service.name. "" names the service after the
	// interface.
	Workload string
}

// WireDirection counts one direction of an exchange.
type WireDirection struct {
	// Bytes are IP bytes; a GSO/GRO packet counts its headers once per
	// segment, as they go on the wire.
	Bytes uint64
	// Packets are wire packets (GSO/GRO segments).
	Packets uint64
	// PayloadBytes are TCP payload bytes, retransmissions included.
	PayloadBytes uint64
	// RetransPackets counts packets with payload at or below the highest
	// sequence number seen before them (retransmissions, or reordering);
	// RetransBytes are the payload bytes sent more than once.
	RetransPackets, RetransBytes uint64
	// TCPFlags are the TCP flags seen (FIN 0x01, SYN 0x02, RST 0x04, PSH
	// 0x08, ACK 0x10, URG 0x20, ECE 0x40, CWR 0x80).
	TCPFlags uint8
}

// Attributes of wire sessions. The per-direction ones exist for
// "request" and "response": clovisor.request.bytes, ...
const (
	AttrHandshakeRTT = attribute.Key("clovisor.tcp.handshake_rtt_ns")
	AttrExchangeEnd  = attribute.Key("clovisor.exchange.end")
	AttrSeenFrom     = attribute.Key("clovisor.connection.seen_from")
	AttrRolesGuessed = attribute.Key("clovisor.connection.roles_guessed")
)

// wireDirKeys are the per-direction attribute keys.
type wireDirKeys struct {
	bytes, packets, payload, rpackets, rbytes, flags attribute.Key
}

func dirKeys(dir string) wireDirKeys {
	p := "clovisor." + dir + "."
	return wireDirKeys{
		bytes:    attribute.Key(p + "bytes"),
		packets:  attribute.Key(p + "packets"),
		payload:  attribute.Key(p + "payload_bytes"),
		rpackets: attribute.Key(p + "retransmitted_packets"),
		rbytes:   attribute.Key(p + "retransmitted_bytes"),
		flags:    attribute.Key(p + "tcp_flags"),
	}
}

var reqKeys, respKeys = dirKeys("request"), dirKeys("response")

// isWireKey reports whether k is one of the keys appendWire adds.
func isWireKey(k attribute.Key) bool {
	switch k {
	case semconv.NetworkInterfaceNameKey, semconv.ClientAddressKey, semconv.ClientPortKey,
		AttrHandshakeRTT, AttrExchangeEnd, AttrSeenFrom, AttrRolesGuessed:
		return true
	}
	s := string(k)
	return strings.HasPrefix(s, "clovisor.request.") || strings.HasPrefix(s, "clovisor.response.")
}

// wireAttrCount is the number of attributes appendWire adds.
func wireAttrCount(s *Session) int {
	w := s.Wire
	n := 2*6 + b2i(w.Interface != "") + b2i(w.HandshakeRTT > 0) + b2i(w.End != "") + b2i(w.SeenFrom != "") +
		b2i(w.RolesGuessed)
	if s.Client.Addr().IsValid() && s.Kind != Server {
		n += 2
	}
	return n
}

// appendWire adds the attributes of a wire session: the interface, the
// client's address (a SERVER span has it already), and the L3/L4 facts
// under clovisor.
func appendWire(a []attribute.KeyValue, s *Session, client string) []attribute.KeyValue {
	w := s.Wire
	if w.Interface != "" {
		a = append(a, semconv.NetworkInterfaceName(w.Interface))
	}
	if s.Client.Addr().IsValid() && s.Kind != Server {
		a = append(a, semconv.ClientAddress(client), semconv.ClientPort(int(s.Client.Port())))
	}
	for _, d := range [2]struct {
		k wireDirKeys
		v *WireDirection
	}{{reqKeys, &w.Request}, {respKeys, &w.Response}} {
		a = append(a,
			d.k.bytes.Int64(int64(d.v.Bytes)),
			d.k.packets.Int64(int64(d.v.Packets)),
			d.k.payload.Int64(int64(d.v.PayloadBytes)),
			d.k.rpackets.Int64(int64(d.v.RetransPackets)),
			d.k.rbytes.Int64(int64(d.v.RetransBytes)),
			d.k.flags.String(TCPFlagsString(d.v.TCPFlags)),
		)
	}
	if w.HandshakeRTT > 0 {
		a = append(a, AttrHandshakeRTT.Int64(int64(w.HandshakeRTT)))
	}
	if w.End != "" {
		a = append(a, AttrExchangeEnd.String(w.End))
	}
	if w.SeenFrom != "" {
		a = append(a, AttrSeenFrom.String(w.SeenFrom))
	}
	if w.RolesGuessed {
		a = append(a, AttrRolesGuessed.Bool(true))
	}
	return a
}

var tcpFlagNames = [8]string{"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}

// TCPFlagsString names TCP flags as "SYN|ACK" (in bit order), "" for none.
func TCPFlagsString(f uint8) string {
	switch f {
	case 0:
		return ""
	case 0x10:
		return "ACK"
	case 0x18:
		return "PSH|ACK"
	case 0x12:
		return "SYN|ACK"
	case 0x1a:
		return "SYN|PSH|ACK"
	case 0x1b:
		return "FIN|SYN|PSH|ACK"
	case 0x19:
		return "FIN|PSH|ACK"
	}
	var sb strings.Builder
	for i, n := range tcpFlagNames {
		if f&(1<<i) != 0 {
			if sb.Len() > 0 {
				sb.WriteByte('|')
			}
			sb.WriteString(n)
		}
	}
	return sb.String()
}

// wireService is the service of a wire session's span: its workload, else
// its interface.
func wireService(s *Session) service {
	switch {
	case s.Wire.Workload != "":
		return service{name: s.Wire.Workload}
	case s.Wire.Interface != "":
		return service{name: s.Wire.Interface}
	}
	return service{name: "unknown_service"}
}
