package http1

import (
	"math/bits"

	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"

	"github.com/clovisor/clovisor/protocols"
)

// push queues a new exchange, evicting the oldest one when the queue is
// full.
func (p *parser) push() *exchange {
	if p.qn >= p.cfg.maxPending {
		p.evict()
	}
	if p.qn == len(p.ring) {
		n := min(max(2*len(p.ring), 2), p.cfg.maxPending)
		ring := make([]*exchange, n)
		for i := 0; i < p.qn; i++ {
			ring[i] = p.ring[(p.qh+i)%len(p.ring)]
		}
		p.ring, p.qh = ring, 0
	}
	var ex *exchange
	if n := len(p.free); n > 0 {
		ex = p.free[n-1]
		p.free = p.free[:n-1]
		strs := ex.strs
		if cap(strs) > 4096 {
			strs = nil
		}
		*ex = exchange{strs: strs[:0]}
	} else {
		ex = &exchange{}
	}
	p.ring[(p.qh+p.qn)%len(p.ring)] = ex
	p.qn++
	return ex
}

// pop removes the oldest exchange.
func (p *parser) pop() *exchange {
	ex := p.ring[p.qh]
	p.ring[p.qh] = nil
	p.qh = (p.qh + 1) % len(p.ring)
	p.qn--
	return ex
}

// evict emits the oldest exchange to make room.
func (p *parser) evict() {
	ex := p.pop()
	for i := range p.s {
		if p.s[i].ex == ex {
			p.s[i].ex = nil // its message is still parsed, to stay in step
		}
	}
	ex.evicted = true
	p.emit(ex, false)
}

// unmatched reports whether a queued exchange waits for its response.
func (p *parser) unmatched() bool {
	for i := 0; i < p.qn; i++ {
		if !p.ring[(p.qh+i)%len(p.ring)].respMatched {
			return true
		}
	}
	return false
}

// match returns the oldest exchange that waits for its response (FIFO), or
// nil.
func (p *parser) match() *exchange {
	for i := 0; i < p.qn; i++ {
		ex := p.ring[(p.qh+i)%len(p.ring)]
		if !ex.respMatched {
			ex.respMatched = true
			return ex
		}
	}
	return nil
}

// flush emits the exchanges at the head of the queue that are complete.
func (p *parser) flush() {
	for p.qn > 0 {
		ex := p.ring[p.qh]
		if !ex.reqDone || !ex.respDone {
			return
		}
		p.pop()
		p.emit(ex, false)
	}
}

// Close ends the connection: a response delimited by the close completes,
// messages in progress end where they are, and the requests without a
// response are emitted with NoResponse set. The parser is then ready for a
// new connection (its Stats go on counting).
func (p *parser) Close(ts uint64, out []*protocols.Transaction) []*protocols.Transaction {
	p.out = out
	p.closing = true
	p.closeTS = ts
	respLost := p.s[protocols.Response].state == stLost
	if rq := &p.s[protocols.Request]; p.dead && rq.state == stBody && rq.ex != nil {
		p.complete(rq, true) // a request body cut short after a switch
	}
	if !p.dead {
		for d := range p.s {
			s := &p.s[d]
			switch s.state {
			case stHead:
				p.truncHeader(s, 0)
			case stStart:
				if s.interim {
					p.complete(s, true)
				}
			case stBody, stChunkSize, stChunkData, stChunkEnd, stTrailer:
				p.complete(s, true)
			case stUntilClose:
				p.complete(s, false)
			}
		}
	}
	for p.qn > 0 {
		ex := p.pop()
		if !ex.reqDone {
			ex.reqDone = true
			ex.truncated = true
		}
		p.emit(ex, respLost)
	}
	for i := range p.s {
		if p.s[i].inMsg {
			p.ignored += p.s[i].n // after an upgrade
		}
		p.s[i].resetMsg()
		p.s[i].state = stStart
	}
	p.dead, p.closing = false, false
	out = p.out
	p.out = nil
	return out
}

// maxAttrs is the number of attributes an exchange can have.
const maxAttrs = 15

// txBox holds a transaction and what its attributes are made of in one
// allocation.
type txBox struct {
	tx protocols.Transaction
	at attrs
}

// attrs is an exchange's attributes in compact form (the strings are parts
// of the transaction's one text); AppendAttrs makes the list when a span
// is built.
type attrs struct {
	method, methodOriginal, path, query, scheme, version, userAgent, host string
	status, port                                                          int
	reqBody, respBody, reqBytes, respBytes                                int64
	has                                                                   attrFlags
}

// attrFlags says which of the optional attributes an exchange has, one bit
// each.
type attrFlags uint16

const (
	hasMethodOriginal attrFlags = 1 << iota
	hasPath
	hasQuery
	hasUserAgent
	hasHost
	hasReqBody
	hasRespBody
	hasResponse // the response was seen: its size
	hasStatus
	hasVersion
	hasPort
)

// NumAttrs implements protocols.AttrSource: the four attributes every
// exchange has (method, scheme, network.protocol.name, request size) and
// one per optional attribute.
func (a *attrs) NumAttrs() int {
	return 4 + bits.OnesCount16(uint16(a.has))
}

// ReplaceAttr implements protocols.AttrReplacer for url.scheme (a TLS
// connection's plaintext is "https").
func (a *attrs) ReplaceAttr(kv attribute.KeyValue) bool {
	if kv.Key != semconv.URLSchemeKey || kv.Value.Type() != attribute.STRING {
		return false
	}
	a.scheme = kv.Value.AsString()
	return true
}

