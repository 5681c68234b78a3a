// Package sockets turns the socket tracer's kernel events into sessions:
// it reads the ring buffer, keeps a table of connections keyed by socket
// cookie, reassembles each direction of each connection by the kernel's
// true byte counts, puts each receive after the sends it came after (a
// send's event is written when its call returns, possibly after another
// thread read the answer: see Stats.HeldReceives), and feeds the bytes to
// the protocol analyzers.
package sockets

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/tlsrec"
	"github.com/clovisor/clovisor/spans"
)

// Config configures a Tracker.
type Config struct {
	// Analyzers recognise and parse protocols.
	Analyzers *protocols.Registry
	// Sink receives every completed session, from the tracker's goroutine.
	Sink func(*spans.Session)
	// MaxConns bounds the connection table (default 65536); the least
	// recently active connection is dropped when it is full.
	MaxConns int
	// IdleTimeout drops connections with no event for this long (default
	// 5 minutes).
	IdleTimeout time.Duration
	// CgroupPath maps a cgroup id to its path (optional).
	CgroupPath func(id uint64) string
	// ProtocolHint, when set, names the protocol of a server address
	// (Kubernetes: from Service port names; "" when unknown): a connection
	// whose server it names a registered analyzer for is parsed by that
	// analyzer, whatever payload detection would say.
	ProtocolHint func(server netip.AddrPort) string
	// Logger (default slog.Default()).
	Logger *slog.Logger
}

// Stats counts what the tracker did and dropped.
type Stats struct {
	Events       uint64 // records read
	BadEvents    uint64 // records that could not be decoded
	Sessions     uint64 // sessions emitted
	Conns        int    // connections in the table now
	ConnsEvicted uint64 // dropped because the table was full
	ConnsExpired uint64 // dropped because they were idle
	Unrecognized uint64 // connections whose protocol no analyzer knew
	GapBytes     uint64 // bytes the kernel saw but never reached us (lost events)
	Reordered    uint64 // data events that arrived behind their stream position
	// HeldReceives counts receives that arrived before the events of
	// sends they came after (another thread's send, whose event is written
	// when its call returns); each waited for those sends. HeldTimedOut
	// counts those given to the analyzer after HoldTimeout without them.
	HeldReceives  uint64
	HeldTimedOut  uint64
	GarbageBytes  int64 // bytes analyzers could not parse
	ParserResyncs int64
	// TLSConns counts connections whose socket bytes were TLS records.
	TLSConns uint64
	// PlaintextEvents counts data events from a TLS library or kernel TLS;
	// DuplicatePlaintext those dropped because another source already
	// gave the connection's plaintext (for example OpenSSL on a kTLS
	// socket: both see the same bytes).
	PlaintextEvents    uint64
	DuplicatePlaintext uint64
}

// Tracker holds the connection table. It is not safe for concurrent use:
// one goroutine feeds it (see Run).
type Tracker struct {
	cfg   Config
	log   *slog.Logger
	conns map[uint64]*conn
	lru   connList // most recently active at the front
	procs procCache
	txs   []*protocols.Transaction
	stats Stats
	// Connections with held receives, and how many are held in all.
	heldConns []*conn
	heldCount int
	newest    uint64           // the newest event's time
	data      probes.DataEvent // decode buffer
	ce        probes.ConnEvent
}

// NewTracker makes a tracker.
func NewTracker(cfg Config) *Tracker {
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 65536
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Analyzers == nil {
		cfg.Analyzers = protocols.NewRegistry()
	}
	if cfg.Sink == nil {
		cfg.Sink = func(*spans.Session) {}
	}
	t := &Tracker{cfg: cfg, log: cfg.Logger.With("component", "sockets"), conns: map[uint64]*conn{}}
	t.lru.init()
	t.procs.entries = map[uint32]procEntry{}
	return t
}

