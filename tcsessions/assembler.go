package tcsessions

import (
	"fmt"
	"net/netip"
	"strconv"

	"github.com/clovisor/clovisor/protocols"
)

// DefaultMaxConns bounds the connections an Assembler follows at once.
const DefaultMaxConns = 16384

// maxQueuedPieces bounds the counts an Assembler keeps per direction of a
// connection for transactions not yet complete.
const maxQueuedPieces = 256

// AssemblerConfig configures an Assembler.
type AssemblerConfig struct {
	// Analyzers read the L7 transactions from the payload prefixes (nil:
	// L3/L4 facts only).
	Analyzers *protocols.Registry
	// Interface names an interface and its role by index (nil: the
	// index as the name, pod role).
	Interface func(ifindex int) (name string, role Role, ok bool)
	// Workload names the workload behind an address seen on an
	// interface (the end of an exchange inside the pod or the node), ""
	// when none is known. nil: none.
	Workload func(ifindex int, addr netip.Addr) string
	// MaxConns bounds the connections followed at once (default
	// DefaultMaxConns); beyond it the least recently active one is
	// forgotten, with the transactions it had not reported yet (Evicted).
	MaxConns int
}

// AssemblerStats count what an Assembler did.
type AssemblerStats struct {
	// Exchanges and Payloads are the kernel's records and payload events
	// handled.
	Exchanges, Payloads uint64
	// Parsed counts the transactions an analyzer read (each reported as
	// one Exchange); Pipelined counts those reported beyond the first of
	// their wire exchange (pipelining). Unrecognised counts connections
	// whose payload no analyzer accepted.
	Parsed, Pipelined, Unrecognised uint64
	// Orphans counts payload events dropped: their exchange was reported
	// already, or they came out of stream order.
	Orphans uint64
	// BadEvents counts events that could not be decoded.
	BadEvents uint64
	// IdleFlushed counts exchanges made by FlushIdle; Duplicates the
	// kernel records of those that came later and were dropped.
	IdleFlushed, Duplicates uint64
	// Evicted counts connections forgotten because MaxConns were
	// followed; Expired those forgotten after they left the kernel's
	// sessions table without a last record.
	Evicted, Expired uint64
	// Unparsed counts wire exchanges of recognised connections reported
	// without an L7 transaction (the parser found none in their bytes).
	Unparsed uint64
}

// connKey names one connection on one interface.
type connKey struct {
	tuple tcConnTuple
	start uint64
}

// markRec is a captured packet of a direction not yet recorded: its
// exchange, its mark (0: the exchange's first new payload; n: a later
// packet that began a message) and the exchange's counts before it.
type markRec struct {
	index uint32
	n     uint16
	seq   uint32
	ts    uint64
	at    tcDirCounters
}

// piece is a part of one direction of one wire exchange: the packets from
// one captured packet to the next (or the exchange's ends). It counts for
// the transaction its first new byte (seq) belongs to; a piece without new
// payload counts for the transaction in progress. Its flags are those of
// the whole wire exchange's direction (the kernel does not split them).
type piece struct {
	seq    uint32
	hasSeq bool
	kidx   uint32 // the wire exchange
	c      tcDirCounters
	flags  uint32
}

// dirState follows one direction of a connection.
type dirState struct {
	pos   uint32 // the next stream byte for the parser
	posOK bool
	// recEnd is the stream position at the end of the last record (the
	// start of the current wire exchange).
	recEnd uint32
	recOK  bool
	// msg is where the next transaction's message begins.
	msg    uint32
	msgOK  bool
	marks  []markRec
	pieces []piece
	// first is the first prefix of the current wire exchange, kept for
	// connections without an analyzer (Exchange.RequestPrefix /
	// ResponsePrefix).
	first []byte
	last  uint64 // the last captured packet's time
	// recent are the last captured packets' times and positions: a
	// transaction's message starts where the packet of its start time
	// did, or later (see anchor).
	recent [8]struct {
		ts   uint64
		seq  uint32
		kidx uint32
	}
	rn int
}

