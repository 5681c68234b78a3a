package tcsessions

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Sizes of the kernel's records.
var (
	exchangeSize      = int(unsafe.Sizeof(ExchangeEvent{}))
	payloadHeaderSize = int(unsafe.Offsetof(PayloadEvent{}.Data))
)

// decodeExchange decodes an exchange record.
func decodeExchange(b []byte) (*ExchangeEvent, error) {
	if len(b) < exchangeSize {
		return nil, fmt.Errorf("exchange record of %d bytes, want %d", len(b), exchangeSize)
	}
	e := new(ExchangeEvent)
	if _, err := binary.Decode(b[:exchangeSize], binary.NativeEndian, e); err != nil {
		return nil, fmt.Errorf("decoding an exchange record: %w", err)
	}
	return e, nil
}

// decodePayload decodes a payload event (its header and the captured
// bytes that follow it).
func decodePayload(b []byte) (*PayloadEvent, error) {
	if len(b) < payloadHeaderSize {
		return nil, fmt.Errorf("payload event of %d bytes, want at least %d", len(b), payloadHeaderSize)
	}
	e := new(PayloadEvent)
	var hdr struct {
		Kind, Dir uint8
		Cap       uint16
		Index     uint32
		Tuple     tcConnTuple
		FirstTs   uint64
		Ts        uint64
		Len       uint32
		Seq       uint32
	}
	if unsafe.Sizeof(hdr) != uintptr(payloadHeaderSize) {
		return nil, fmt.Errorf("payload header layout: %d bytes, want %d", unsafe.Sizeof(hdr), payloadHeaderSize)
	}
	if _, err := binary.Decode(b[:payloadHeaderSize], binary.NativeEndian, &hdr); err != nil {
		return nil, fmt.Errorf("decoding a payload event: %w", err)
	}
	e.Kind, e.Dir, e.Cap, e.Index, e.Tuple = hdr.Kind, hdr.Dir, hdr.Cap, hdr.Index, hdr.Tuple
	e.FirstTs, e.Ts, e.Len, e.Seq = hdr.FirstTs, hdr.Ts, hdr.Len, hdr.Seq
	n := int(e.Cap)
	if n > len(e.Data) || payloadHeaderSize+n > len(b) {
		return nil, fmt.Errorf("payload event claims %d bytes, has %d", n, len(b)-payloadHeaderSize)
	}
	copy(e.Data[:], b[payloadHeaderSize:payloadHeaderSize+n])
	return e, nil
}