// Stats returns the counters.
func (t *Tracker) Stats() Stats {
	s := t.stats
	s.Conns = len(t.conns)
	for _, c := range t.conns {
		if c.parser != nil {
			ps := c.parser.Stats()
			s.GarbageBytes += ps.Garbage
			s.ParserResyncs += ps.Resyncs
		}
	}
	return s
}

// Handle processes one ring-buffer record.
func (t *Tracker) Handle(raw []byte) {
	t.stats.Events++
	if len(raw) == 0 {
		t.stats.BadEvents++
		return
	}
	switch raw[0] {
	case probes.EventConnOpen, probes.EventConnClose:
		if err := decodeConn(raw, &t.ce); err != nil {
			t.badEvent(err)
			return
		}
		t.handleConn(&t.ce)
		t.newest = max(t.newest, t.ce.Ts)
	case probes.EventData:
		payload, err := decodeData(raw, &t.data)
		if err != nil {
			t.badEvent(err)
			return
		}
		t.handleData(&t.data, payload)
		t.newest = max(t.newest, t.data.Ts)
	default:
		t.stats.BadEvents++
	}
	if t.heldCount > 0 {
		// Events this much newer than a held receive are in: the
		// sends it waits for, written microseconds after it, would be.
		t.Release(t.newest)
	}
}

func (t *Tracker) badEvent(err error) {
	t.stats.BadEvents++
	if t.stats.BadEvents < 10 {
		t.log.Warn("undecodable kernel event", "err", err)
	}
}

func (t *Tracker) handleConn(ev *probes.ConnEvent) {
	switch ev.Kind {
	case probes.EventConnOpen:
		if old, ok := t.conns[ev.Cookie]; ok {
			// A cookie is never reused; a stale entry means its close
			// was lost.
			t.finish(old, ev.Ts)
		}
		c := t.newConn(ev.Cookie, ev.Ts)
		c.role = ev.Role
		c.fromStart = true
		if ev.Flags&probes.FlagSendSeq != 0 {
			c.sendBase, c.sendBaseKnown = ev.SendSeq, true
		}
		c.cgroup = ev.CgroupId
		c.local, c.remote = endpoints(ev.Tuple.Family, &ev.Tuple.Saddr, &ev.Tuple.Daddr, ev.Tuple.Sport, ev.Tuple.Dport)
		if ev.Tgid != 0 {
			// The task that connected or accepted.
			c.pid = ev.Tgid
			c.process = t.procs.lookup(ev.Tgid, ev.Comm[:])
		}
	case probes.EventConnClose:
		if c, ok := t.conns[ev.Cookie]; ok {
			t.finish(c, ev.Ts)
		}
	}
}

func (t *Tracker) newConn(cookie, ts uint64) *conn {
	if len(t.conns) >= t.cfg.MaxConns {
		if old := t.lru.back(); old != nil {
			t.stats.ConnsEvicted++
			t.finish(old, ts)
		}
	}
	c := &conn{cookie: cookie, lastTS: ts}
	t.conns[cookie] = c
	t.lru.pushFront(c)
	return c
}

// finish flushes a connection's pending transaction and forgets it.
func (t *Tracker) finish(c *conn, ts uint64) {
	t.releaseHeld(c, 0, true)
	if c.parser != nil {
		t.txs = c.parser.Close(ts, t.txs[:0])
		t.emit(c, t.txs)
		ps := c.parser.Stats()
		t.stats.GarbageBytes += ps.Garbage
		t.stats.ParserResyncs += ps.Resyncs
		c.parser = nil
	}
	delete(t.conns, c.cookie)
	t.lru.remove(c)
}