// kidxAt returns the wire exchange of the captured packet of time ts.
func (ds *dirState) kidxAt(ts uint64) (uint32, bool) {
	for i := range ds.recent {
		if r := &ds.recent[i]; r.ts == ts && ts != 0 {
			return r.kidx, true
		}
	}
	return 0, false
}

// anchor returns where a message that began in a packet at time ts
// starts: msg (where the last message ended) unless the packet of ts began
// after it (the parser found its place again after bytes it could not
// read: lost events, garbage).
func (ds *dirState) anchor(ts uint64) uint32 {
	for i := range ds.recent {
		r := &ds.recent[i]
		if r.ts == ts && ts != 0 {
			if !ds.msgOK || int32(r.seq-ds.msg) > 0 {
				return r.seq
			}
			break
		}
	}
	return ds.msg
}

// conn is an Assembler's state of one connection.
type conn struct {
	key          connKey
	parser       protocols.Parser
	tries        int
	unrecognised bool
	d            [2]dirState
	// txs are transactions complete on the wire, waiting for their
	// record (which brings their counts).
	txs   []*protocols.Transaction
	next  int   // the Index of the next report
	lastK int64 // the last wire exchange recorded, -1 none
	// lastTxK is the wire exchange the last report began in (-1 none):
	// wire exchanges between it and the next report's, lost with all
	// their events, still count in the numbering.
	lastTxK int64
	idleRec bool // the last record had no transaction
	// An intrusive list, most recently active first.
	prev, nextC *conn
	swept       bool // not seen in the last sessions-table sweep
}

// Assembler turns the kernel's events into Exchanges. It follows each
// connection: one parser per connection reads the captured packets in
// stream order, with the bytes not captured as gaps of known length; a
// wire exchange's record brings the counts of its packets, which go to the
// transactions whose messages those packets began (see Handle). It is not
// safe for concurrent use.
type Assembler struct {
	cfg   AssemblerConfig
	conns map[connKey]*conn
	head  *conn
	tail  *conn
	stats AssemblerStats
	hdr   PayloadEvent  // decode buffer of payload headers
	rec   ExchangeEvent // decode buffer of records
	marks []markRec     // cut's buffer
}

// NewAssembler returns an Assembler.
func NewAssembler(cfg AssemblerConfig) *Assembler {
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	return &Assembler{cfg: cfg, conns: map[connKey]*conn{}}
}

// Stats returns the counters.
func (a *Assembler) Stats() AssemblerStats { return a.stats }

// Conns is the number of connections followed.
func (a *Assembler) Conns() int { return len(a.conns) }

// Handle takes one event from the ring buffer and appends the exchanges it
// completes to out: none for a payload event, one or more for a record
// (one per transaction the analyzers read, or one with the L3/L4 facts).
func (a *Assembler) Handle(raw []byte, out []*Exchange) ([]*Exchange, error) {
	if len(raw) == 0 {
		a.stats.BadEvents++
		return out, fmt.Errorf("empty event")
	}
	switch raw[0] {
	case eventPayload:
		data, err := decodePayloadHeader(raw, &a.hdr)
		if err != nil {
			a.stats.BadEvents++
			return out, err
		}
		a.stats.Payloads++
		a.payload(&a.hdr, data)
		return out, nil
	case eventExchange:
		if err := decodeExchangeInto(raw, &a.rec); err != nil {
			a.stats.BadEvents++
			return out, err
		}
		a.stats.Exchanges++
		return a.record(&a.rec, out), nil
	}
	a.stats.BadEvents++
	return out, fmt.Errorf("unknown event kind %d", raw[0])
}

// lookup returns the state of a connection, made when missing.
func (a *Assembler) lookup(k connKey) *conn {
	c := a.conns[k]
	if c != nil {
		c.swept = false
		if c != a.head {
			a.unlink(c)
			a.pushFront(c)
		}
		return c
	}
	for len(a.conns) >= a.cfg.MaxConns && a.tail != nil {
		a.stats.Evicted++
		a.forget(a.tail)
	}
	c = &conn{key: k, lastK: -1, lastTxK: -1}
	a.conns[k] = c
	a.pushFront(c)
	return c
}

