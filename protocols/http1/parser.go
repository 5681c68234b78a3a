package http1

import (
	"bytes"

	"github.com/clovisor/clovisor/protocols"
)

// state is where a stream is in its current message.
type state uint8

// maxChunkLine bounds a chunk-size line with its extensions.
const maxChunkLine = 4096

const (
	stStart      state = iota // between messages
	stHead                    // in the header section
	stBody                    // in a Content-Length body (remain bytes left)
	stChunkSize               // in a chunk-size line
	stChunkData               // in chunk data (remain bytes left)
	stChunkEnd                // in the CRLF after chunk data
	stTrailer                 // in the trailer section
	stUntilClose              // in a body delimited by the connection's close
	stLost                    // lost sync: waiting for a chunk that starts a message
)

// hdrResult is what parsing a header section led to.
type hdrResult uint8

const (
	hdrOK       hdrResult = iota // go on with the state set
	hdrGarbage                   // the start line is not HTTP
	hdrLose                      // framing unknown: message truncated, sync lost
	hdrOverflow                  // header section longer than the bound
	hdrDead                      // 101 or CONNECT 2xx: no more HTTP
)

// stream is the parsing state of one direction of the connection.
type stream struct {
	dir   protocols.Direction
	state state
	ts    uint64 // TS of the chunk being fed

	// The current message.
	inMsg      bool
	start, end uint64 // TS of its first and last byte
	n          int64  // its bytes, true counts
	hdrN       int64  // bytes of the header section being read
	body       int64  // payload bytes
	hasBody    bool
	ex         *exchange
	interim    bool // response: 1xx seen, the final response follows
	orphan     bool // response with no request: parsed to stay in step, counted as garbage

	// Header section split across chunks.
	buf      []byte
	scan     int  // where to resume looking for the end of the section
	lineScan int  // where to resume looking for the end of the start line
	lineOK   bool // the start line was complete and valid

	// Body framing.
	remain int64 // bytes left in a Content-Length body or chunk
	phase  uint8 // sub-state of the chunk-size line, chunk end or trailer
	digits int   // hex digits of the chunk size so far
	lineN  int   // length of the chunk-size line so far
}

// note accounts n bytes of the chunk being fed to the current message.
func (s *stream) note(n int64) {
	if !s.inMsg {
		s.inMsg = true
		s.start = s.ts
	}
	s.end = s.ts
	s.n += n
}

func (s *stream) resetMsg() {
	s.inMsg, s.interim, s.orphan, s.hasBody = false, false, false, false
	s.start, s.end, s.n, s.hdrN, s.body, s.remain = 0, 0, 0, 0, 0, 0
	s.ex = nil
	s.resetHead()
}

func (s *stream) resetHead() {
	if cap(s.buf) > 4096 {
		s.buf = nil // do not keep a large buffer for an idle connection
	}
	s.buf = s.buf[:0]
	s.scan, s.lineScan, s.lineOK = 0, 0, false
}

// exchange is a request and (once matched) its response.
type exchange struct {
	// strs holds the strings exported, laid out so that one conversion
	// makes all of them: user agent, host, then the summary
	// "METHOD target " to which the status is appended when emitting.
	strs             []byte
	uaOff, uaEnd     int
	hostOff, hostEnd int
	sumOff           int
	methodEnd        int
	pathOff, pathEnd int
	qOff, qEnd       int

	method  string // known method or "_OTHER"
	version string // "1.0", "1.1", "" when not read
	scheme  string
	port    int // -1: none
	hasUA   bool
	hasHost bool
	hasPath bool
	hasQry  bool
	head    bool
	connect bool

	reqStart, reqEnd  uint64
	reqBytes, reqBody int64
	reqHasBody        bool
	reqDone           bool

	respMatched         bool
	respDone            bool
	status              int
	respStart, respEnd  uint64
	respBytes, respBody int64
	respHasBody         bool
	respCut             bool // closed in the middle of the response

	truncated bool
	evicted   bool
}

// parser parses one connection.
type parser struct {
	cfg  *config
	s    [2]stream
	ring []*exchange // FIFO of exchanges, qn of them from qh
	qh   int
	qn   int
	free []*exchange
	dead bool // upgraded or tunnelled: no more HTTP
	// ignored counts the bytes neither in a transaction nor garbage:
	// empty lines between messages, bytes after an upgrade, messages of
	// an evicted exchange. Tests check the accounting with it.
	ignored int64
	// closing is set during Close.
	closing bool
	closeTS uint64 // the ts given to Close
	out     []*protocols.Transaction
	stats   protocols.ParserStats
	// lastStrs is the text of the last transaction emitted (its
	// strings are parts of it): a keep-alive connection often repeats its
	// request, and then the next transaction shares it.
	lastStrs string
}

