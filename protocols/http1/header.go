package http1

import (
	"bytes"

	"github.com/clovisor/clovisor/protocols"
)

// Transfer codings that matter for framing.
const (
	teNone = iota
	teChunked
	teOther
)

// fields are the header fields the parser reads.
type fields struct {
	cl      int64
	hasCL   bool
	badCL   bool
	te      int
	host    []byte
	hasHost bool
	ua      []byte
	hasUA   bool
}

// scanFields reads the field lines in b (after the start line). When
// trunc is set the section was cut: a last line without its LF is ignored.
func scanFields(b []byte, f *fields) {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return // a line cut short: its value may be partial
		}
		line := trimCR(b[:i])
		b = b[i+1:]
		if len(line) == 0 {
			return // end of the section
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue // obsolete line folding: a continuation, ignored
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			continue
		}
		name := line[:colon]
		switch len(name) {
		case 4:
			if eqFold(name, "host") {
				f.host, f.hasHost = trimOWS(line[colon+1:]), true
			}
		case 10:
			if eqFold(name, "user-agent") {
				f.ua, f.hasUA = trimOWS(line[colon+1:]), true
			}
		case 14:
			if eqFold(name, "content-length") {
				n, ok := parseContentLength(trimOWS(line[colon+1:]))
				switch {
				case !ok || f.hasCL && n != f.cl:
					f.badCL = true
				default:
					f.cl, f.hasCL = n, true
				}
			}
		case 17:
			if eqFold(name, "transfer-encoding") {
				// The final coding is the last of the last field.
				v := trimOWS(line[colon+1:])
				if j := bytes.LastIndexByte(v, ','); j >= 0 {
					v = trimOWS(v[j+1:])
				}
				if len(v) == 0 {
					continue
				}
				if eqFold(v, "chunked") {
					f.te = teChunked
				} else {
					f.te = teOther
				}
			}
		}
	}
}

// parseContentLength parses a Content-Length value, allowing a list of
// identical values (RFC 9110 8.6).
func parseContentLength(v []byte) (int64, bool) {
	var first int64 = -1
	for {
		var item []byte
		i := bytes.IndexByte(v, ',')
		if i < 0 {
			item = v
		} else {
			item = v[:i]
		}
		item = trimOWS(item)
		if len(item) == 0 || len(item) > 18 {
			return 0, false
		}
		var n int64
		for _, c := range item {
			if c < '0' || c > '9' {
				return 0, false
			}
			n = n*10 + int64(c-'0')
		}
		if first >= 0 && n != first {
			return 0, false
		}
		first = n
		if i < 0 {
			return first, true
		}
		v = v[i+1:]
	}
}

// header parses a header section: b holds the start line and the field
// lines, and the empty line unless trunc says the section was cut short.
func (p *parser) header(s *stream, b []byte, trunc bool) hdrResult {
	line, rest := b, []byte(nil)
	complete := false
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		line, rest, complete = trimCR(b[:i]), b[i+1:], true
	}
	if s.dir == protocols.Request {
		return p.request(s, line, complete, rest, trunc)
	}
	return p.response(s, line, complete, rest, trunc)
}

// splitRequestLine splits a request line (without its CRLF). complete says
// the line was read to its end; if not, the target and the version may be
// missing or partial.
func splitRequestLine(line []byte, complete bool) (method, target, version []byte, ok bool) {
	i := 0
	for i < len(line) && i <= maxMethod && isMethodChar(line[i], i) {
		i++
	}
	if i == 0 || i >= len(line) || line[i] != ' ' {
		return nil, nil, nil, false
	}
	method, target = line[:i], line[i+1:]
	if j := bytes.LastIndexByte(target, ' '); j >= 0 {
		target, version = target[:j], target[j+1:]
		if !validVersion(version) {
			if complete || len(version) >= 8 || !hasPrefix([]byte("HTTP/1.1"), string(version)) {
				return nil, nil, nil, false
			}
			version = nil // cut short
		}
	} else if complete {
		return nil, nil, nil, false // HTTP/0.9 or not HTTP
	}
	target = bytes.Trim(target, " ")
	for _, c := range target {
		if c < ' ' || c == 0x7f {
			return nil, nil, nil, false
		}
	}
	if complete && len(target) == 0 {
		return nil, nil, nil, false
	}
	return method, target, version, true
}

