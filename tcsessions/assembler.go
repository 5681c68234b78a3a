package tcsessions

import (
	"fmt"
	"net/netip"

	"github.com/clovisor/clovisor/protocols"
)

// DefaultMaxPending bounds the payload prefixes an Assembler keeps while
// their exchange is open.
const DefaultMaxPending = 16384

// AssemblerConfig configures an Assembler.
type AssemblerConfig struct {
	// Analyzers read the L7 transaction from the payload prefixes (nil:
	// L3/L4 facts only).
	Analyzers *protocols.Registry
	// Interface names an interface and its role by index (nil: the
	// index as the name, pod role).
	Interface func(ifindex int) (name string, role Role, ok bool)
	// MaxPending bounds the prefixes waiting for their exchange record
	// (default DefaultMaxPending); beyond it the oldest are dropped.
	MaxPending int
}

// AssemblerStats count what an Assembler did.
type AssemblerStats struct {
	// Exchanges and Payloads are the records and prefixes handled.
	Exchanges, Payloads uint64
	// Parsed counts exchanges an analyzer read a transaction from;
	// Unrecognised those with a request prefix no analyzer accepted.
	Parsed, Unrecognised uint64
	// Orphans counts prefixes dropped without their record (the record
	// was lost, the connection forgotten, or MaxPending reached).
	Orphans uint64
	// BadEvents counts events that could not be decoded.
	BadEvents uint64
	// IdleFlushed counts exchanges made by FlushIdle; Duplicates the
	// kernel records of those that came later and were dropped.
	IdleFlushed, Duplicates uint64
}

// prefixKey names one exchange of one connection on one interface.
type prefixKey struct {
	tuple     tcConnTuple
	connStart uint64
	index     uint32
}

type prefixes struct {
	req, resp []byte
}

// Assembler turns the kernel's events into Exchanges: it keeps the payload
// prefixes until the record of their exchange arrives, then runs the
// analyzers over them. It is not safe for concurrent use.
type Assembler struct {
	cfg     AssemblerConfig
	pending map[prefixKey]*prefixes
	order   []prefixKey // insertion order, for the bound
	// flushed are the exchanges FlushIdle made, whose kernel record is
	// still to come (bounded by MaxPending: cleared when full).
	flushed map[prefixKey]bool
	stats   AssemblerStats
	payload PayloadEvent // decode buffer (addPrefix copies what it keeps)
}

// NewAssembler returns an Assembler.
func NewAssembler(cfg AssemblerConfig) *Assembler {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	return &Assembler{cfg: cfg, pending: map[prefixKey]*prefixes{}, flushed: map[prefixKey]bool{}}
}

// Stats returns the counters.
func (a *Assembler) Stats() AssemblerStats { return a.stats }

// Pending is the number of prefixes waiting for their record.
func (a *Assembler) Pending() int { return len(a.pending) }

// Handle takes one event from the ring buffer. It returns the exchange when
// the event was an exchange record, nil for a payload prefix.
func (a *Assembler) Handle(raw []byte) (*Exchange, error) {
	if len(raw) == 0 {
		a.stats.BadEvents++
		return nil, fmt.Errorf("empty event")
	}
	switch raw[0] {
	case eventPayload:
		e := &a.payload
		if err := decodePayloadInto(raw, e); err != nil {
			a.stats.BadEvents++
			return nil, err
		}
		a.stats.Payloads++
		a.addPrefix(e)
		return nil, nil
	case eventExchange:
		e, err := decodeExchange(raw)
		if err != nil {
			a.stats.BadEvents++
			return nil, err
		}
		a.stats.Exchanges++
		k := prefixKey{tuple: e.Tuple, connStart: e.FirstTs, index: e.Index}
		if a.flushed[k] {
			delete(a.flushed, k)
			a.stats.Duplicates++
			return nil, nil
		}
		return a.exchange(e), nil
	}
	a.stats.BadEvents++
	return nil, fmt.Errorf("unknown event kind %d", raw[0])
}

func (a *Assembler) addPrefix(e *PayloadEvent) {
	k := prefixKey{tuple: e.Tuple, connStart: e.FirstTs, index: e.Index}
	p := a.pending[k]
	if p == nil {
		for len(a.pending) >= a.cfg.MaxPending && len(a.order) > 0 {
			old := a.order[0]
			a.order = a.order[1:]
			if _, ok := a.pending[old]; ok {
				delete(a.pending, old)
				a.stats.Orphans++
			}
		}
		p = &prefixes{}
		a.pending[k] = p
		a.order = append(a.order, k)
	}
	data := append([]byte(nil), e.Data[:e.Cap]...)
	if e.Dir == dirRequest {
		p.req = data
	} else {
		p.resp = data
	}
	// Keep the order slice from growing without bound when records take
	// their prefixes out of the middle.
	if len(a.order) > 2*a.cfg.MaxPending {
		live := a.order[:0]
		for _, k := range a.order {
			if _, ok := a.pending[k]; ok {
				live = append(live, k)
			}
		}
		a.order = live
	}
}

