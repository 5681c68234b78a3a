package tcsessions

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/clovisor/clovisor/probes"
)

// Kernel types as bpf2go generated them from bpf/tc.h.
type (
	// ExchangeEvent is the kernel's record of one exchange.
	ExchangeEvent = tcExchangeEvent
	// PayloadEvent is a captured payload prefix.
	PayloadEvent = tcPayloadEvent
	// FlowKey is a connection on one interface (SessionEntry.Key); the
	// sessions table is keyed by its 64-bit fingerprint.
	FlowKey = tcFlowKey
	// SessionEntry is a value of the sessions table.
	SessionEntry = tcSession
	// DirCounters are the counts of one direction.
	DirCounters = tcDirCounters
)

// Event kinds, directions, phases, end reasons, flags (enums of bpf/tc.h).
const (
	eventExchange = uint8(tcTcEventKindTC_EVENT_EXCHANGE)
	eventPayload  = uint8(tcTcEventKindTC_EVENT_PAYLOAD)

	dirRequest  = uint8(tcTcDirTC_DIR_REQUEST)
	dirResponse = uint8(tcTcDirTC_DIR_RESPONSE)

	ifaceSessions  = uint32(tcIfaceFlagIFACE_SESSIONS)
	ifaceWorkloads = uint32(tcIfaceFlagIFACE_WORKLOADS)
)

// Phase is how far an exchange got.
type Phase uint8

const (
	// PhaseIdle: no payload (a connection opened and closed without data).
	PhaseIdle = Phase(tcTcPhasePHASE_IDLE)
	// PhaseRequest: request payload, no response payload.
	PhaseRequest = Phase(tcTcPhasePHASE_REQUEST)
	// PhaseResponse: response payload seen.
	PhaseResponse = Phase(tcTcPhasePHASE_RESPONSE)
)

// End says why an exchange record was made.
type End uint8

const (
	EndNextRequest = End(tcExchangeEndEND_NEXT_REQUEST)
	EndFIN         = End(tcExchangeEndEND_FIN)
	EndRST         = End(tcExchangeEndEND_RST)
	EndReused      = End(tcExchangeEndEND_REUSED)
	// EndIdle: user space made the record of an exchange whose response
	// had seen no new payload for Config.IdleFlush while the connection
	// stayed open (keep-alive). The kernel's own record of it, when the
	// next request or the close comes, is then dropped.
	EndIdle End = 100
)

func (e End) String() string {
	switch e {
	case EndNextRequest:
		return "next_request"
	case EndFIN:
		return "fin"
	case EndRST:
		return "rst"
	case EndReused:
		return "reused"
	case EndIdle:
		return "idle"
	case EndPipelined:
		return "pipelined"
	}
	return fmt.Sprintf("end-%d", uint8(e))
}

// Connection flags (ExchangeEvent.ConnFlags, SessionEntry.ConnFlags).
const (
	ConnFINRequest    = uint32(tcConnFlagCONN_FIN_REQUEST)
	ConnFINResponse   = uint32(tcConnFlagCONN_FIN_RESPONSE)
	ConnClosed        = uint32(tcConnFlagCONN_CLOSED)
	ConnHighRequest   = uint32(tcConnFlagCONN_HIGH_REQUEST)
	ConnHighResponse  = uint32(tcConnFlagCONN_HIGH_RESPONSE)
	ConnFromSYN       = uint32(tcConnFlagCONN_FROM_SYN)
	ConnFromSYNACK    = uint32(tcConnFlagCONN_FROM_SYNACK)
	ConnFromMidstream = uint32(tcConnFlagCONN_FROM_MIDSTREAM)
	ConnRolesGuessed  = uint32(tcConnFlagCONN_ROLES_GUESSED)
	ConnClientIngress = uint32(tcConnFlagCONN_CLIENT_INGRESS)
	ConnSeq0          = uint32(tcConnFlagCONN_SEQ0)
	ConnHTTP          = uint32(tcConnFlagCONN_HTTP)
)

// maxWorkloads is the size of the workload_traffic table.
const maxWorkloads = 4096

// objects are the loaded programs and maps.
type objects struct {
	tcMaps
	tcVariables
	// Ingress and Egress are the programs of the two hooks: one program,
	// clv_tc, in tc (it asks the kernel which hook it runs at when it
	// needs to know), clv_tc_ingress and clv_tc_egress in tcInline.
	Ingress, Egress *ebpf.Program
	// marksMu serializes the read-modify-write of port_marks words.
	marksMu sync.Mutex
}