// Stats reports the bytes dropped and the resynchronisations.
func (p *parser) Stats() protocols.ParserStats { return p.stats }

// Feed parses the next chunk of one direction. After a 101 Switching
// Protocols or a CONNECT tunnel the bytes are not HTTP any more: they are
// ignored (and not counted as garbage).
func (p *parser) Feed(c protocols.Chunk, out []*protocols.Transaction) []*protocols.Transaction {
	n := len(c.Data)
	total := max(c.Len, n)
	if c.Dir > protocols.Response {
		p.stats.Garbage += int64(total)
		return out
	}
	if p.dead && c.Dir == protocols.Request && p.s[c.Dir].state == stBody && total > 0 {
		// The rest of a request body declared before the switch is still
		// the request's (the response may come before the body is all
		// sent): whatever the calls' sizes, the request gets the same
		// bytes. Bytes not captured (a gap) and those past the body are
		// ignored.
		rq := &p.s[c.Dir]
		rq.ts = c.TS
		k := int(min(int64(n), rq.remain))
		p.out = out
		p.feed(rq, c.Data[:k], 0)
		p.ignored += int64(total - k)
		out = p.out
		p.out = nil
		return out
	}
	if p.dead && p.s[c.Dir].state == stLost {
		// This direction had lost sync before the switch: which of its
		// bytes still belonged to the lost message is not known.
		p.stats.Garbage += int64(total)
		return out
	}
	if p.dead || total == 0 {
		p.ignored += int64(total)
		return out
	}
	s := &p.s[c.Dir]
	s.ts = c.TS
	p.out = out
	p.feed(s, c.Data, int64(total-n))
	out = p.out
	p.out = nil
	return out
}

func (p *parser) feed(s *stream, data []byte, gap int64) {
	if s.state == stLost {
		if len(data) == 0 || !p.cfg.startsMessage(s.dir, data) {
			p.stats.Garbage += int64(len(data)) + gap
			return
		}
		p.stats.Resyncs++
		s.state = stStart
	}
	for len(data) > 0 {
		switch s.state {
		case stStart:
			i := 0
			for i < len(data) && (data[i] == '\r' || data[i] == '\n') {
				i++ // RFC 9112 2.2: empty lines before a message are ignored
			}
			data = data[i:]
			p.ignored += int64(i)
			if len(data) > 0 {
				s.state = stHead
				s.resetHead()
				s.hdrN = 0
			}
		case stHead:
			k, r := p.head(s, data)
			data = data[k:]
			switch r {
			case hdrGarbage:
				p.garbageStart(s)
				p.stats.Garbage += int64(len(data)) + gap
				return
			case hdrLose:
				p.lose(s, int64(len(data))+gap)
				return
			case hdrOverflow:
				p.truncHeader(s, int64(len(data))+gap)
				return
			case hdrDead:
				p.ignored += int64(len(data)) + gap
				return
			}
		case stBody:
			k := int(min(s.remain, int64(len(data))))
			data = data[k:]
			s.note(int64(k))
			s.body += int64(k)
			s.remain -= int64(k)
			if s.remain == 0 {
				p.complete(s, false)
			}
		case stChunkData:
			k := int(min(s.remain, int64(len(data))))
			data = data[k:]
			s.note(int64(k))
			s.body += int64(k)
			s.remain -= int64(k)
			if s.remain == 0 {
				s.state, s.phase = stChunkEnd, 0
			}
		case stChunkSize, stChunkEnd, stTrailer:
			k, ok := p.chunkFraming(s, data)
			if !ok {
				// chunkFraming took nothing: the bytes belong to
				// the message that lost sync.
				p.lose(s, int64(len(data))+gap)
				return
			}
			data = data[k:]
		case stUntilClose:
			s.note(int64(len(data)))
			s.body += int64(len(data))
			data = nil
		case stLost:
			p.stats.Garbage += int64(len(data)) + gap
			return
		}
		if p.dead {
			p.ignored += int64(len(data)) + gap
			return
		}
	}
	p.skip(s, gap)
}

