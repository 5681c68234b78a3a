package tcsessions

import (
	"fmt"
	"unsafe"
)

// Sizes of the kernel's records.
var (
	exchangeSize      = int(unsafe.Sizeof(ExchangeEvent{}))
	payloadHeaderSize = int(unsafe.Offsetof(PayloadEvent{}.Data))
)

// The records are the C structs of bpf/tc.h in host byte order, laid out
// as the bpf2go-generated Go types (structs.HostLayout): decoding is a
// copy, checked for length. (binary.Decode's reflection, and zeroing a
// whole payload struct per event, cost the reader most of its CPU.)

// decodeExchange decodes an exchange record.
func decodeExchange(b []byte) (*ExchangeEvent, error) {
	if len(b) < exchangeSize {
		return nil, fmt.Errorf("exchange record of %d bytes, want %d", len(b), exchangeSize)
	}
	e := new(ExchangeEvent)
	copy(unsafe.Slice((*byte)(unsafe.Pointer(e)), exchangeSize), b)
	return e, nil
}

// decodeExchangeInto decodes an exchange record into e.
func decodeExchangeInto(b []byte, e *ExchangeEvent) error {
	if len(b) < exchangeSize {
		return fmt.Errorf("exchange record of %d bytes, want %d", len(b), exchangeSize)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(e)), exchangeSize), b)
	return nil
}

// decodePayloadHeader decodes the header of a payload event into e (not
// its Data) and returns the captured bytes, a part of b.
func decodePayloadHeader(b []byte, e *PayloadEvent) ([]byte, error) {
	if len(b) < payloadHeaderSize {
		return nil, fmt.Errorf("payload event of %d bytes, want at least %d", len(b), payloadHeaderSize)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(e)), payloadHeaderSize), b)
	n := int(e.Cap)
	if n > len(e.Data) || payloadHeaderSize+n > len(b) {
		return nil, fmt.Errorf("payload event claims %d bytes, has %d", n, len(b)-payloadHeaderSize)
	}
	return b[payloadHeaderSize : payloadHeaderSize+n], nil
}

// decodePayload decodes a payload event (its header and the captured
// bytes that follow it) into a new PayloadEvent.
func decodePayload(b []byte) (*PayloadEvent, error) {
	e := new(PayloadEvent)
	return e, decodePayloadInto(b, e)
}

// decodePayloadInto decodes a payload event into e, reused between events:
// only the header and the captured bytes (e.Data[:e.Cap]) are written.
func decodePayloadInto(b []byte, e *PayloadEvent) error {
	if len(b) < payloadHeaderSize {
		return fmt.Errorf("payload event of %d bytes, want at least %d", len(b), payloadHeaderSize)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(e)), payloadHeaderSize), b)
	n := int(e.Cap)
	if n > len(e.Data) || payloadHeaderSize+n > len(b) {
		return fmt.Errorf("payload event claims %d bytes, has %d", n, len(b)-payloadHeaderSize)
	}
	copy(e.Data[:n], b[payloadHeaderSize:payloadHeaderSize+n])
	return nil
}