func (a *Assembler) forget(c *conn) {
	a.unlink(c)
	delete(a.conns, c.key)
}

func (a *Assembler) pushFront(c *conn) {
	c.prev, c.nextC = nil, a.head
	if a.head != nil {
		a.head.prev = c
	}
	a.head = c
	if a.tail == nil {
		a.tail = c
	}
}

func (a *Assembler) unlink(c *conn) {
	if c.prev != nil {
		c.prev.nextC = c.nextC
	} else {
		a.head = c.nextC
	}
	if c.nextC != nil {
		c.nextC.prev = c.prev
	} else {
		a.tail = c.prev
	}
	c.prev, c.nextC = nil, nil
}

// gap feeds the parser the bytes of direction d up to to that were not
// captured.
func (a *Assembler) gap(c *conn, d int, to uint32, ts uint64) {
	ds := &c.d[d]
	if !ds.posOK {
		return
	}
	n := int32(to - ds.pos)
	if n <= 0 {
		return
	}
	ds.pos = to
	if c.parser != nil {
		c.txs = c.parser.Feed(protocols.Chunk{Dir: protocols.Direction(d), Len: int(n), TS: ts}, c.txs)
	}
}

// payload handles a captured packet: the parser reads it now (after the
// bytes of both directions not captured before it), its mark waits for
// the record.
func (a *Assembler) payload(e *PayloadEvent, data []byte) {
	c := a.lookup(connKey{tuple: e.Tuple, start: e.FirstTs})
	if int64(e.Index) <= c.lastK {
		a.stats.Orphans++ // its exchange was reported already
		return
	}
	d, o := int(e.Dir&1), int(e.Dir&1)^1
	ds := &c.d[d]
	if ds.posOK && int32(e.Seq-ds.pos) < 0 {
		a.stats.Orphans++ // behind what the parser read: out of order
		return
	}
	if !ds.recOK {
		// The exchange began this many new bytes before it.
		ds.recEnd, ds.recOK = e.Seq-uint32(e.At.NewBytes), true
	}
	if !ds.posOK {
		ds.pos, ds.posOK = ds.recEnd, true
	}
	// The other direction, up to where it stood when this packet passed;
	// then this one, up to the packet.
	if os := &c.d[o]; os.recOK {
		a.gap(c, o, os.recEnd+uint32(e.PeerNewBytes), e.Ts)
	}
	a.gap(c, d, e.Seq, e.Ts)
	ds.marks = append(ds.marks, markRec{index: e.Index, n: e.Mark, seq: e.Seq, ts: e.Ts, at: e.At})
	ds.last = e.Ts
	r := &ds.recent[ds.rn%len(ds.recent)]
	r.ts, r.seq, r.kidx = e.Ts, e.Seq, e.Index
	ds.rn++

	if c.parser == nil && !c.unrecognised && a.cfg.Analyzers != nil && len(data) > 0 {
		// The table's protocol (e.g. from a Service port name) decides
		// when an analyzer has that name; payload detection otherwise.
		an, ok := a.cfg.Analyzers.Lookup(ProtocolName(e.Proto))
		if !ok {
			an, ok = a.cfg.Analyzers.Detect(protocols.Direction(d), data)
		}
		if ok {
			c.parser = an.NewParser()
		} else if d == int(dirRequest) {
			c.tries++
			if c.tries >= detectTries {
				c.unrecognised = true
				a.stats.Unrecognised++
			}
		}
	}
	if c.parser != nil {
		if !ds.msgOK {
			ds.msg, ds.msgOK = e.Seq, true
		}
		c.txs = c.parser.Feed(protocols.Chunk{Dir: protocols.Direction(d), Data: data, Len: int(e.Len), TS: e.Ts}, c.txs)
	} else if e.Mark == 0 {
		ds.first = append(ds.first[:0], data...)
	}
	ds.pos = e.Seq + e.Len
}

// detectTries is how many request prefixes may pass before a connection is
// declared unrecognised.
const detectTries = 4