// Close closes the programs and the maps.
func (o *objects) Close() error {
	errs := []error{o.Ingress.Close()}
	if o.Egress != o.Ingress {
		errs = append(errs, o.Egress.Close())
	}
	return errors.Join(append(errs, o.tcMaps.Close())...)
}

// programs returns the hooks' programs by name (one name for both hooks in
// tc).
func (o *objects) programs() map[string]*ebpf.Program {
	if o.Ingress == o.Egress {
		return map[string]*ebpf.Program{tcProgClvTc: o.Ingress}
	}
	return map[string]*ebpf.Program{tcInlineProgClvTcIngress: o.Ingress, tcInlineProgClvTcEgress: o.Egress}
}

// loadObjects loads the programs and maps with the configuration's
// settings (cfg must be normalized), without attaching anything.
func loadObjects(cfg *Config) (*objects, error) {
	inline := inlineVariant()
	load := loadTc
	if inline {
		load = loadTcInline
	}
	spec, err := load()
	if err != nil {
		return nil, err
	}
	var sb [8]byte
	if _, err := rand.Read(sb[:]); err != nil {
		return nil, fmt.Errorf("seeding the sessions fingerprint: %w", err)
	}
	seed := binary.LittleEndian.Uint64(sb[:])
	set := map[string]any{
		"payload_cap":      uint32(cfg.PayloadBytes),
		"payload_cap_resp": uint32(cfg.ResponsePayloadBytes),
		"track_all":        boolByte(cfg.TrackAll),
		"wakeup_bytes":     uint64(cfg.RingBytes / 8),
		"fp_seed":          seed,
	}
	for name, v := range set {
		vs, ok := spec.Variables[name]
		if !ok {
			return nil, fmt.Errorf("BPF object has no variable %s", name)
		}
		if err := vs.Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	spec.Maps["tc_events"].MaxEntries = uint32(cfg.RingBytes)
	spec.Maps["sessions"].MaxEntries = uint32(cfg.MaxSessions)
	o := &objects{}
	if inline {
		var l struct {
			tcMaps
			tcVariables
			tcInlinePrograms
		}
		err = spec.LoadAndAssign(&l, nil)
		o.tcMaps, o.tcVariables, o.Ingress, o.Egress = l.tcMaps, l.tcVariables, l.ClvTcIngress, l.ClvTcEgress
	} else {
		var l struct {
			tcMaps
			tcVariables
			tcPrograms
		}
		err = spec.LoadAndAssign(&l, nil)
		o.tcMaps, o.tcVariables, o.Ingress, o.Egress = l.tcMaps, l.tcVariables, l.ClvTc, l.ClvTc
	}
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("loading the tc programs: %+.30v", ve)
		}
		return nil, fmt.Errorf("loading the tc programs: %w", err)
	}
	return o, nil
}

// inlineVariant reports whether this kernel gets tcInline: by its release
// (inlineKernel), or because it has no BTF (/sys/kernel/btf/vmlinux), which
// tc needs to read the hook from the sk_buff (a kfunc and a CO-RE
// relocation) and tcInline does not.
func inlineVariant() bool {
	if inlineKernel(probes.KernelRelease()) {
		return true
	}
	_, err := btf.LoadKernelSpec()
	return err != nil
}

