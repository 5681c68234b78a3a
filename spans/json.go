package spans

import (
	"context"
	"io"
	"math"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// JSONExporter writes one JSON object per span per line:
//
//	{"name":"GET /","kind":"CLIENT","trace_id":"…","span_id":"…",
//	 "parent_span_id":"","start":"2024-05-01T09:41:07.123Z",
//	 "end":"…","duration_ns":1234000,"status":{"code":"Unset"},
//	 "resource":{"service.name":"curl",…},"attributes":{"server.port":8080,…}}
//
// (on one line). parent_span_id is "" for a root span; times are RFC 3339
// with nanoseconds in UTC; status.description is present only when set;
// attribute values keep their types (strings, integers, floats, booleans and
// arrays of them).
type JSONExporter struct {
	w io.Writer

	mu      sync.Mutex
	buf     []byte
	stopped bool
}

// NewJSONExporter returns a JSONExporter writing to w.
func NewJSONExporter(w io.Writer) *JSONExporter {
	return &JSONExporter{w: w}
}

// ExportSpans implements sdktrace.SpanExporter: one Write per span.
func (j *JSONExporter) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.stopped {
		return nil
	}
	for _, s := range spans {
		j.buf = appendJSONSpan(j.buf[:0], s)
		if _, err := j.w.Write(j.buf); err != nil {
			return err
		}
	}
	return nil
}

// Shutdown implements sdktrace.SpanExporter. It does not close the writer.
func (j *JSONExporter) Shutdown(context.Context) error {
	j.mu.Lock()
	j.stopped = true
	j.mu.Unlock()
	return nil
}

func appendJSONSpan(b []byte, s sdktrace.ReadOnlySpan) []byte {
	sc := s.SpanContext()
	b = append(b, `{"name":`...)
	b = appendJSONString(b, s.Name())
	b = append(b, `,"kind":"`...)
	b = append(b, kindName(s.SpanKind())...)
	b = append(b, `","trace_id":"`...)
	b = append(b, sc.TraceID().String()...)
	b = append(b, `","span_id":"`...)
	b = append(b, sc.SpanID().String()...)
	b = append(b, `","parent_span_id":"`...)
	if p := s.Parent(); p.SpanID().IsValid() {
		b = append(b, p.SpanID().String()...)
	}
	b = append(b, `","start":"`...)
	b = s.StartTime().UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","end":"`...)
	b = s.EndTime().UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","duration_ns":`...)
	b = strconv.AppendInt(b, int64(s.EndTime().Sub(s.StartTime())), 10)
	st := s.Status()
	b = append(b, `,"status":{"code":"`...)
	b = append(b, st.Code.String()...)
	b = append(b, '"')
	if st.Description != "" {
		b = append(b, `,"description":`...)
		b = appendJSONString(b, st.Description)
	}
	b = append(b, `},"resource":{`...)
	if r := s.Resource(); r != nil {
		first := true
		for it := r.Iter(); it.Next(); {
			b = appendJSONAttr(b, it.Attribute(), first)
			first = false
		}
	}
	b = append(b, `},"attributes":{`...)
	for i, kv := range s.Attributes() {
		b = appendJSONAttr(b, kv, i == 0)
	}
	return append(b, "}}\n"...)
}

func appendJSONAttr(b []byte, kv attribute.KeyValue, first bool) []byte {
	if !first {
		b = append(b, ',')
	}
	b = appendJSONString(b, string(kv.Key))
	b = append(b, ':')
	return appendJSONValue(b, kv.Value)
}

func appendJSONValue(b []byte, v attribute.Value) []byte {
	switch v.Type() {
	case attribute.BOOL:
		return strconv.AppendBool(b, v.AsBool())
	case attribute.INT64:
		return strconv.AppendInt(b, v.AsInt64(), 10)
	case attribute.FLOAT64:
		return appendJSONFloat(b, v.AsFloat64())
	case attribute.STRING:
		return appendJSONString(b, v.AsString())
	case attribute.BOOLSLICE:
		b = append(b, '[')
		for i, x := range v.AsBoolSlice() {
			if i > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendBool(b, x)
		}
		return append(b, ']')
	case attribute.INT64SLICE:
		b = append(b, '[')
		for i, x := range v.AsInt64Slice() {
			if i > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, x, 10)
		}
		return append(b, ']')
	case attribute.FLOAT64SLICE:
		b = append(b, '[')
		for i, x := range v.AsFloat64Slice() {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONFloat(b, x)
		}
		return append(b, ']')
	case attribute.STRINGSLICE:
		b = append(b, '[')
		for i, x := range v.AsStringSlice() {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, x)
		}
		return append(b, ']')
	default:
		return appendJSONString(b, v.Emit())
	}
}

// appendJSONFloat writes f as a JSON number, or as a string for NaN and
// infinities, which JSON cannot represent.
func appendJSONFloat(b []byte, f float64) []byte {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return appendJSONString(b, strconv.FormatFloat(f, 'g', -1, 64))
	}
	return strconv.AppendFloat(b, f, 'g', -1, 64)
}

// appendJSONString appends s as a JSON string (RFC 8259), replacing invalid
// UTF-8 with U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20 || c == 0x7f:
				b = appendHexEscape(b, `\u`, uint32(c), 4)
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = appendHexEscape(b, `\u`, uint32(r), 4)
		default:
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}

var _ sdktrace.SpanExporter = (*JSONExporter)(nil)