func (t *Tracker) handleData(ev *probes.DataEvent, payload []byte) {
	c, ok := t.conns[ev.Cookie]
	if !ok {
		// A connection that predates the agent, or whose open event was
		// lost: its role is found from the payload.
		c = t.newConn(ev.Cookie, ev.Ts)
		c.local, c.remote = endpoints(ev.Tuple.Family, &ev.Tuple.Saddr, &ev.Tuple.Daddr, ev.Tuple.Sport, ev.Tuple.Dport)
		c.cgroup = ev.CgroupId
	}
	c.lastTS = ev.Ts
	t.lru.moveToFront(c)
	if c.pid != ev.Tgid || c.process.Comm == "" {
		c.pid = ev.Tgid
		c.process = t.procs.lookup(ev.Tgid, ev.Comm[:])
	}
	if ev.CgroupId != 0 {
		c.cgroup = ev.CgroupId
	}

	if ev.Source != probes.SourceSocket {
		t.handlePlain(c, ev, payload)
		return
	}

	call := socketCall{dir: ev.Dir, seq: ev.Seq, len: ev.Len, ts: ev.Ts, sent: ev.SentSeq, payload: payload}
	if ev.Dir == probes.DirRecv {
		// A receive that came after sends not seen yet waits for them,
		// and so does every receive behind it.
		if ev.Flags&probes.FlagSentSeq != 0 && (len(c.held) > 0 || t.sendsMissing(c, ev.SentSeq)) {
			t.hold(c, &call)
			return
		}
		t.socketData(c, &call)
		return
	}
	// A send: first the receives that came before it, then the send,
	// then those that waited for it.
	if len(c.held) > 0 {
		t.releaseHeld(c, call.seq, false)
		if len(c.held) > 0 && int32(c.held[0].sent-(call.seq+call.len)) <= 0 && c.held[0].ts < call.ts {
			// The call returned after its bytes were answered: they
			// were out by the time the answer was read.
			call.ts = c.held[0].ts
		}
	}
	t.socketData(c, &call)
	if len(c.held) > 0 {
		t.releaseHeld(c, call.seq+call.len, false)
	}
}

// socketCall is one send or receive of a socket's own bytes, as its data
// event reported it.
type socketCall struct {
	dir      uint8
	seq, len uint32
	ts       uint64
	sent     uint32 // receives: the send stream's end when the bytes were read
	payload  []byte
}

// HoldTimeout is how long a receive waits for the events of sends it came
// after (see Stats.HeldReceives) before it is analyzed without them. Such
// events are written microseconds apart; they never come when they were
// lost, or made by a call the tracer does not see.
const HoldTimeout = 200 * time.Millisecond

// Bounds on held receives: per connection, and in all.
const (
	maxHeldPerConn = 16
	maxHeld        = 4096
)

// sendsMissing reports whether the socket had sent bytes up to sent whose
// events have not arrived.
func (t *Tracker) sendsMissing(c *conn, sent uint32) bool {
	pos := c.sendBase
	if st := &c.streams[0]; st.started {
		pos = st.next
	} else if !c.sendBaseKnown {
		return false
	}
	return int32(sent-pos) > 0
}

// hold keeps a receive (with a copy of its payload) until the sends it
// came after arrive.
func (t *Tracker) hold(c *conn, call *socketCall) {
	if len(c.held) == 0 && t.heldCount >= maxHeld {
		t.socketData(c, call) // no room: analyzed as it came
		return
	}
	t.stats.HeldReceives++
	if len(c.held) >= maxHeldPerConn || t.heldCount >= maxHeld {
		t.releaseFirst(c)
	}
	call.payload = append([]byte(nil), call.payload...)
	if !c.heldListed {
		t.heldConns = append(t.heldConns, c)
		c.heldListed = true
	}
	c.held = append(c.held, *call)
	t.heldCount++
}

// releaseHeld analyzes, in order, the connection's held receives that
// came after no sent byte from pos on (all of them: all).
func (t *Tracker) releaseHeld(c *conn, pos uint32, all bool) {
	for len(c.held) > 0 && (all || int32(c.held[0].sent-pos) <= 0) {
		t.releaseFirst(c)
	}
}

func (t *Tracker) releaseFirst(c *conn) {
	call := c.held[0]
	c.held[0] = socketCall{}
	c.held = c.held[1:]
	if len(c.held) == 0 {
		c.held = nil
	}
	t.heldCount--
	t.socketData(c, &call)
}