func (a *Assembler) exchange(e *ExchangeEvent) *Exchange {
	x := &Exchange{
		Ifindex:   int(e.Tuple.Ifindex),
		Client:    netip.AddrPortFrom(fromAddr16(e.Tuple.ClientAddr), e.Tuple.ClientPort),
		Server:    netip.AddrPortFrom(fromAddr16(e.Tuple.ServerAddr), e.Tuple.ServerPort),
		Protocol:  ProtocolName(e.Proto),
		Index:     int(e.Index),
		ConnStart: e.FirstTs,
		SYN:       e.SynTs,
		SYNACK:    e.SynackTs,
		ReqFirst:  e.ReqFirstTs,
		ReqLast:   e.ReqLastTs,
		RespFirst: e.RespFirstTs,
		RespLast:  e.RespLastTs,
		EndTS:     e.EndTs,
		End:       End(e.End),
		Phase:     Phase(e.Phase),
		ConnFlags: e.ConnFlags,
		Request:   dirOf(e.Dir[0], e.Flags[0]),
		Response:  dirOf(e.Dir[1], e.Flags[1]),
	}
	x.Interface, x.Role = fmt.Sprint(x.Ifindex), RolePod
	if a.cfg.Interface != nil {
		if name, role, ok := a.cfg.Interface(x.Ifindex); ok {
			x.Interface, x.Role = name, role
		}
	}
	k := prefixKey{tuple: e.Tuple, connStart: e.FirstTs, index: e.Index}
	if p, ok := a.pending[k]; ok {
		x.RequestPrefix, x.ResponsePrefix = p.req, p.resp
		delete(a.pending, k)
	}
	a.parse(x)
	return x
}

// parse runs the analyzers over the prefixes: the request prefix decides
// the protocol; the true byte counts of each direction let the parser step
// over what was not captured.
func (a *Assembler) parse(x *Exchange) {
	if a.cfg.Analyzers == nil || x.RequestPrefix == nil {
		return
	}
	// The table's protocol (e.g. from a Service port name) decides when
	// an analyzer has that name; payload detection otherwise.
	an, ok := a.cfg.Analyzers.Lookup(x.Protocol)
	if !ok {
		an, ok = a.cfg.Analyzers.Detect(protocols.Request, x.RequestPrefix)
	}
	if !ok {
		a.stats.Unrecognised++
		return
	}
	p := an.NewParser()
	var txs []*protocols.Transaction
	txs = p.Feed(protocols.Chunk{
		Dir: protocols.Request, Data: x.RequestPrefix,
		Len: max(int(x.Request.NewBytes), len(x.RequestPrefix)), TS: x.ReqFirst,
	}, txs)
	if x.ResponsePrefix != nil {
		txs = p.Feed(protocols.Chunk{
			Dir: protocols.Response, Data: x.ResponsePrefix,
			Len: max(int(x.Response.NewBytes), len(x.ResponsePrefix)), TS: x.RespFirst,
		}, txs)
	}
	if len(txs) == 0 {
		txs = p.Close(x.EndTS, txs)
	}
	if len(txs) == 0 {
		a.stats.Unrecognised++
		return
	}
	tx := txs[0]
	// The wire's times: first and last packet of each direction.
	tx.ReqStart, tx.ReqEnd = x.ReqFirst, x.ReqLast
	if x.RespFirst != 0 {
		tx.RespStart, tx.RespEnd = x.RespFirst, x.RespLast
	}
	x.Tx, x.MoreTx = tx, len(txs)-1
	a.stats.Parsed++
}

// FlushIdle makes the exchanges of open connections whose current exchange
// has its response and has seen no new payload since before now-idle (all
// CLOCK_MONOTONIC ns), from a snapshot of the sessions table: a keep-alive
// connection's last exchange otherwise waits for the next request or the
// close. The record has End EndIdle and the counts of the snapshot; the
// kernel's later record of the same exchange is dropped (packets between
// the snapshot and it, such as the closing FINs, are not reported).
func (a *Assembler) FlushIdle(sessions []SessionInfo, now, idle uint64) []*Exchange {
	var out []*Exchange
	for i := range sessions {
		s := &sessions[i]
		e := &s.Entry
		if s.Phase() != PhaseResponse || e.ConnFlags&ConnClosed != 0 {
			continue
		}
		last := max(e.ReqLastTs, e.RespLastTs)
		if last == 0 || last+idle > now {
			continue
		}
		ev := ExchangeEvent{
			Kind: eventExchange, End: uint8(EndIdle), Phase: uint8(PhaseResponse), Proto: e.Proto,
			Index: s.Index(), ConnFlags: e.ConnFlags, FirstTs: e.FirstTs, SynTs: e.SynTs, SynackTs: e.SynackTs,
			ReqFirstTs: e.ReqFirstTs, ReqLastTs: e.ReqLastTs, RespFirstTs: e.RespFirstTs, RespLastTs: e.RespLastTs,
			EndTs: now, Flags: e.Flags,
		}
		ev.Tuple = tcConnTuple{
			ClientAddr: addr16(s.Client.Addr()), ServerAddr: addr16(s.Server.Addr()),
			ClientPort: s.Client.Port(), ServerPort: s.Server.Port(), Ifindex: uint32(s.Ifindex),
		}
		for d := range 2 {
			t, b := e.Total[d], e.Base[d]
			ev.Dir[d] = tcDirCounters{
				Bytes: t.Bytes - b.Bytes, Packets: t.Packets - b.Packets, PayloadBytes: t.PayloadBytes - b.PayloadBytes,
				NewBytes: t.NewBytes - b.NewBytes, RetransPackets: t.RetransPackets - b.RetransPackets,
			}
		}
		k := prefixKey{tuple: ev.Tuple, connStart: ev.FirstTs, index: ev.Index}
		if a.flushed[k] {
			continue
		}
		if len(a.flushed) >= a.cfg.MaxPending {
			clear(a.flushed)
		}
		a.flushed[k] = true
		a.stats.IdleFlushed++
		out = append(out, a.exchange(&ev))
	}
	return out
}
