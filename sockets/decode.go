package sockets

import (
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/clovisor/clovisor/probes"
)

// Sizes of the fixed parts of the kernel's records.
var (
	connEventSize  = int(unsafe.Sizeof(probes.ConnEvent{}))
	dataHeaderSize = int(unsafe.Offsetof(probes.DataEvent{}.Data))
)

// decodeConn copies a conn_event record into ev.
func decodeConn(raw []byte, ev *probes.ConnEvent) error {
	if len(raw) < connEventSize {
		return fmt.Errorf("connection event of %d bytes, want %d", len(raw), connEventSize)
	}
	*ev = *(*probes.ConnEvent)(unsafe.Pointer(unsafe.SliceData(raw)))
	return nil
}

// decodeData copies the header of a data_event record into ev and returns
// its payload, a subslice of raw.
func decodeData(raw []byte, ev *probes.DataEvent) ([]byte, error) {
	if len(raw) < dataHeaderSize {
		return nil, fmt.Errorf("data event of %d bytes, want at least %d", len(raw), dataHeaderSize)
	}
	hdr := (*[1 << 16]byte)(unsafe.Pointer(ev))[:dataHeaderSize:dataHeaderSize]
	copy(hdr, raw)
	n := int(ev.Cap)
	if n > len(raw)-dataHeaderSize || n > int(ev.Len) {
		return nil, fmt.Errorf("data event claims %d payload bytes of %d, record holds %d", n, ev.Len, len(raw)-dataHeaderSize)
	}
	return raw[dataHeaderSize : dataHeaderSize+n], nil
}

const (
	afInet  = 2
	afInet6 = 10
)

// endpoints returns the local and remote ends of a kernel tuple. IPv4
// addresses of IPv6 sockets (v4-mapped) are unmapped.
func endpoints(family uint16, saddr, daddr *[16]uint8, sport, dport uint16) (local, remote netip.AddrPort) {
	var l, r netip.Addr
	if family == afInet {
		l = netip.AddrFrom4([4]byte(saddr[:4]))
		r = netip.AddrFrom4([4]byte(daddr[:4]))
	} else {
		l = netip.AddrFrom16(*saddr).Unmap()
		r = netip.AddrFrom16(*daddr).Unmap()
	}
	return netip.AddrPortFrom(l, sport), netip.AddrPortFrom(r, dport)
}

func cstring(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