func validVersion(v []byte) bool {
	return len(v) == 8 && string(v[:7]) == "HTTP/1." && v[7] >= '0' && v[7] <= '9'
}

// parseStatusLine returns the status code of a status line (without its
// CRLF), 0 when a line cut short does not hold it.
func parseStatusLine(line []byte, complete bool) (int, bool) {
	const proto = "HTTP/1.x "
	for i := 0; i < len(proto) && i < len(line); i++ {
		c := line[i]
		if i == 7 {
			if c < '0' || c > '9' {
				return 0, false
			}
		} else if c != proto[i] {
			return 0, false
		}
	}
	if len(line) < 12 {
		if complete {
			return 0, false
		}
		for _, c := range line[min(len(line), 9):] {
			if c < '0' || c > '9' {
				return 0, false
			}
		}
		return 0, true
	}
	status := 0
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return 0, false
		}
		status = status*10 + int(c-'0')
	}
	if status < 100 || len(line) > 12 && line[12] != ' ' {
		return 0, false
	}
	return status, true
}

// plausiblePrefix says whether b, the start of a header section whose start
// line is not complete yet, can start an HTTP message.
func plausiblePrefix(dir protocols.Direction, b []byte) bool {
	if dir == protocols.Response {
		_, ok := parseStatusLine(b, false)
		return ok
	}
	i := 0
	for i < len(b) && i <= maxMethod && isMethodChar(b[i], i) {
		i++
	}
	if i == 0 || i > maxMethod {
		return false
	}
	if i == len(b) {
		return true
	}
	if b[i] != ' ' {
		return false
	}
	for _, c := range b[i+1:] {
		if c < ' ' && c != '\r' || c == 0x7f {
			return false
		}
	}
	return true
}

// request parses a request's header section and queues its exchange.
func (p *parser) request(s *stream, line []byte, complete bool, rest []byte, trunc bool) hdrResult {
	method, target, version, ok := splitRequestLine(line, complete)
	if !ok {
		return hdrGarbage
	}
	var f fields
	scanFields(rest, &f)

	ex := p.push()
	s.ex = ex
	ex.port = -1
	ex.scheme = "http"
	if m, ok := p.cfg.knownMethod(method); ok {
		ex.method = m
	} else {
		ex.method = "_OTHER"
	}
	switch string(version) {
	case "HTTP/1.1":
		ex.version = "1.1"
	case "HTTP/1.0":
		ex.version = "1.0"
	case "":
	default:
		ex.version = versions[version[7]-'0']
	}
	ex.head = ex.method == "HEAD"
	ex.connect = ex.method == "CONNECT"
	p.target(ex, method, target, &f)

	if trunc {
		ex.truncated = true
		return hdrLose
	}
	switch {
	case f.te == teChunked:
		s.hasBody = true
		s.state, s.phase, s.remain, s.digits, s.lineN = stChunkSize, 0, 0, 0, 0
	case f.te == teOther:
		// RFC 9112 6.3: the length cannot be known.
		ex.truncated = true
		return hdrLose
	case f.badCL:
		ex.truncated = true
		return hdrLose
	case f.hasCL && f.cl > 0:
		s.hasBody = true
		s.state, s.remain = stBody, f.cl
	default:
		s.hasBody = f.hasCL
		p.complete(s, false)
	}
	return hdrOK
}