// AppendAttrs implements protocols.AttrSource: the attributes in the order
// the semantic conventions list them.
func (a *attrs) AppendAttrs(dst []attribute.KeyValue) []attribute.KeyValue {
	dst = append(dst, semconv.HTTPRequestMethodKey.String(a.method))
	if a.has&hasMethodOriginal != 0 {
		dst = append(dst, semconv.HTTPRequestMethodOriginalKey.String(a.methodOriginal))
	}
	if a.has&hasPath != 0 {
		dst = append(dst, semconv.URLPathKey.String(a.path))
	}
	if a.has&hasQuery != 0 {
		dst = append(dst, semconv.URLQueryKey.String(a.query))
	}
	dst = append(dst, semconv.URLSchemeKey.String(a.scheme))
	if a.has&hasStatus != 0 {
		dst = append(dst, semconv.HTTPResponseStatusCodeKey.Int(a.status))
	}
	dst = append(dst, semconv.NetworkProtocolNameKey.String("http"))
	if a.has&hasVersion != 0 {
		dst = append(dst, semconv.NetworkProtocolVersionKey.String(a.version))
	}
	if a.has&hasUserAgent != 0 {
		dst = append(dst, semconv.UserAgentOriginalKey.String(a.userAgent))
	}
	if a.has&hasHost != 0 {
		dst = append(dst, semconv.ServerAddressKey.String(a.host))
		if a.has&hasPort != 0 {
			dst = append(dst, semconv.ServerPortKey.Int(a.port))
		}
	}
	if a.has&hasReqBody != 0 {
		dst = append(dst, semconv.HTTPRequestBodySizeKey.Int64(a.reqBody))
	}
	if a.has&hasRespBody != 0 {
		dst = append(dst, semconv.HTTPResponseBodySizeKey.Int64(a.respBody))
	}
	dst = append(dst, semconv.HTTPRequestSizeKey.Int64(a.reqBytes))
	if a.has&hasResponse != 0 {
		dst = append(dst, semconv.HTTPResponseSizeKey.Int64(a.respBytes))
	}
	return dst
}

// emit appends the transaction of ex to p.out and recycles ex. respLost
// says the response direction had lost sync when the connection closed.
func (p *parser) emit(ex *exchange, respLost bool) {
	box := &txBox{}
	t := &box.tx
	t.Protocol = Name
	seen := ex.respDone && !ex.evicted
	statusOff := len(ex.strs)
	if seen && ex.status > 0 {
		st := ex.status
		ex.strs = append(ex.strs, byte('0'+st/100), byte('0'+st/10%10), byte('0'+st%10))
	} else {
		ex.strs = append(ex.strs, '-')
	}
	str := p.lastStrs
	if string(ex.strs) != str {
		str = string(ex.strs)
		p.lastStrs = str
	}
	t.Summary = str[ex.sumOff:]
	method := str[ex.sumOff:ex.methodEnd]
	if ex.method == "_OTHER" {
		t.Name = "HTTP"
	} else {
		t.Name = ex.method
	}

	t.ReqStart, t.ReqEnd, t.ReqBytes = ex.reqStart, ex.reqEnd, ex.reqBytes
	t.Truncated = ex.truncated
	if p.closing {
		t.CloseTS = p.closeTS
	}
	if seen {
		t.RespStart, t.RespEnd, t.RespBytes = ex.respStart, ex.respEnd, ex.respBytes
		t.StatusCode = ex.status
		switch {
		case ex.status >= 400:
			t.ErrorType = str[statusOff:]
			t.ServerFault = ex.status >= 500
		case ex.respCut:
			t.ErrorType = ErrorResponseTruncated
			t.ServerFault = true
		}
	} else {
		t.NoResponse = true
		if ex.evicted || respLost {
			// Not known to have failed: the parser gave up on it
			// or could not read the responses.
			t.Truncated = true
		} else {
			t.ErrorType = ErrorNoResponse
			t.ServerFault = true
		}
	}

	a := &box.at
	*a = attrs{method: ex.method, scheme: ex.scheme, reqBytes: ex.reqBytes}
	if ex.version != "" {
		a.has |= hasVersion
		a.version = ex.version
	}
	if ex.method == "_OTHER" {
		a.has |= hasMethodOriginal
		a.methodOriginal = method
	}
	if ex.hasPath {
		a.has |= hasPath
		a.path = str[ex.pathOff:ex.pathEnd]
	}
	if ex.hasQry {
		a.has |= hasQuery
		a.query = str[ex.qOff:ex.qEnd]
	}
	if ex.hasUA {
		a.has |= hasUserAgent
		a.userAgent = str[ex.uaOff:ex.uaEnd]
	}
	if ex.hasHost {
		a.has |= hasHost
		a.host = str[ex.hostOff:ex.hostEnd]
		if ex.port >= 0 {
			a.has |= hasPort
			a.port = ex.port
		}
	}
	if ex.reqHasBody {
		a.has |= hasReqBody
		a.reqBody = ex.reqBody
	}
	if seen {
		a.has |= hasResponse
		a.respBytes = ex.respBytes
		if ex.status > 0 {
			a.has |= hasStatus
			a.status = ex.status
		}
		if ex.respHasBody {
			a.has |= hasRespBody
			a.respBody = ex.respBody
		}
	}
	t.Lazy = a

	p.out = append(p.out, t)
	p.free = append(p.free, ex)
}