// Release analyzes the receives held since before now-HoldTimeout (now in
// kernel monotonic ns) without the sends they wait for. Handle calls it
// with the newest event's time (a reader that lags behind the kernel
// still finds the sends right behind their receives); Run calls it with
// the clock when it found the ring buffer empty.
func (t *Tracker) Release(now uint64) {
	if len(t.heldConns) == 0 {
		return
	}
	limit := uint64(HoldTimeout.Nanoseconds())
	kept := t.heldConns[:0]
	for _, c := range t.heldConns {
		for len(c.held) > 0 && c.held[0].ts+limit <= now {
			t.stats.HeldTimedOut++
			t.releaseFirst(c)
		}
		if len(c.held) > 0 {
			kept = append(kept, c)
		} else {
			c.heldListed = false
		}
	}
	clear(t.heldConns[len(kept):])
	t.heldConns = kept
}

// socketData follows a call's stream position and gives its bytes to the
// connection's analyzer.
func (t *Tracker) socketData(c *conn, ev *socketCall) {
	// Keep each direction in step with the kernel's stream position.
	st := &c.streams[0]
	if ev.dir == probes.DirRecv {
		st = &c.streams[1]
	}
	if !st.started && c.fromStart && c.role != probes.RoleUnknown && t.direction(c, ev.dir) == protocols.Request {
		// The TCP sequence number of the first request byte is the same
		// at both ends of the connection: it tells the client's and the
		// server's view of one connection apart from another's with the
		// same addresses.
		c.tag = 1<<32 | uint64(ev.seq)
	}
	gap := 0
	if st.started {
		d := int32(ev.seq - st.next)
		if d < 0 {
			t.stats.Reordered++
			return
		}
		gap = int(d)
	}
	st.started = true
	st.next = ev.seq + ev.len

	if c.tls || c.plainSrc != probes.SourceSocket {
		// Ciphertext: only the handshake's clear facts are read; the
		// plaintext comes from a TLS source.
		if c.tls && (!c.hello.ClientHello || !c.hello.ServerHello) {
			t.readHello(c, ev.dir, ev.payload)
		}
		return
	}
	if c.unrecognized {
		return
	}
	if c.parser == nil {
		if tlsrec.IsRecord(ev.payload) {
			c.tls = true
			t.stats.TLSConns++
			t.readHello(c, ev.dir, ev.payload)
			return
		}
		if !t.detect(c, ev.dir, ev.payload) {
			return
		}
	}
	t.feed(c, ev.dir, ev.payload, ev.len, ev.ts, gap)
}

// feed gives the analyzer one call's bytes (after gap bytes that were not
// seen) and emits the transactions it completes.
func (t *Tracker) feed(c *conn, kdir uint8, payload []byte, n uint32, ts uint64, gap int) {
	dir := t.direction(c, kdir)
	txs := t.txs[:0]
	if gap > 0 {
		t.stats.GapBytes += uint64(gap)
		txs = c.parser.Feed(protocols.Chunk{Dir: dir, Len: gap, TS: ts}, txs)
	}
	txs = c.parser.Feed(protocols.Chunk{Dir: dir, Data: payload, Len: int(n), TS: ts}, txs)
	t.txs = txs
	t.emit(c, txs)
}

