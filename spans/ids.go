package spans

import (
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"

	"go.opentelemetry.io/otel/trace"
)

// linkInputLen is the length of what linkIDs hashes.
const linkInputLen = 16 + 1 + 18 + 18 + 8 + 8

// linkInput returns the bytes linkIDs hashes for s (see the package doc).
func linkInput(s *Session) [linkInputLen]byte {
	var b [linkInputLen]byte
	n := copy(b[:], "clovisor/link/v1")
	switch s.Transport {
	case "tcp":
		b[n] = 6
	case "udp":
		b[n] = 17
	}
	n++
	ca := s.Client.Addr().Unmap().As16()
	n += copy(b[n:], ca[:])
	binary.BigEndian.PutUint16(b[n:], s.Client.Port())
	n += 2
	sa := s.Server.Addr().Unmap().As16()
	n += copy(b[n:], sa[:])
	binary.BigEndian.PutUint16(b[n:], s.Server.Port())
	n += 2
	binary.BigEndian.PutUint64(b[n:], uint64(s.Index))
	n += 8
	binary.BigEndian.PutUint64(b[n:], s.ConnTag)
	return b
}

// linkIDs derives the trace ID and the CLIENT span ID that both ends of an
// exchange compute alike (see the package doc).
func linkIDs(s *Session) (trace.TraceID, trace.SpanID) {
	in := linkInput(s)
	return linkIDsOf(&in)
}

func linkIDsOf(in *[linkInputLen]byte) (trace.TraceID, trace.SpanID) {
	h := sha256.Sum256(in[:])
	var tid trace.TraceID
	var sid trace.SpanID
	copy(tid[:], h[0:16])
	copy(sid[:], h[16:24])
	if !tid.IsValid() {
		tid[15] = 1
	}
	if !sid.IsValid() {
		sid[7] = 1
	}
	return tid, sid
}

// linkCacheBits is the log2 of the number of slots of a linkCache.
const linkCacheBits = 8

// linkCache remembers the IDs linkIDs derived for recent exchanges, so that
// when Clovisor traces both ends of an exchange the second end does not hash
// again. It is direct-mapped: an exchange replaces whatever shared its slot.
// It is used under the Exporter's lock.
type linkCache [1 << linkCacheBits]struct {
	in  [linkInputLen]byte
	tid trace.TraceID
	sid trace.SpanID
}

// ids returns linkIDs(s).
func (c *linkCache) ids(s *Session) (trace.TraceID, trace.SpanID) {
	in := linkInput(s)
	// The slot: a hash of the variable part (after the fixed prefix and
	// transport); the tail of the addresses, the ports, Index and ConnTag.
	h := binary.LittleEndian.Uint64(in[25:]) ^ binary.LittleEndian.Uint64(in[33:])*0x9e3779b97f4a7c15 ^
		binary.LittleEndian.Uint64(in[45:])*0xc2b2ae3d27d4eb4f ^ binary.LittleEndian.Uint64(in[53:]) ^
		binary.LittleEndian.Uint64(in[61:])*0x165667b19e3779f9
	h *= 0x9e3779b97f4a7c15
	e := &c[h>>(64-linkCacheBits)]
	if e.in != in || !e.tid.IsValid() {
		e.in = in
		e.tid, e.sid = linkIDsOf(&in)
	}
	return e.tid, e.sid
}

// idGen makes the random IDs of spans that are not linked, from a generator
// of the Exporter's own (seeded from the operating system's entropy), used
// under the Exporter's lock.
type idGen struct {
	r *rand.ChaCha8
}

func newIDGen() idGen {
	var seed [32]byte
	if _, err := crand.Read(seed[:]); err != nil {
		// Never happens on Linux; math/rand/v2's global source is
		// seeded by the runtime all the same.
		for i := 0; i < len(seed); i += 8 {
			binary.NativeEndian.PutUint64(seed[i:], rand.Uint64())
		}
	}
	return idGen{r: rand.NewChaCha8(seed)}
}

// traceID returns a random, valid (non-zero) trace ID.
func (g idGen) traceID() trace.TraceID {
	var tid trace.TraceID
	for !tid.IsValid() {
		binary.NativeEndian.PutUint64(tid[:8], g.r.Uint64())
		binary.NativeEndian.PutUint64(tid[8:], g.r.Uint64())
	}
	return tid
}

// spanID returns a random, valid (non-zero) span ID other than not.
func (g idGen) spanID(not trace.SpanID) trace.SpanID {
	var sid trace.SpanID
	for !sid.IsValid() || sid == not {
		binary.NativeEndian.PutUint64(sid[:], g.r.Uint64())
	}
	return sid
}