// inlineKernel reports whether a kernel (uname -r) gets the programs with
// every function inlined (tcInline) instead of those with their rare paths
// in BPF subprograms (tc, bpf/tc.h's CLV_COLD). Verifiers before Linux 6.4
// give up precision tracking at a BPF-to-BPF call and mark every scalar
// precise, which takes the out-of-line programs minutes to load on 6.1;
// from 6.4 on (precision propagation across subprograms) they load as fast
// as the inlined ones. A release that does not parse gets the inlined
// programs, which every supported kernel loads.
func inlineKernel(release string) bool {
	var major, minor int
	if _, err := fmt.Sscanf(release, "%d.%d", &major, &minor); err != nil {
		return true
	}
	return major < 6 || (major == 6 && minor < 4)
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// addr16 is the kernel's form of an address: IPv4 as IPv4-mapped IPv6.
func addr16(a netip.Addr) [16]byte {
	if a.Is4() {
		a = netip.AddrFrom16(a.As16())
	}
	return a.As16()
}

// fromAddr16 is the inverse of addr16 (IPv4-mapped addresses unmapped).
func fromAddr16(b [16]byte) netip.Addr {
	return netip.AddrFrom16(b).Unmap()
}

// inIfacesArray says whether an interface is in the ifaces array (its
// size is IFACES_ARRAY of bpf/tc.h) rather than the ifaces_high hash.
func (o *objects) inIfacesArray(ifindex int) bool {
	return ifindex > 0 && int64(ifindex) < int64(o.Ifaces.MaxEntries())
}

// setInterface tells the programs what to do on an interface.
func (o *objects) setInterface(ifindex int, flags uint32) error {
	if ifindex <= 0 || int64(ifindex) > math.MaxUint32 {
		return fmt.Errorf("interface index %d out of range", ifindex)
	}
	if o.inIfacesArray(ifindex) {
		return o.Ifaces.Put(uint32(ifindex), tcIfaceCfg{Flags: flags})
	}
	return o.IfacesHigh.Put(uint32(ifindex), tcIfaceCfg{Flags: flags})
}

// clearInterface forgets an interface.
func (o *objects) clearInterface(ifindex int) error {
	if o.inIfacesArray(ifindex) {
		return o.Ifaces.Put(uint32(ifindex), tcIfaceCfg{})
	}
	err := o.IfacesHigh.Delete(uint32(ifindex))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// setPort adds a port to dports2proto (ifindex 0: every interface).
func (o *objects) setPort(ifindex int, port uint16, proto uint16) error {
	if proto != ProtocolIgnore {
		if err := o.markPort(port); err != nil {
			return err
		}
	}
	return o.Dports2proto.Put(tcPortKey{Ifindex: uint32(ifindex), Port: port}, uint32(proto))
}

// markPort sets port's bit in port_marks (port 0: an egress match of any
// port), before the table entry that names it is written. Bits are never
// cleared (see bpf/tc.h).
func (o *objects) markPort(port uint16) error {
	o.marksMu.Lock()
	defer o.marksMu.Unlock()
	idx := uint32(port) / 32
	var w uint32
	if err := o.PortMarks.Lookup(idx, &w); err != nil {
		return fmt.Errorf("reading port marks: %w", err)
	}
	if bit := uint32(1) << (port % 32); w&bit == 0 {
		if err := o.PortMarks.Put(idx, w|bit); err != nil {
			return fmt.Errorf("marking port %d: %w", port, err)
		}
	}
	return nil
}

// markedPorts lists the ports port_marks has set.
func (o *objects) markedPorts() ([]uint16, error) {
	var ports []uint16
	var idx, w uint32
	it := o.PortMarks.Iterate()
	for it.Next(&idx, &w) {
		for b := range uint32(32) {
			if w&(1<<b) != 0 {
				ports = append(ports, uint16(idx*32+b))
			}
		}
	}
	return ports, it.Err()
}

// deletePort removes a port from dports2proto.
func (o *objects) deletePort(ifindex int, port uint16) error {
	err := o.Dports2proto.Delete(tcPortKey{Ifindex: uint32(ifindex), Port: port})
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// egressKey is the LPM key of a prefix and port.
func egressKey(p netip.Prefix, port uint16) tcEgressKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	k := tcEgressKey{Prefixlen: uint32(16 + bits), Addr: addr16(p.Addr())}
	binary.BigEndian.PutUint16(k.Port[:], port)
	return k
}

// setEgress adds an egress match.
func (o *objects) setEgress(p netip.Prefix, port uint16, proto uint16) error {
	if proto != ProtocolIgnore {
		if err := o.markPort(port); err != nil {
			return err
		}
	}
	return o.EgressLookupTable.Put(egressKey(p, port), uint32(proto))
}

// deleteEgress removes an egress match.
func (o *objects) deleteEgress(p netip.Prefix, port uint16) error {
	err := o.EgressLookupTable.Delete(egressKey(p, port))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// Stats are the kernel side's counters, summed over CPUs.
type Stats struct {
	// ExchangesLost and PayloadsLost count records and payload prefixes
	// dropped because the ring buffer was full.
	ExchangesLost, PayloadsLost uint64
	// PayloadFaults counts prefixes that could not be read from the
	// packet (sent empty).
	PayloadFaults uint64
	// HeaderFaults counts IP packets with headers that could not be read
	// or made no sense (passed on, not traced).
	HeaderFaults uint64
	// Fragments counts non-first IP fragments: they have no L4 header,
	// so they count for workloads but not for sessions.
	Fragments uint64
	// ExtHeaderLimit counts IPv6 packets with more extension headers than
	// the programs follow (not traced).
	ExtHeaderLimit uint64
	// SessionsCreated and SessionsClosed count sessions entries made and
	// removed on FIN, RST or reuse; SessionsFull counts those that could
	// not be made. Created - Closed - the entries in the table is the
	// number of connections the LRU forgot (each without its last record).
	SessionsCreated, SessionsClosed, SessionsFull uint64
	// StateRaces counts exchange transitions lost to concurrent ones.
	StateRaces uint64
	// MarkLimit counts packets that began an HTTP message but were not
	// captured: the exchange had MAX_MARKS (64) of them already.
	MarkLimit uint64
	// KeyCollisions counts packets not traced because their connection's
	// 64-bit fingerprint (the sessions table's key) belonged to another
	// connection's entry.
	KeyCollisions uint64
}

// readStats sums the kernel's counters.
func (o *objects) readStats() (Stats, error) {
	var s Stats
	for _, f := range []struct {
		idx tcTcStatIndex
		dst *uint64
	}{
		{tcTcStatIndexTC_STAT_EXCHANGE_LOST, &s.ExchangesLost},
		{tcTcStatIndexTC_STAT_PAYLOAD_LOST, &s.PayloadsLost},
		{tcTcStatIndexTC_STAT_PAYLOAD_FAULT, &s.PayloadFaults},
		{tcTcStatIndexTC_STAT_HEADER_FAULT, &s.HeaderFaults},
		{tcTcStatIndexTC_STAT_FRAGMENTS, &s.Fragments},
		{tcTcStatIndexTC_STAT_EXT_HDR_LIMIT, &s.ExtHeaderLimit},
		{tcTcStatIndexTC_STAT_SESSION_CREATED, &s.SessionsCreated},
		{tcTcStatIndexTC_STAT_SESSION_CLOSED, &s.SessionsClosed},
		{tcTcStatIndexTC_STAT_SESSION_FULL, &s.SessionsFull},
		{tcTcStatIndexTC_STAT_STATE_RACE, &s.StateRaces},
		{tcTcStatIndexTC_STAT_MARK_LIMIT, &s.MarkLimit},
		{tcTcStatIndexTC_STAT_KEY_COLLISION, &s.KeyCollisions},
	} {
		var per []uint64
		if err := o.TcStats.Lookup(uint32(f.idx), &per); err != nil {
			return s, fmt.Errorf("reading stats[%d]: %w", f.idx, err)
		}
		for _, v := range per {
			*f.dst += v
		}
	}
	return s, nil
}

// SessionInfo is one entry of the sessions table, oriented.
type SessionInfo struct {
	Ifindex        int
	Client, Server netip.AddrPort
	Entry          SessionEntry
}

// Index is the entry's current exchange index.
func (s *SessionInfo) Index() uint32 { return uint32(s.Entry.State >> 8) }

// Phase is the entry's current exchange phase.
func (s *SessionInfo) Phase() Phase { return Phase(s.Entry.State & 0xff) }

// orient returns the client and server of a sessions key.
func orient(k *FlowKey, clientIsLo bool) (client, server netip.AddrPort) {
	lo := netip.AddrPortFrom(fromAddr16(k.AddrLo), k.PortLo)
	hi := netip.AddrPortFrom(fromAddr16(k.AddrHi), k.PortHi)
	if clientIsLo {
		return lo, hi
	}
	return hi, lo
}

// readSessions returns the entries of the sessions table.
func (o *objects) readSessions() ([]SessionInfo, error) {
	var (
		fp  uint64
		v   SessionEntry
		out []SessionInfo
	)
	it := o.Sessions.Iterate()
	for it.Next(&fp, &v) {
		c, s := orient(&v.Key, v.ClientIsLo != 0)
		out = append(out, SessionInfo{Ifindex: int(v.Key.Ifindex), Client: c, Server: s, Entry: v})
	}
	return out, it.Err()
}