// handlePlain takes plaintext from a TLS library or kernel TLS. Such
// events carry no TCP sequence numbers: they arrive in the order the
// process made its calls, and nothing is missing between them unless the
// kernel counted a lost event.
func (t *Tracker) handlePlain(c *conn, ev *probes.DataEvent, payload []byte) {
	t.stats.PlaintextEvents++
	if c.plainSrc == probes.SourceSocket {
		c.plainSrc = ev.Source
		if c.parser != nil {
			// The analyzer read the socket's bytes as plaintext: they
			// were not (a protocol that starts in the clear and turns
			// to TLS). Start over on the real plaintext.
			c.parser = nil
			c.protocol = ""
		}
		c.tries, c.unrecognized = 0, false
	} else if ev.Source != c.plainSrc {
		t.stats.DuplicatePlaintext++
		return
	}
	if ev.TlsVersion != 0 {
		c.tlsVersion = ev.TlsVersion
	}
	if c.unrecognized {
		return
	}
	if c.parser == nil && !t.detect(c, ev.Dir, payload) {
		return
	}
	t.feed(c, ev.Dir, payload, ev.Len, ev.Ts, 0)
}

// readHello reads the clear part of a TLS handshake from the socket's
// bytes. A hello from the side in the client's role fixes the role of a
// connection that predates the agent.
func (t *Tracker) readHello(c *conn, kdir uint8, payload []byte) {
	before := c.hello
	if !c.hello.Read(payload) {
		return
	}
	if c.role == probes.RoleUnknown {
		switch {
		case c.hello.ClientHello && !before.ClientHello:
			c.role = roleOf(kdir, true)
		case c.hello.ServerHello && !before.ServerHello:
			c.role = roleOf(kdir, false)
		}
	}
}

// tlsOf returns the connection's TLS facts for a session (nil: not TLS).
func (t *Tracker) tlsOf(c *conn) *spans.TLSInfo {
	if !c.tls && c.plainSrc == probes.SourceSocket {
		return nil
	}
	v := c.hello.Version
	if c.tlsVersion != 0 {
		v = c.tlsVersion
	}
	info := spans.TLSInfo{
		Version:    tlsrec.VersionName(v),
		Cipher:     tlsrec.CipherName(c.hello.CipherSuite),
		ServerName: c.hello.ServerName,
	}
	if c.tlsInfo == nil || *c.tlsInfo != info {
		c.tlsInfo = &info
	}
	return c.tlsInfo
}

// httpsScheme: an analyzer reading TLS plaintext took the scheme for
// "http"; on a TLS connection it is "https".
func httpsScheme(tx *protocols.Transaction) {
	tx.ReplaceAttr(semconv.URLSchemeKey.String("https"))
}

// sourceNames are the values of clovisor.payload.source.
var sourceNames = [...]string{
	probes.SourceSocket:  "socket",
	probes.SourceOpenSSL: "openssl",
	probes.SourceGoTLS:   "go_tls",
	probes.SourceKTLS:    "ktls",
}

func sourceName(src uint8) string {
	if int(src) < len(sourceNames) {
		return sourceNames[src]
	}
	return "unknown"
}

// detectTries is how many payload-bearing calls may pass before a
// connection is declared unrecognized.
const detectTries = 4

// detect picks the connection's analyzer (and its role, when unknown) from
// the first payload seen. It reports whether the connection has a parser.
func (t *Tracker) detect(c *conn, kdir uint8, payload []byte) bool {
	if len(payload) == 0 {
		return false
	}
	if a, role, ok := t.hinted(c); ok {
		if c.role == probes.RoleUnknown {
			c.role = role
		}
		c.parser = a.NewParser()
		c.protocol = a.Name()
		return true
	}
	role := c.role
	if role == probes.RoleUnknown {
		// As a request, these bytes make the sender the client.
		if a, ok := t.cfg.Analyzers.Detect(protocols.Request, payload); ok {
			c.role = roleOf(kdir, true)
			c.parser = a.NewParser()
			c.protocol = a.Name()
			return true
		}
		if a, ok := t.cfg.Analyzers.Detect(protocols.Response, payload); ok {
			c.role = roleOf(kdir, false)
			c.parser = a.NewParser()
			c.protocol = a.Name()
			return true
		}
	} else {
		dir := t.direction(c, kdir)
		if a, ok := t.cfg.Analyzers.Detect(dir, payload); ok {
			c.parser = a.NewParser()
			c.protocol = a.Name()
			return true
		}
	}
	c.tries++
	if c.tries >= detectTries {
		c.unrecognized = true
		t.stats.Unrecognized++
	}
	return false
}