// skip steps over gap bytes that were not captured.
func (p *parser) skip(s *stream, gap int64) {
	for gap > 0 {
		if p.dead {
			p.ignored += gap
			return
		}
		switch s.state {
		case stStart:
			if s.dir == protocols.Response && !s.interim && p.unmatched() {
				// A response whose bytes were all lost: pair it
				// with its request to stay in step.
				s.ex = p.match()
				s.note(0)
				s.ex.truncated = true
				p.lose(s, gap)
				return
			}
			if s.interim {
				p.lose(s, gap)
				return
			}
			p.stats.Garbage += gap
			s.state = stLost
			return
		case stHead:
			p.truncHeader(s, gap)
			return
		case stBody:
			k := min(gap, s.remain)
			gap -= k
			s.note(k)
			s.body += k
			s.remain -= k
			if s.remain == 0 {
				p.complete(s, false)
			}
		case stChunkData:
			k := min(gap, s.remain)
			gap -= k
			s.note(k)
			s.body += k
			s.remain -= k
			if s.remain == 0 {
				s.state, s.phase = stChunkEnd, 0
			}
		case stUntilClose:
			s.note(gap)
			s.body += gap
			return
		case stLost:
			p.stats.Garbage += gap
			return
		default: // chunk-size line, chunk end, trailer: sync is lost
			p.lose(s, gap)
			return
		}
	}
}

// head reads header-section bytes from data. It returns how many it took.
func (p *parser) head(s *stream, data []byte) (int, hdrResult) {
	if len(s.buf) == 0 {
		// Fast path: the whole section is in this chunk.
		if end := headerEnd(data, 0); end > 0 && end <= p.cfg.maxHeader {
			s.note(int64(end))
			s.hdrN += int64(end)
			return end, p.header(s, data[:end], false)
		}
	}
	old := len(s.buf)
	take := min(len(data), p.cfg.maxHeader-old)
	s.buf = append(s.buf, data[:take]...)
	if old > 0 {
		if end := headerEnd(s.buf, s.scan); end > 0 {
			used := end - old
			s.note(int64(used))
			s.hdrN += int64(used)
			r := p.header(s, s.buf[:end], false)
			s.resetHead()
			return used, r
		}
	}
	s.scan = max(0, len(s.buf)-3)
	s.note(int64(take))
	s.hdrN += int64(take)
	if !p.plausible(s) {
		return take, hdrGarbage
	}
	if len(s.buf) >= p.cfg.maxHeader {
		return take, hdrOverflow
	}
	return take, hdrOK
}

// headerEnd returns the length of the header section at the start of b
// (up to and including the empty line), or -1 when it is not complete.
// from is where to resume looking: a position at or before the last LF
// seen.
func headerEnd(b []byte, from int) int {
	for {
		i := bytes.IndexByte(b[from:], '\n')
		if i < 0 {
			return -1
		}
		j := from + i + 1
		if j < len(b) && b[j] == '\n' {
			return j + 1
		}
		if j+1 < len(b) && b[j] == '\r' && b[j+1] == '\n' {
			return j + 2
		}
		from = j
	}
}

// plausible checks that the buffered start of a header section can be the
// start of an HTTP message, so that garbage is not buffered.
func (p *parser) plausible(s *stream) bool {
	if s.lineOK {
		return true
	}
	b := s.buf
	i := bytes.IndexByte(b[s.lineScan:], '\n')
	if i < 0 {
		s.lineScan = len(b)
		return plausiblePrefix(s.dir, b[:min(len(b), 64)])
	}
	line := trimCR(b[:s.lineScan+i])
	if s.dir == protocols.Request {
		_, _, _, s.lineOK = splitRequestLine(line, true)
	} else {
		_, s.lineOK = parseStatusLine(line, true)
	}
	return s.lineOK
}

// garbageStart drops the header section being read: its start is not HTTP.
func (p *parser) garbageStart(s *stream) {
	p.stats.Garbage += s.hdrN
	s.n -= s.hdrN
	if s.interim {
		// After a 1xx: the exchange ends there, truncated.
		if s.ex != nil {
			s.ex.truncated = true
		}
		p.complete(s, false)
	} else {
		s.resetMsg()
	}
	s.state = stLost
}

