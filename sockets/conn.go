package sockets

import (
	"net/netip"

	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/tlsrec"
	"github.com/clovisor/clovisor/spans"
)

// conn is one TCP connection seen from one socket.
type conn struct {
	cookie        uint64
	role          uint8
	fromStart     bool // the open event was seen: exchanges are counted from the first
	local, remote netip.AddrPort
	cgroup        uint64
	pid           uint32
	process       spans.Process
	lastTS        uint64

	// streams[0] is what the socket sent, streams[1] what it received.
	streams [2]stream
	// sendBase is the sequence number of the first byte the socket sends
	// (known when its open event said so).
	sendBase      uint32
	sendBaseKnown bool
	// held are receives waiting for the events of sends they came after;
	// heldListed: the connection is in Tracker.heldConns.
	held       []socketCall
	heldListed bool

	// plainSrc is the source of the plaintext the analyzer reads (a
	// probes.Source* value): SourceSocket until a TLS library's or kernel
	// TLS's plaintext arrives; from then on the socket's own bytes (TLS
	// records) feed no analyzer.
	plainSrc uint8
	// tls: the socket's own bytes are TLS records; hello collects what the
	// handshake said in the clear, tlsVersion what a TLS source reported.
	tls        bool
	hello      tlsrec.Hello
	tlsVersion uint16
	tlsInfo    *spans.TLSInfo // as last given to a session (immutable)

	protocol     string
	parser       protocols.Parser
	tries        int
	unrecognized bool
	index        int
	tag          uint64 // see Session.ConnTag

	prev, next *conn // LRU list
}

// stream follows one direction's TCP sequence numbers.
type stream struct {
	started bool
	next    uint32 // sequence number of the next byte expected
}

// connList is an intrusive doubly linked list with a sentinel.
type connList struct{ root conn }

func (l *connList) init() { l.root.next, l.root.prev = &l.root, &l.root }

func (l *connList) pushFront(c *conn) {
	c.prev, c.next = &l.root, l.root.next
	l.root.next.prev = c
	l.root.next = c
}

func (l *connList) remove(c *conn) {
	if c.prev == nil {
		return
	}
	c.prev.next, c.next.prev = c.next, c.prev
	c.prev, c.next = nil, nil
}

func (l *connList) moveToFront(c *conn) {
	if l.root.next == c {
		return
	}
	l.remove(c)
	l.pushFront(c)
}

func (l *connList) back() *conn {
	if l.root.prev == &l.root {
		return nil
	}
	return l.root.prev
}