// isFinal tells whether a record is a connection's last.
func isFinal(e *ExchangeEvent) bool {
	switch End(e.End) {
	case EndFIN, EndRST, EndReused:
		return true
	}
	return false
}

// record handles a wire exchange's record: the parser reads the bytes of
// the exchange not captured, the exchange's counts are cut into pieces at
// its captured packets, and every transaction complete by now is reported
// with the pieces its messages began.
func (a *Assembler) record(e *ExchangeEvent, out []*Exchange) []*Exchange {
	c := a.lookup(connKey{tuple: e.Tuple, start: e.FirstTs})
	final := isFinal(e)
	if int64(e.Index) <= c.lastK {
		// FlushIdle reported it from the sessions table.
		a.stats.Duplicates++
		if final {
			a.forget(c)
		}
		return out
	}

	// The rest of each direction's bytes, then its pieces.
	lastTS := [2]uint64{e.ReqLastTs, e.RespLastTs}
	for d := range 2 {
		ds := &c.d[d]
		newBytes := uint32(e.Dir[d].NewBytes)
		if ds.recOK {
			end := ds.recEnd + newBytes
			a.gap(c, d, end, max(lastTS[d], ds.last))
			ds.recEnd = end
			if !ds.posOK || int32(end-ds.pos) > 0 {
				ds.pos, ds.posOK = end, true
			}
		}
		a.cut(ds, e, d)
	}
	if final && c.parser != nil {
		c.txs = c.parser.Close(e.EndTs, c.txs)
	}

	n0 := len(out)
	if c.parser == nil {
		out = append(out, a.l4(c, e, e.Index, e.Dir, [2]uint32{e.Flags[0], e.Flags[1]}))
		for d := range 2 {
			c.d[d].pieces = c.d[d].pieces[:0]
		}
	} else {
		txs := c.txs
		for i, tx := range txs {
			// Counts of messages no transaction came of (their
			// events lost, or not understood) go before it, with
			// their L3/L4 facts.
			if y := a.stale(c, e, tx); y != nil {
				out = append(out, y)
				a.stats.Unparsed++
			}
			x := a.fromPieces(c, e, tx)
			if len(txs) == 1 && x.single(e.Index) {
				// One transaction from this exchange alone: the
				// wire's times of the exchange are its own.
				x.ReqFirst, x.ReqLast, x.RespFirst, x.RespLast = e.ReqFirstTs, e.ReqLastTs, e.RespFirstTs, e.RespLastTs
			}
			tx.ReqStart, tx.ReqEnd = x.ReqFirst, x.ReqLast
			if x.RespFirst != 0 {
				tx.RespStart, tx.RespEnd = x.RespFirst, x.RespLast
			}
			if i < len(txs)-1 {
				x.End = EndPipelined
			}
			if i > 0 {
				a.stats.Pipelined++
			}
			a.stats.Parsed++
			out = append(out, x)
			txs[i] = nil
		}
		c.txs = txs[:0]
		queued := len(c.d[0].pieces) + len(c.d[1].pieces)
		switch {
		case queued > 0 && final && len(out) > n0:
			// What came after the last message (the close) counts
			// for the last transaction.
			x := out[len(out)-1]
			for d := range 2 {
				addPieces(x.dir(d), c.d[d].pieces)
				c.d[d].pieces = c.d[d].pieces[:0]
			}
		case queued > 0 && (final || c.idleRec || queued > maxQueuedPieces):
			// No transaction came of these bytes (twice): report
			// them with their L3/L4 facts.
			var dir [2]tcDirCounters
			var flags [2]uint32
			k := e.Index
			for d := range 2 {
				for i, p := range c.d[d].pieces {
					addCounters(&dir[d], &p.c)
					flags[d] |= p.flags
					if i == 0 {
						k = min(k, p.kidx)
					}
				}
				c.d[d].pieces = c.d[d].pieces[:0]
			}
			out = append(out, a.l4(c, e, k, dir, flags))
			a.stats.Unparsed++
		}
		c.idleRec = len(out) == n0
	}
	c.lastK = int64(e.Index)
	c.d[0].first, c.d[1].first = c.d[0].first[:0], c.d[1].first[:0]
	if final {
		a.forget(c)
	}
	return out
}