// truncHeader ends a header section that is not complete (a gap, the
// bound, the connection's close) with what could be parsed; rest more
// bytes of the chunk belong to the message.
func (p *parser) truncHeader(s *stream, rest int64) {
	if p.header(s, s.buf, true) == hdrGarbage {
		p.garbageStart(s)
		p.stats.Garbage += rest
		return
	}
	p.lose(s, rest)
}

// lose ends the current message as truncated, rest more bytes of the chunk
// belonging to it, and loses sync.
func (p *parser) lose(s *stream, rest int64) {
	switch {
	case s.ex != nil || s.orphan:
		s.note(rest)
		if s.ex != nil {
			s.ex.truncated = true
		}
		p.complete(s, p.closing)
	default:
		if s.inMsg {
			p.stats.Garbage += s.n
		}
		p.stats.Garbage += rest
		s.resetMsg()
	}
	s.state = stLost
}

// complete ends the current message of s; cut says the connection closed
// in the middle of it.
func (p *parser) complete(s *stream, cut bool) {
	ex := s.ex
	if s.dir == protocols.Request {
		if ex != nil {
			ex.reqStart, ex.reqEnd = s.start, s.end
			ex.reqBytes, ex.reqBody, ex.reqHasBody = s.n, s.body, s.hasBody
			ex.reqDone = true
		} else {
			p.ignored += s.n // the exchange was evicted
		}
	} else {
		switch {
		case s.orphan:
			p.stats.Garbage += s.n
		case ex == nil:
			p.ignored += s.n // the exchange was evicted
		case ex != nil:
			ex.respStart, ex.respEnd = s.start, s.end
			ex.respBytes, ex.respBody, ex.respHasBody = s.n, s.body, s.hasBody
			ex.respCut = cut
			ex.respDone = true
		}
	}
	s.resetMsg()
	s.state = stStart
	p.flush()
}

// chunkFraming reads the chunk-size line, the CRLF after chunk data or the
// trailer section. It returns how many bytes it took, or false when they
// are not valid (sync is lost) and it took none.
func (p *parser) chunkFraming(s *stream, data []byte) (int, bool) {
	i := 0
	switch s.state {
	case stChunkSize:
		// phase 0: hex digits, 1: extensions, 2: CR seen.
		done := false
		for i < len(data) && !done {
			c := data[i]
			switch s.phase {
			case 0:
				switch {
				case c >= '0' && c <= '9', c >= 'a' && c <= 'f', c >= 'A' && c <= 'F':
					if s.remain >= 1<<58 {
						return i, false // larger than any real body
					}
					s.remain = s.remain<<4 | int64(unhex(c))
					s.digits++
				case c == ';' || c == ' ' || c == '\t':
					s.phase = 1
				case c == '\r':
					s.phase = 2
				case c == '\n':
					done = true
				default:
					return i, false
				}
				if s.digits == 0 {
					return i, false
				}
				i++
			case 1:
				j := bytes.IndexByte(data[i:], '\n')
				if j < 0 {
					i = len(data)
					continue
				}
				i += j + 1
				done = true
			default:
				if c != '\n' {
					return i, false
				}
				i++
				done = true
			}
		}
		s.lineN += i
		if s.lineN > maxChunkLine {
			return i, false
		}
		s.note(int64(i))
		if done {
			s.lineN, s.digits, s.phase = 0, 0, 0
			if s.remain == 0 {
				s.state = stTrailer
			} else {
				s.state = stChunkData
			}
		}
		return i, true
	case stChunkEnd:
		for i < len(data) {
			c := data[i]
			i++
			switch {
			case c == '\r' && s.phase == 0:
				s.phase = 1
			case c == '\n':
				s.note(int64(i))
				s.state, s.phase, s.remain = stChunkSize, 0, 0
				return i, true
			default:
				return i - 1, false
			}
		}
		s.note(int64(i))
		return i, true
	default: // stTrailer: phase 0: at a line start, 1: CR at a line start, 2: in a line
		for i < len(data) {
			switch s.phase {
			case 0, 1:
				c := data[i]
				i++
				switch {
				case c == '\n':
					s.note(int64(i))
					p.complete(s, false)
					return i, true
				case c == '\r' && s.phase == 0:
					s.phase = 1
				default:
					s.phase = 2
				}
			case 2:
				j := bytes.IndexByte(data[i:], '\n')
				if j < 0 {
					i = len(data)
					continue
				}
				i += j + 1
				s.phase = 0
			}
		}
		s.note(int64(i))
		return i, true
	}
}
