package http1

import (
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

// txBox holds a transaction and its attributes in one allocation.
type txBox struct {
	tx    protocols.Transaction
	attrs [maxAttrs]attribute.KeyValue
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

	a := box.attrs[:0:maxAttrs]
	a = append(a, semconv.HTTPRequestMethodKey.String(ex.method))
	if ex.method == "_OTHER" {
		a = append(a, semconv.HTTPRequestMethodOriginalKey.String(method))
	}
	if ex.hasPath {
		a = append(a, semconv.URLPathKey.String(str[ex.pathOff:ex.pathEnd]))
	}
	if ex.hasQry {
		a = append(a, semconv.URLQueryKey.String(str[ex.qOff:ex.qEnd]))
	}
	a = append(a, semconv.URLSchemeKey.String(ex.scheme))
	if seen && ex.status > 0 {
		a = append(a, semconv.HTTPResponseStatusCodeKey.Int(ex.status))
	}
	a = append(a, semconv.NetworkProtocolNameKey.String("http"))
	if ex.version != "" {
		a = append(a, semconv.NetworkProtocolVersionKey.String(ex.version))
	}
	if ex.hasUA {
		a = append(a, semconv.UserAgentOriginalKey.String(str[ex.uaOff:ex.uaEnd]))
	}
	if ex.hasHost {
		a = append(a, semconv.ServerAddressKey.String(str[ex.hostOff:ex.hostEnd]))
		if ex.port >= 0 {
			a = append(a, semconv.ServerPortKey.Int(ex.port))
		}
	}
	if ex.reqHasBody {
		a = append(a, semconv.HTTPRequestBodySizeKey.Int64(ex.reqBody))
	}
	if seen && ex.respHasBody {
		a = append(a, semconv.HTTPResponseBodySizeKey.Int64(ex.respBody))
	}
	a = append(a, semconv.HTTPRequestSizeKey.Int64(ex.reqBytes))
	if seen {
		a = append(a, semconv.HTTPResponseSizeKey.Int64(ex.respBytes))
	}
	t.Attrs = a

	p.out = append(p.out, t)
	p.free = append(p.free, ex)
}