// cut turns the marks of the recorded exchange in direction d into
// pieces queued for the transactions.
func (a *Assembler) cut(ds *dirState, e *ExchangeEvent, d int) {
	total := e.Dir[d]
	flags := e.Flags[d]
	marks := a.marks[:0]
	defer func() { a.marks = marks[:0] }()
	keep := ds.marks[:0]
	for _, m := range ds.marks {
		switch {
		case m.index == e.Index:
			marks = append(marks, m)
		case int32(m.index-e.Index) > 0:
			keep = append(keep, m) // a later exchange's (racing its record)
		}
	}
	// Marks of this exchange are in arrival order, which is mark order
	// except for packets of one direction racing on two CPUs.
	for i := 1; i < len(marks); i++ {
		for j := i; j > 0 && marks[j].n < marks[j-1].n; j-- {
			marks[j], marks[j-1] = marks[j-1], marks[j]
		}
	}
	if len(marks) == 0 || marks[0].n != 0 {
		// No first payload captured: one piece, placed by what the
		// parser was at.
		p := piece{kidx: e.Index, c: total, flags: flags}
		if len(marks) > 0 {
			p.seq, p.hasSeq = marks[0].seq, true
		}
		ds.pieces = appendPiece(ds.pieces, p)
	} else {
		var prev tcDirCounters
		for i, m := range marks {
			next := total
			if i+1 < len(marks) {
				next = marks[i+1].at
			}
			p := piece{seq: m.seq, hasSeq: true, kidx: e.Index, c: subCounters(next, prev), flags: flags}
			ds.pieces = appendPiece(ds.pieces, p)
			prev = next
		}
	}
	// The marks slice is reused: keep's elements were copied forward.
	ds.marks = keep
}

func appendPiece(ps []piece, p piece) []piece {
	if len(ps) >= maxQueuedPieces*2 {
		// Never reached in practice (record bounds it); merge into the
		// last rather than grow.
		addCounters(&ps[len(ps)-1].c, &p.c)
		ps[len(ps)-1].flags |= p.flags
		return ps
	}
	return append(ps, p)
}

// subCounters returns a - b, each field at least 0 (the kernel's
// snapshots race with packets of the same direction on other CPUs).
func subCounters(a, b tcDirCounters) tcDirCounters {
	sub := func(x, y uint64) uint64 {
		if x < y {
			return 0
		}
		return x - y
	}
	return tcDirCounters{
		Bytes: sub(a.Bytes, b.Bytes), Packets: sub(a.Packets, b.Packets),
		PayloadBytes: sub(a.PayloadBytes, b.PayloadBytes), NewBytes: sub(a.NewBytes, b.NewBytes),
		RetransPackets: sub(a.RetransPackets, b.RetransPackets),
	}
}

func addCounters(dst *tcDirCounters, c *tcDirCounters) {
	dst.Bytes += c.Bytes
	dst.Packets += c.Packets
	dst.PayloadBytes += c.PayloadBytes
	dst.NewBytes += c.NewBytes
	dst.RetransPackets += c.RetransPackets
}

func addPieces(dst *Direction, ps []piece) {
	for i := range ps {
		p := &ps[i]
		dst.Bytes += p.c.Bytes
		dst.Packets += p.c.Packets
		dst.PayloadBytes += p.c.PayloadBytes
		dst.NewBytes += p.c.NewBytes
		dst.RetransPackets += p.c.RetransPackets
		dst.Flags |= uint8(p.flags)
	}
}

