package tcsessions

import (
	"encoding/binary"
	"net/netip"
)

// TCP flag bits.
const (
	fFIN = 0x01
	fSYN = 0x02
	fRST = 0x04
	fPSH = 0x08
	fACK = 0x10
)

// seg describes one crafted TCP/IP packet in an Ethernet frame.
type seg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	payload  []byte
	// tcpOpts are TCP options (padded to 4 bytes).
	tcpOpts []byte
	// ipOpts are IPv4 options (padded to 4 bytes).
	ipOpts []byte
	// ext are IPv6 extension headers before the TCP header, each given
	// as (next-header value of this header, its bytes without the
	// next-header byte filled in).
	ext []ext6
}

type ext6 struct {
	kind uint8 // 0 hop-by-hop, 43 routing, 60 destination options, 51 AH
	body []byte
}

// hopByHop is an 8-byte hop-by-hop header with PadN (next header filled
// in by build).
func hopByHop() ext6 { return ext6{0, []byte{0, 0, 1, 4, 0, 0, 0, 0}} }

// destOpts is a 16-byte destination options header.
func destOpts() ext6 {
	return ext6{60, []byte{0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}
}

// routing0 is an 8-byte routing header (type 0, segments left 0: ignored by
// hosts) without addresses.
func routing0() ext6 { return ext6{43, []byte{0, 0, 0, 0, 0, 0, 0, 0}} }

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// tcpBytes is the TCP header and payload.
func (s seg) tcpBytes() []byte {
	opts := pad4(append([]byte(nil), s.tcpOpts...))
	h := make([]byte, 20+len(opts))
	binary.BigEndian.PutUint16(h[0:], s.src.Port())
	binary.BigEndian.PutUint16(h[2:], s.dst.Port())
	binary.BigEndian.PutUint32(h[4:], s.seq)
	binary.BigEndian.PutUint32(h[8:], s.ack)
	h[12] = byte(len(h)/4) << 4
	h[13] = s.flags
	binary.BigEndian.PutUint16(h[14:], 65535)
	copy(h[20:], opts)
	return append(h, s.payload...)
}

// frame is the whole Ethernet frame.
func (s seg) frame() []byte {
	return ipFrame(s.src.Addr(), s.dst.Addr(), 6, s.tcpBytes(), s.ipOpts, s.ext, nil)
}

// frag describes a fragment of an IP packet.
type frag struct {
	offset int // bytes, a multiple of 8
	more   bool
	id     uint32
}

// fragments splits the TCP bytes of s into IP fragments at the given
// offsets (multiples of 8) and returns their frames.
func (s seg) fragments(cuts ...int) [][]byte {
	l4 := s.tcpBytes()
	var out [][]byte
	bounds := append(append([]int{0}, cuts...), len(l4))
	for i := 0; i+1 < len(bounds); i++ {
		f := &frag{offset: bounds[i], more: i+2 < len(bounds), id: 0x1234}
		out = append(out, ipFrame(s.src.Addr(), s.dst.Addr(), 6, l4[bounds[i]:bounds[i+1]], s.ipOpts, s.ext, f))
	}
	return out
}

var (
	srcMAC = []byte{0x02, 0, 0, 0, 0, 1}
	dstMAC = []byte{0x02, 0, 0, 0, 0, 2}
)

// ipFrame builds Ethernet + IPv4/IPv6 around l4 (IPv4 options and IPv6
// extension headers as given, an IPv4 fragment or an IPv6 fragment header
// when f is set).
func ipFrame(src, dst netip.Addr, proto uint8, l4 []byte, ipOpts []byte, ext []ext6, f *frag) []byte {
	eth := append(append(append([]byte(nil), dstMAC...), srcMAC...), 0, 0)
	if src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		opts := pad4(append([]byte(nil), ipOpts...))
		h := make([]byte, 20+len(opts))
		h[0] = 0x40 | byte(len(h)/4)
		binary.BigEndian.PutUint16(h[2:], uint16(len(h)+len(l4)))
		if f != nil {
			binary.BigEndian.PutUint16(h[4:], uint16(f.id))
			fo := uint16(f.offset / 8)
			if f.more {
				fo |= 0x2000
			}
			binary.BigEndian.PutUint16(h[6:], fo)
		} else {
			binary.BigEndian.PutUint16(h[6:], 0x4000) // DF
		}
		h[8] = 64
		h[9] = proto
		s4, d4 := src.As4(), dst.As4()
		copy(h[12:], s4[:])
		copy(h[16:], d4[:])
		copy(h[20:], opts)
		var sum uint32
		for i := 0; i < len(h); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(h[i:]))
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		binary.BigEndian.PutUint16(h[10:], ^uint16(sum))
		return append(append(eth, h...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86DD)
	// Extension headers, each pointing to the next; a fragment header
	// goes last (before the L4 header).
	chain := append([]ext6(nil), ext...)
	if f != nil {
		fh := make([]byte, 8)
		fo := uint16(f.offset/8) << 3
		if f.more {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], f.id)
		chain = append(chain, ext6{44, fh})
	}
	var exts []byte
	first := proto
	if len(chain) > 0 {
		first = chain[0].kind
	}
	for i, e := range chain {
		b := append([]byte(nil), e.body...)
		if i+1 < len(chain) {
			b[0] = chain[i+1].kind
		} else {
			b[0] = proto
		}
		exts = append(exts, b...)
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(exts)+len(l4)))
	h[6] = first
	h[7] = 64
	s6, d6 := src.As16(), dst.As16()
	copy(h[8:], s6[:])
	copy(h[24:], d6[:])
	return append(append(append(eth, h...), exts...), l4...)
}

// conv is a TCP conversation between a client and a server, keeping the
// sequence numbers of both.
type conv struct {
	client, server       netip.AddrPort
	cseq, sseq           uint32
	ipOpts               []byte
	ext                  []ext6
	clientISN, serverISN uint32
}

func newConv(client, server string) *conv {
	c := &conv{client: netip.MustParseAddrPort(client), server: netip.MustParseAddrPort(server),
		clientISN: 1000, serverISN: 0xffffffe0} // the server's sequence wraps in its first response
	c.cseq, c.sseq = c.clientISN, c.serverISN
	return c
}

// fromClient is the next client packet with payload p (advancing the
// client's sequence by len(p) and by one for SYN and FIN).
func (c *conv) fromClient(flags uint8, p string) seg {
	s := seg{src: c.client, dst: c.server, seq: c.cseq, ack: c.sseq, flags: flags, payload: []byte(p),
		ipOpts: c.ipOpts, ext: c.ext}
	c.cseq += uint32(len(p))
	if flags&(fSYN|fFIN) != 0 {
		c.cseq++
	}
	return s
}

// fromServer is the next server packet.
func (c *conv) fromServer(flags uint8, p string) seg {
	s := seg{src: c.server, dst: c.client, seq: c.sseq, ack: c.cseq, flags: flags, payload: []byte(p),
		ipOpts: c.ipOpts, ext: c.ext}
	c.sseq += uint32(len(p))
	if flags&(fSYN|fFIN) != 0 {
		c.sseq++
	}
	return s
}