var versions = [10]string{"1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "1.9"}

// target fills in the strings of ex from the request target and the fields.
func (p *parser) target(ex *exchange, method, target []byte, f *fields) {
	var path, query, authority []byte
	hasAuthority := false
	ex.hasPath = true
	switch {
	case len(target) > 0 && target[0] == '/':
		path = target
	case hasPrefixFold(target, "http://") || hasPrefixFold(target, "https://"):
		// absolute-form (to a proxy): the authority replaces Host.
		i := bytes.IndexByte(target, ':')
		if i == 5 {
			ex.scheme = "https"
		}
		rest := target[i+3:]
		j := bytes.IndexAny(rest, "/?#")
		if j < 0 {
			j = len(rest)
		}
		authority, path, hasAuthority = rest[:j], rest[j:], true
		if len(path) == 0 || path[0] != '/' {
			// "http://host?q": the path is "/" (RFC 9112 3.2.2)
			query = path
			path = slash
			if len(query) > 0 && query[0] == '?' {
				query = query[1:]
			} else {
				query = nil
			}
		}
	case ex.connect:
		// authority-form
		authority, hasAuthority = target, true
		ex.hasPath = false
	default: // asterisk-form ("*") or malformed: the target as it is
		path = target
	}
	if ex.hasPath && query == nil {
		if i := bytes.IndexByte(path, '#'); i >= 0 {
			path = path[:i] // a fragment is not sent; drop a stray one
		}
		if i := bytes.IndexByte(path, '?'); i >= 0 {
			path, query = path[:i], path[i+1:]
		}
	}
	if i := bytes.IndexByte(query, '#'); i >= 0 {
		query = query[:i]
	}
	if !hasAuthority && f.hasHost {
		authority, hasAuthority = f.host, true
	}

	b := ex.strs[:0]
	if f.hasUA && len(f.ua) > 0 {
		ex.hasUA = true
		ex.uaOff = len(b)
		b = append(b, f.ua...)
		ex.uaEnd = len(b)
	}
	if hasAuthority {
		if i := bytes.LastIndexByte(authority, '@'); i >= 0 {
			authority = authority[i+1:] // never userinfo
		}
		host, port := splitHostPort(authority)
		if len(host) > 0 {
			ex.hasHost = true
			ex.hostOff = len(b)
			b = append(b, host...)
			ex.hostEnd = len(b)
			ex.port = port
		}
	}
	ex.sumOff = len(b)
	b = append(b, method...)
	ex.methodEnd = len(b)
	b = append(b, ' ')
	if ex.hasPath {
		ex.pathOff = len(b)
		b = append(b, path...)
		ex.pathEnd = len(b)
		if len(query) > 0 {
			b = append(b, '?')
			ex.hasQry = true
			ex.qOff = len(b)
			b = appendRedacted(b, query, p.cfg.redact)
			ex.qEnd = len(b)
		}
	} else {
		// CONNECT: the target is host:port, without userinfo.
		b = append(b, connectTarget(target)...)
	}
	b = append(b, ' ')
	ex.strs = b
}

var slash = []byte("/")

// connectTarget returns an authority-form target without userinfo.
func connectTarget(t []byte) []byte {
	if i := bytes.LastIndexByte(t, '@'); i >= 0 {
		return t[i+1:]
	}
	return t
}

// splitHostPort splits host[:port] or [v6][:port]; port is -1 when absent
// or not a valid port number.
func splitHostPort(a []byte) ([]byte, int) {
	host, port := a, []byte(nil)
	if len(a) > 0 && a[0] == '[' {
		i := bytes.IndexByte(a, ']')
		if i < 0 {
			return a[1:], -1
		}
		host = a[1:i]
		if i+1 < len(a) && a[i+1] == ':' {
			port = a[i+2:]
		}
	} else if i := bytes.LastIndexByte(a, ':'); i >= 0 {
		host, port = a[:i], a[i+1:]
	}
	if len(port) == 0 || len(port) > 5 {
		return host, -1
	}
	n := 0
	for _, c := range port {
		if c < '0' || c > '9' {
			return host, -1
		}
		n = n*10 + int(c-'0')
	}
	if n > 65535 {
		return host, -1
	}
	return host, n
}

// appendRedacted appends query to dst with the values of the parameters
// named in names replaced by "REDACTED".
func appendRedacted(dst, query []byte, names []string) []byte {
	for {
		param := query
		i := bytes.IndexByte(query, '&')
		if i >= 0 {
			param = query[:i]
		}
		if eq := bytes.IndexByte(param, '='); eq >= 0 && sensitive(param[:eq], names) {
			dst = append(dst, param[:eq+1]...)
			dst = append(dst, "REDACTED"...)
		} else {
			dst = append(dst, param...)
		}
		if i < 0 {
			return dst
		}
		dst = append(dst, '&')
		query = query[i+1:]
	}
}

func sensitive(key []byte, names []string) bool {
	for _, n := range names {
		if len(n) == len(key) && string(key) == n {
			return true
		}
	}
	return false
}

// response parses a response's header section and matches it with its
// request.
func (p *parser) response(s *stream, line []byte, complete bool, rest []byte, trunc bool) hdrResult {
	status, ok := parseStatusLine(line, complete)
	if !ok {
		return hdrGarbage
	}
	var f fields
	if status >= 200 || trunc {
		scanFields(rest, &f)
	}
	if !s.interim {
		s.ex = p.match()
		s.orphan = s.ex == nil
	}
	ex := s.ex
	if trunc {
		if ex != nil {
			if status >= 200 {
				ex.status = status
			}
			ex.truncated = true
		}
		return hdrLose
	}
	if status < 200 {
		if status == 101 {
			if ex != nil {
				ex.status = status
			}
			p.goDead(s)
			return hdrDead
		}
		// Interim: the final response follows as part of the exchange.
		s.interim = true
		s.state = stStart
		s.hdrN = 0
		return hdrOK
	}
	s.interim = false
	head, connect := false, false
	if ex != nil {
		ex.status = status
		head, connect = ex.head, ex.connect
	}
	switch {
	case connect && status < 300:
		p.goDead(s) // a tunnel
		return hdrDead
	case head || status == 204 || status == 304:
		p.complete(s, false)
	case f.te == teChunked:
		s.hasBody = true
		s.state, s.phase, s.remain, s.digits, s.lineN = stChunkSize, 0, 0, 0, 0
	case f.te == teOther:
		s.hasBody = true
		s.state = stUntilClose
	case f.badCL:
		if ex != nil {
			ex.truncated = true
		}
		return hdrLose
	case f.hasCL && f.cl > 0:
		s.hasBody = true
		s.state, s.remain = stBody, f.cl
	case f.hasCL:
		s.hasBody = true
		p.complete(s, false)
	default:
		s.hasBody = true
		s.state = stUntilClose
	}
	return hdrOK
}

// goDead ends HTTP on the connection after the response header of s (101
// Switching Protocols, or a CONNECT tunnel established).
func (p *parser) goDead(s *stream) {
	p.complete(s, false)
	if rq := &p.s[protocols.Request]; rq.ex != nil && rq.state != stBody {
		p.complete(rq, false) // the request's body, if any, ends here
	}
	// A request body of declared length still being read stays the
	// request's until its length is reached or the connection ends (Feed,
	// Close): the exchange is emitted then.
	p.dead = true
	p.flush()
}

func trimCR(b []byte) []byte {
	if len(b) > 0 && b[len(b)-1] == '\r' {
		return b[:len(b)-1]
	}
	return b
}

func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// eqFold reports whether b equals lower, an ASCII lower-case string,
// ignoring ASCII case.
func eqFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

func hasPrefixFold(b []byte, lower string) bool {
	return len(b) >= len(lower) && eqFold(b[:len(lower)], lower)
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}