// base returns an Exchange with the facts of the connection and record,
// for a transaction that began in wire exchange k.
func (a *Assembler) base(c *conn, e *ExchangeEvent, k uint32) *Exchange {
	switch {
	case c.lastTxK < 0:
		c.next = int(k) // the connection's first report: the wire's numbering
	case int64(k) > c.lastTxK+1:
		c.next += int(int64(k) - c.lastTxK - 1) // wire exchanges lost whole
	}
	c.lastTxK = max(c.lastTxK, int64(k))
	x := &Exchange{
		Ifindex:   int(e.Tuple.Ifindex),
		Client:    netip.AddrPortFrom(fromAddr16(e.Tuple.ClientAddr), e.Tuple.ClientPort),
		Server:    netip.AddrPortFrom(fromAddr16(e.Tuple.ServerAddr), e.Tuple.ServerPort),
		Protocol:  ProtocolName(e.Proto),
		Index:     c.next,
		ConnStart: e.FirstTs,
		SYN:       e.SynTs,
		SYNACK:    e.SynackTs,
		EndTS:     e.EndTs,
		End:       End(e.End),
		Phase:     Phase(e.Phase),
		ConnFlags: e.ConnFlags,
		ReqSeq0:   e.ReqSeq0,
	}
	c.next++
	x.Role = RolePod
	if a.cfg.Interface != nil {
		if name, role, ok := a.cfg.Interface(x.Ifindex); ok {
			x.Interface, x.Role = name, role
		}
	}
	if x.Interface == "" {
		x.Interface = strconv.Itoa(x.Ifindex)
	}
	if a.cfg.Workload != nil {
		in := x.Server.Addr()
		if x.ClientInside() {
			in = x.Client.Addr()
		}
		x.Workload = a.cfg.Workload(x.Ifindex, in)
	}
	return x
}

// l4 reports a wire exchange with its L3/L4 facts only.
func (a *Assembler) l4(c *conn, e *ExchangeEvent, k uint32, dir [2]tcDirCounters, flags [2]uint32) *Exchange {
	x := a.base(c, e, k)
	x.ReqFirst, x.ReqLast, x.RespFirst, x.RespLast = e.ReqFirstTs, e.ReqLastTs, e.RespFirstTs, e.RespLastTs
	x.Request, x.Response = dirOf(dir[0], flags[0]), dirOf(dir[1], flags[1])
	if p := c.d[0].first; len(p) > 0 {
		x.RequestPrefix = append([]byte(nil), p...)
	}
	if p := c.d[1].first; len(p) > 0 {
		x.ResponsePrefix = append([]byte(nil), p...)
	}
	return x
}

// stale reports, as one exchange with L3/L4 facts, the pieces queued from
// wire exchanges before the one tx's request began in (their events were
// lost, or the parser could not read them), nil when there are none. It
// also moves the message positions to where tx's messages begin when the
// parser found its place again after bytes it could not read.
func (a *Assembler) stale(c *conn, e *ExchangeEvent, tx *protocols.Transaction) *Exchange {
	for d, ts := range [2]uint64{tx.ReqStart, tx.RespStart} {
		if ds := &c.d[d]; ds.msgOK && ts != 0 {
			ds.msg = ds.anchor(ts)
		}
	}
	k0, ok := c.d[0].kidxAt(tx.ReqStart)
	if !ok {
		return nil
	}
	var take [2]int
	for d := range 2 {
		ds := &c.d[d]
		for take[d] < len(ds.pieces) && int32(ds.pieces[take[d]].kidx-k0) < 0 {
			take[d]++
		}
	}
	if take[0]+take[1] == 0 {
		return nil
	}
	var dir [2]tcDirCounters
	var flags [2]uint32
	k := e.Index
	for d := range 2 {
		ds := &c.d[d]
		for i, p := range ds.pieces[:take[d]] {
			addCounters(&dir[d], &p.c)
			flags[d] |= p.flags
			if i == 0 {
				k = min(k, p.kidx)
			}
		}
		ds.pieces = append(ds.pieces[:0], ds.pieces[take[d]:]...)
	}
	x := a.l4(c, e, k, dir, flags)
	x.RequestPrefix, x.ResponsePrefix = nil, nil
	return x
}

