package spans

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"

	"go.opentelemetry.io/otel/trace"
)

// linkIDs derives the trace ID and the CLIENT span ID that both ends of an
// exchange compute alike (see the package doc).
func linkIDs(s *Session) (trace.TraceID, trace.SpanID) {
	var b [16 + 1 + 18 + 18 + 8 + 8]byte
	n := copy(b[:], "clovisor/link/v1")
	switch s.Transport {
	case "tcp":
		b[n] = 6
	case "udp":
		b[n] = 17
	}
	n++
	for _, ap := range [2]struct {
		a    [16]byte
		port uint16
	}{
		{s.Client.Addr().Unmap().As16(), s.Client.Port()},
		{s.Server.Addr().Unmap().As16(), s.Server.Port()},
	} {
		n += copy(b[n:], ap.a[:])
		binary.BigEndian.PutUint16(b[n:], ap.port)
		n += 2
	}
	binary.BigEndian.PutUint64(b[n:], uint64(s.Index))
	n += 8
	binary.BigEndian.PutUint64(b[n:], s.ConnTag)

	h := sha256.Sum256(b[:])
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

// idsKey is the context key under which Export puts the IDs the span about to
// start must take.
type idsKey struct{}

type fixedIDs struct {
	tid trace.TraceID
	sid trace.SpanID
}

// withIDs returns a context telling idGenerator to give the next root span
// exactly these IDs.
func withIDs(ctx context.Context, tid trace.TraceID, sid trace.SpanID) context.Context {
	return context.WithValue(ctx, idsKey{}, fixedIDs{tid, sid})
}

// idGenerator is the sdktrace.IDGenerator of every provider: it returns the
// IDs put into the Start context by withIDs, and random ones otherwise.
type idGenerator struct{}

// NewIDs implements sdktrace.IDGenerator.
func (idGenerator) NewIDs(ctx context.Context) (trace.TraceID, trace.SpanID) {
	if v, ok := ctx.Value(idsKey{}).(fixedIDs); ok && v.tid.IsValid() && v.sid.IsValid() {
		return v.tid, v.sid
	}
	var tid trace.TraceID
	for !tid.IsValid() {
		binary.NativeEndian.PutUint64(tid[:8], rand.Uint64())
		binary.NativeEndian.PutUint64(tid[8:], rand.Uint64())
	}
	return tid, randomSpanID()
}

// NewSpanID implements sdktrace.IDGenerator.
func (idGenerator) NewSpanID(ctx context.Context, tid trace.TraceID) trace.SpanID {
	if v, ok := ctx.Value(idsKey{}).(fixedIDs); ok && v.tid == tid && v.sid.IsValid() {
		return v.sid
	}
	return randomSpanID()
}

func randomSpanID() trace.SpanID {
	var sid trace.SpanID
	for !sid.IsValid() {
		binary.NativeEndian.PutUint64(sid[:], rand.Uint64())
	}
	return sid
}