// hinted returns the analyzer Config.ProtocolHint names for the
// connection's server (the local end: we are the server; the remote end:
// the client).
func (t *Tracker) hinted(c *conn) (protocols.Analyzer, uint8, bool) {
	if t.cfg.ProtocolHint == nil {
		return nil, 0, false
	}
	for _, e := range [2]struct {
		ap   netip.AddrPort
		role uint8
	}{{c.local, probes.RoleServer}, {c.remote, probes.RoleClient}} {
		if name := t.cfg.ProtocolHint(e.ap); name != "" {
			a, ok := t.cfg.Analyzers.Lookup(name)
			return a, e.role, ok
		}
	}
	return nil, 0, false
}

// roleOf: a request sent makes us the client; a request received, the
// server.
func roleOf(kdir uint8, isRequest bool) uint8 {
	if (kdir == probes.DirSend) == isRequest {
		return probes.RoleClient
	}
	return probes.RoleServer
}

func (t *Tracker) direction(c *conn, kdir uint8) protocols.Direction {
	sent := kdir == probes.DirSend
	if (c.role == probes.RoleClient) == sent {
		return protocols.Request
	}
	return protocols.Response
}

func (t *Tracker) emit(c *conn, txs []*protocols.Transaction) {
	for _, tx := range txs {
		s := &spans.Session{
			Point:     spans.PointSocket,
			Transport: "tcp",
			Process:   c.process,
			CgroupID:  c.cgroup,
			ConnID:    c.cookie,
			ConnTag:   c.tag,
			Index:     -1,
			Tx:        tx,

			PayloadSource: sourceName(c.plainSrc),
			TLS:           t.tlsOf(c),
		}
		if s.TLS != nil {
			httpsScheme(tx)
		}
		if c.fromStart {
			s.Index = c.index
		}
		c.index++
		if c.role == probes.RoleClient {
			s.Kind, s.Client, s.Server = spans.Client, c.local, c.remote
		} else {
			s.Kind, s.Client, s.Server = spans.Server, c.remote, c.local
		}
		if t.cfg.CgroupPath != nil {
			s.CgroupPath = t.cfg.CgroupPath(c.cgroup)
		}
		t.stats.Sessions++
		t.cfg.Sink(s)
	}
}

// Expire drops connections idle since before now-IdleTimeout (now in
// kernel monotonic ns), flushing their pending transactions.
func (t *Tracker) Expire(now uint64) {
	limit := uint64(t.cfg.IdleTimeout.Nanoseconds())
	for {
		c := t.lru.back()
		if c == nil || now < limit || c.lastTS >= now-limit {
			return
		}
		t.stats.ConnsExpired++
		t.finish(c, now)
	}
}

// Flush ends every connection (at shutdown).
func (t *Tracker) Flush(now uint64) {
	for c := t.lru.back(); c != nil; c = t.lru.back() {
		t.finish(c, now)
	}
}

// procCache remembers executable names per process.
type procCache struct {
	entries map[uint32]procEntry
}

type procEntry struct {
	comm string
	exe  string
}

const maxProcs = 8192

func (p *procCache) lookup(tgid uint32, rawComm []byte) spans.Process {
	comm := cstring(rawComm)
	if e, ok := p.entries[tgid]; ok && e.comm == comm {
		return spans.Process{PID: tgid, Comm: comm, Exe: e.exe}
	}
	exe := ""
	if target, err := os.Readlink("/proc/" + strconv.FormatUint(uint64(tgid), 10) + "/exe"); err == nil {
		exe = filepath.Base(target)
	}
	if len(p.entries) >= maxProcs {
		clear(p.entries)
	}
	p.entries[tgid] = procEntry{comm: comm, exe: exe}
	return spans.Process{PID: tgid, Comm: comm, Exe: exe}
}