// fromPieces reports a transaction with the pieces its messages began
// (and those without new bytes before them).
func (a *Assembler) fromPieces(c *conn, e *ExchangeEvent, tx *protocols.Transaction) *Exchange {
	k, ok := c.d[0].kidxAt(tx.ReqStart)
	if !ok {
		// Not among the last captured packets: no wire exchange lost
		// since the last report, as far as can be told.
		k = e.Index
		if c.lastTxK >= 0 {
			k = uint32(c.lastTxK)
		}
	}
	x := a.base(c, e, k)
	x.Tx = tx
	x.ReqFirst, x.ReqLast, x.RespFirst, x.RespLast = tx.ReqStart, tx.ReqEnd, tx.RespStart, tx.RespEnd
	if tx.NoResponse {
		x.Phase = PhaseRequest
	} else {
		x.Phase = PhaseResponse
	}
	for d, n := range [2]int64{tx.ReqBytes, tx.RespBytes} {
		ds := &c.d[d]
		end := ds.msg + uint32(n)
		take := 0
		for ; take < len(ds.pieces); take++ {
			p := &ds.pieces[take]
			if p.hasSeq && (!ds.msgOK || int32(p.seq-end) >= 0) {
				break // it begins a later message
			}
		}
		for i := range take {
			x.notePiece(ds.pieces[i].kidx)
		}
		addPieces(x.dir(d), ds.pieces[:take])
		ds.pieces = append(ds.pieces[:0], ds.pieces[take:]...)
		if ds.msgOK {
			ds.msg = end
		}
	}
	return x
}

// FlushIdle makes the exchanges of open connections whose current exchange
// has its response and has seen no new payload since before now-idle (all
// CLOCK_MONOTONIC ns), from a snapshot of the sessions table: a keep-alive
// connection's last exchange otherwise waits for the next request or the
// close. The record has End EndIdle and the counts of the snapshot; the
// kernel's later record of the same exchange is dropped (packets between
// the snapshot and it, such as the closing FINs, are not reported).
//
// It also forgets the connections that left the sessions table without a
// last record (the LRU forgot them, or the record was lost) and showed no
// activity since the previous call.
func (a *Assembler) FlushIdle(sessions []SessionInfo, now, idle uint64) []*Exchange {
	var out []*Exchange
	live := make(map[connKey]bool, len(sessions))
	for i := range sessions {
		s := &sessions[i]
		e := &s.Entry
		tu := tcConnTuple{
			ClientAddr: addr16(s.Client.Addr()), ServerAddr: addr16(s.Server.Addr()),
			ClientPort: s.Client.Port(), ServerPort: s.Server.Port(), Ifindex: uint32(s.Ifindex),
		}
		k := connKey{tuple: tu, start: e.FirstTs}
		live[k] = true
		if s.Phase() != PhaseResponse || e.ConnFlags&ConnClosed != 0 {
			continue
		}
		req, resp := &e.Dir[dirRequest], &e.Dir[dirResponse]
		last := max(req.LastTs, resp.LastTs)
		if last == 0 || last+idle > now {
			continue
		}
		if c := a.conns[k]; c != nil && int64(s.Index()) <= c.lastK {
			continue // flushed already
		}
		ev := ExchangeEvent{
			Kind: eventExchange, End: uint8(EndIdle), Phase: uint8(PhaseResponse), Proto: e.Proto,
			Index: s.Index(), ConnFlags: e.ConnFlags, ReqSeq0: e.ReqSeq0, FirstTs: e.FirstTs, SynTs: req.OpenTs,
			SynackTs: resp.OpenTs, ReqFirstTs: req.FirstTs, ReqLastTs: req.LastTs, RespFirstTs: resp.FirstTs,
			RespLastTs: resp.LastTs, EndTs: now, Tuple: tu,
		}
		for d := range 2 {
			ev.Dir[d] = subCounters(e.Dir[d].Total, e.Dir[d].Base)
			ev.Flags[d] = e.Dir[d].Flags
		}
		a.stats.IdleFlushed++
		out = a.record(&ev, out)
	}
	for c := a.tail; c != nil; {
		prev := c.prev
		if !live[c.key] {
			if c.swept {
				a.stats.Expired++
				a.forget(c)
			} else {
				c.swept = true
			}
		}
		c = prev
	}
	return out
}
