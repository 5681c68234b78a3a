// Package probes loads Clovisor's socket-tracing BPF objects and attaches
// them to the running kernel.
//
// Several attach modes produce the same events (see bpf/socket.h); which one
// runs is chosen at start by trying them on the running kernel, best first,
// or forced with Options.Mode. Every link made is recorded and closed in
// reverse order by Tracer.Close; links are not pinned, so nothing outlives
// the agent's process even after SIGKILL.
package probes

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Event types shared by every attach mode: the C structs of bpf/socket.h as
// bpf2go generated them.
type (
	ConnEvent = socketTPConnEvent
	DataEvent = socketTPDataEvent
)

// Event kinds, roles, directions (enum values of bpf/socket.h).
const (
	EventConnOpen  = uint8(socketTPEventKindEVENT_CONN_OPEN)
	EventConnClose = uint8(socketTPEventKindEVENT_CONN_CLOSE)
	EventData      = uint8(socketTPEventKindEVENT_DATA)

	RoleUnknown = uint8(socketTPConnRoleROLE_UNKNOWN)
	RoleClient  = uint8(socketTPConnRoleROLE_CLIENT)
	RoleServer  = uint8(socketTPConnRoleROLE_SERVER)

	DirSend = uint8(socketTPDataDirDIR_SEND)
	DirRecv = uint8(socketTPDataDirDIR_RECV)

	// Flags: ConnEvent.SendSeq is set (open events); DataEvent.SentSeq
	// is set (receives of SourceSocket).
	FlagSendSeq = uint8(socketTPEventFlagsFLAG_SEND_SEQ)
	FlagSentSeq = uint8(socketTPEventFlagsFLAG_SENT_SEQ)

	// Payload sources (data_event.source).
	SourceSocket  = uint8(socketTPPayloadSourceSOURCE_SOCKET)
	SourceOpenSSL = uint8(socketTPPayloadSourceSOURCE_OPENSSL)
	SourceGoTLS   = uint8(socketTPPayloadSourceSOURCE_GO_TLS)
	SourceKTLS    = uint8(socketTPPayloadSourceSOURCE_KTLS)
)

// MaxPayload is the largest payload prefix a data event can carry.
const MaxPayload = len(DataEvent{}.Data)

// DefaultPayload is the default payload prefix: enough for the headers of
// ordinary HTTP requests and responses.
const DefaultPayload = 4096

// Mode names.
const (
	ModeAuto       = "auto"
	ModeFentry     = "fentry"
	ModeKprobe     = "kprobe"
	ModeTracepoint = "tracepoint"
)

// Modes lists the attach modes, best (cheapest) first: the order auto
// tries them in.
var Modes = []string{ModeFentry, ModeKprobe, ModeTracepoint}

// Options configure the tracer.
type Options struct {
	// Mode is auto (the default) or one of Modes.
	Mode string
	// PayloadBytes is the payload prefix copied per call (default
	// DefaultPayload, at most MaxPayload).
	PayloadBytes int
	// RingBytes is the ring buffer's size, a power of two multiple of the
	// page size (default 8 MiB).
	RingBytes int
	// FilterCgroups traces only the cgroups added with AddCgroup.
	FilterCgroups bool
	// Ports, when not empty, traces only connections with one of these as
	// local or remote port.
	Ports []uint16
	// Logger receives the mode decision (default slog.Default()).
	Logger *slog.Logger
}

func (o *Options) normalize() error {
	if o.Mode == "" {
		o.Mode = ModeAuto
	}
	if o.Mode != ModeAuto && !contains(Modes, o.Mode) {
		return fmt.Errorf("probe mode %q: want auto, %s", o.Mode, strings.Join(Modes, ", "))
	}
	if o.PayloadBytes == 0 {
		o.PayloadBytes = DefaultPayload
	}
	if o.PayloadBytes < 0 || o.PayloadBytes > MaxPayload {
		return fmt.Errorf("payload prefix %d bytes: must be between 0 and %d", o.PayloadBytes, MaxPayload)
	}
	if o.RingBytes == 0 {
		o.RingBytes = 8 << 20
	}
	page := os.Getpagesize()
	if o.RingBytes < page || o.RingBytes&(o.RingBytes-1) != 0 {
		return fmt.Errorf("ring buffer size %d bytes: must be a power of two and at least %d", o.RingBytes, page)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Tracer is the socket tracer loaded and attached to the kernel.
type Tracer struct {
	// Mode is the attach mode in use.
	Mode string
	// Events is the ring buffer of conn_event and data_event records.
	Events *ebpf.Map

	stats, cgroups, ports *ebpf.Map
	// plainSocks holds the cookies of sockets whose plaintext a TLS
	// library's probes report (shared with the TLS objects).
	plainSocks *ebpf.Map
	opts       Options    // as normalized by Open
	btf        *btf.Cache // the kernel's BTF, parsed once while opening
	cookieMult uint64     // kprobe mode: socket address -> cookie multiplier
	closers    []io.Closer

	// mu guards what the kernel TLS watcher (ktls.go) changes after Open.
	mu          sync.Mutex
	programs    map[string]*ebpf.Program
	ktls        KTLSState
	ktlsClosers []io.Closer // the kTLS hooks' links (and programs), closed first
	ktlsProgs   []string    // their programs' names in programs
	stopKTLS    func()      // stops the watcher (nil: none runs)

	tlsMu sync.Mutex
	tls   *TLSTracer // TLS tracing per process, told of cgroup changes
	// payloadMu guards opts.PayloadBytes, which SetPayloadBytes changes
	// after Open, and payloadVars: the payload_cap variables of every
	// loaded object (the socket object's, each TLS uprobe object's).
	payloadMu   sync.Mutex
	payloadVars map[*ebpf.Variable]struct{}
}

// SetPayloadBytes changes the payload prefix copied per call (0 to
// MaxPayload bytes) while the programs run: in the socket object, in every
// loaded TLS uprobe object, and in those loaded later. Calls already past
// reading the setting keep the previous size.
func (t *Tracer) SetPayloadBytes(n int) error {
	if n < 0 || n > MaxPayload {
		return fmt.Errorf("payload prefix %d bytes: must be between 0 and %d", n, MaxPayload)
	}
	t.payloadMu.Lock()
	defer t.payloadMu.Unlock()
	var errs []error
	for v := range t.payloadVars {
		if err := v.Set(uint32(n)); err != nil {
			errs = append(errs, fmt.Errorf("setting the payload prefix: %w", err))
		}
	}
	t.opts.PayloadBytes = n
	return errors.Join(errs...)
}

// PayloadBytes is the payload prefix copied per call now.
func (t *Tracer) PayloadBytes() int {
	t.payloadMu.Lock()
	defer t.payloadMu.Unlock()
	return t.opts.PayloadBytes
}

// addPayloadVar registers a loaded object's payload_cap variable, which it
// sets to the current prefix (the object may have been configured before a
// SetPayloadBytes).
func (t *Tracer) addPayloadVar(v *ebpf.Variable) error {
	if v == nil {
		return errors.New("BPF object has no variable payload_cap")
	}
	t.payloadMu.Lock()
	defer t.payloadMu.Unlock()
	if err := v.Set(uint32(t.opts.PayloadBytes)); err != nil {
		return fmt.Errorf("setting payload_cap: %w", err)
	}
	if t.payloadVars == nil {
		t.payloadVars = map[*ebpf.Variable]struct{}{}
	}
	t.payloadVars[v] = struct{}{}
	return nil
}

// dropPayloadVar forgets an unloaded object's payload_cap variable.
func (t *Tracer) dropPayloadVar(v *ebpf.Variable) {
	t.payloadMu.Lock()
	delete(t.payloadVars, v)
	t.payloadMu.Unlock()
}

// options is a copy of the options, as they are now.
func (t *Tracer) options() Options {
	t.payloadMu.Lock()
	defer t.payloadMu.Unlock()
	return t.opts
}

// Programs returns the attached programs by name (for their run-time
// statistics).
func (t *Tracer) Programs() map[string]*ebpf.Program {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.programs)
}

// attachMode is one way of hooking the kernel's socket calls.
type attachMode interface {
	// name is the mode's name (one of Modes).
	name() string
	// open loads this mode's programs with the given settings and attaches
	// them, recording every object in t. It fails with an error that names
	// the kernel feature the mode lacks on this kernel.
	open(t *Tracer, o *Options) error
}

var attachModes = map[string]attachMode{
	ModeTracepoint: tracepointMode{},
	ModeKprobe:     kprobeMode{},
	ModeFentry:     fentryMode{},
}

// ErrUnsupported wraps the reason a mode cannot run on this kernel.
var ErrUnsupported = errors.New("not supported by this kernel")

// Open loads and attaches the socket tracer. In auto mode it tries the
// modes best first and logs why each better one was refused.
func Open(o Options) (*Tracer, error) {
	if err := o.normalize(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raising the memlock limit: %w", err)
	}
	candidates := Modes
	if o.Mode != ModeAuto {
		candidates = []string{o.Mode}
	}
	var refused []string
	for _, name := range candidates {
		t := &Tracer{Mode: name, opts: o, btf: btf.NewCache()}
		err := attachModes[name].open(t, &o)
		t.btf = nil // the module list it holds goes stale
		if err == nil {
			o.Logger.Info("socket tracer attached", "component", "probes", "mode", name,
				"requested", o.Mode, "refused", strings.Join(refused, "; "), "kernel", KernelRelease())
			return t, nil
		}
		t.Close()
		if o.Mode != ModeAuto {
			return nil, fmt.Errorf("probe mode %s on Linux %s: %w", name, KernelRelease(), err)
		}
		o.Logger.Info("probe mode refused", "component", "probes", "mode", name, "reason", err.Error())
		refused = append(refused, name+": "+err.Error())
	}
	return nil, fmt.Errorf("no probe mode works on Linux %s: %s", KernelRelease(), strings.Join(refused, "; "))
}

// KernelRelease is uname -r.
func KernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func (t *Tracer) add(c io.Closer) { t.closers = append(t.closers, c) }

// Close detaches and unloads everything, in reverse order of creation.
func (t *Tracer) Close() error {
	if t.stopKTLS != nil {
		t.stopKTLS()
		t.stopKTLS = nil
	}
	var errs []error
	if err := t.closeKTLS(); err != nil {
		errs = append(errs, err)
	}
	for i := len(t.closers) - 1; i >= 0; i-- {
		if err := t.closers[i].Close(); err != nil {
			errs = append(errs, err)
		}
	}
	t.closers = nil
	return errors.Join(errs...)
}

// AddCgroup traces the sockets of the cgroup with this cgroup v2 id (when
// the tracer filters by cgroup). TLS tracing, when started, looks for the
// cgroup's running processes soon (TLSTracer.Rescan).
func (t *Tracer) AddCgroup(id uint64) error {
	if err := t.cgroups.Put(id, uint8(1)); err != nil {
		return err
	}
	if m := t.tlsManager(); m != nil {
		m.Rescan()
	}
	return nil
}

// RemoveCgroup stops tracing a cgroup; TLS tracing detaches the uprobes
// of its processes.
func (t *Tracer) RemoveCgroup(id uint64) error {
	err := t.cgroups.Delete(id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		err = nil
	}
	if m := t.tlsManager(); m != nil {
		m.untraceCgroup(id)
	}
	return err
}

func (t *Tracer) tlsManager() *TLSTracer {
	t.tlsMu.Lock()
	defer t.tlsMu.Unlock()
	return t.tls
}

func (t *Tracer) setTLSManager(old, m *TLSTracer) {
	t.tlsMu.Lock()
	defer t.tlsMu.Unlock()
	if t.tls == old {
		t.tls = m
	}
}

// Stats are the kernel side's counters, summed over CPUs.
type Stats struct {
	// DataLost and ConnLost count events dropped because the ring buffer
	// was full.
	DataLost, ConnLost uint64
	// PayloadFaults counts calls whose payload could not be copied (the
	// event was still sent, without payload).
	PayloadFaults uint64
	// CipherSkipped counts socket calls not reported because they moved
	// TLS records of a connection whose plaintext a TLS library's probes
	// report (after its handshake).
	CipherSkipped uint64
}

// Stats reads the kernel's counters.
func (t *Tracer) Stats() (Stats, error) {
	read := func(idx socketTPStatIndex) (uint64, error) {
		var per []uint64
		if err := t.stats.Lookup(uint32(idx), &per); err != nil {
			return 0, fmt.Errorf("reading stats[%d]: %w", idx, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		return sum, nil
	}
	var s Stats
	var err error
	for _, f := range []struct {
		idx socketTPStatIndex
		dst *uint64
	}{
		{socketTPStatIndexSTAT_DATA_LOST, &s.DataLost},
		{socketTPStatIndexSTAT_CONN_LOST, &s.ConnLost},
		{socketTPStatIndexSTAT_PAYLOAD_FAULT, &s.PayloadFaults},
		{socketTPStatIndexSTAT_CIPHER_SKIPPED, &s.CipherSkipped},
	} {
		if *f.dst, err = read(f.idx); err != nil {
			return s, err
		}
	}
	return s, nil
}

// configure applies the options to a collection spec before loading.
func configure(spec *ebpf.CollectionSpec, o *Options) error {
	set := map[string]any{
		"self_tgid":      uint32(os.Getpid()),
		"payload_cap":    uint32(o.PayloadBytes),
		"filter_cgroups": boolByte(o.FilterCgroups),
		"filter_ports":   boolByte(len(o.Ports) > 0),
		"wakeup_bytes":   uint64(o.RingBytes / 8),
	}
	for name, v := range set {
		vs, ok := spec.Variables[name]
		if !ok {
			return fmt.Errorf("BPF object has no variable %s", name)
		}
		if err := vs.Set(v); err != nil {
			return fmt.Errorf("setting %s: %w", name, err)
		}
	}
	spec.Maps["events"].MaxEntries = uint32(o.RingBytes)
	return nil
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// fillPorts writes the traced ports.
func (t *Tracer) fillPorts(ports []uint16) error {
	for _, p := range ports {
		if err := t.ports.Put(p, uint8(1)); err != nil {
			return fmt.Errorf("adding port %d: %w", p, err)
		}
	}
	return nil
}

// kernelHasBTFType reports whether the kernel's BTF has a type of this name
// (for example "btf_trace_sock_send_length" for that BTF tracepoint).
func kernelHasBTFType(name string) (bool, error) {
	return btfHasType(btf.NewCache(), name)
}

// kernelHasBTFType is kernelHasBTFType with the BTF parsed for opening.
func (t *Tracer) kernelHasBTFType(name string) (bool, error) {
	if t.btf == nil {
		return kernelHasBTFType(name)
	}
	return btfHasType(t.btf, name)
}

func btfHasType(c *btf.Cache, name string) (bool, error) {
	spec, err := c.Kernel()
	if err != nil {
		return false, fmt.Errorf("kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF): %w", err)
	}
	_, err = spec.AnyTypeByName(name)
	if errors.Is(err, btf.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// loadOpts are the options of the mode's collection loads: the BTF parsed
// once.
func (t *Tracer) loadOpts() *ebpf.CollectionOptions {
	return &ebpf.CollectionOptions{Cache: t.btf}
}

// loadErr makes a load error readable: a verifier error with its log tail.
func loadErr(what string, err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("loading %s: %+.20v", what, ve)
	}
	return fmt.Errorf("loading %s: %w", what, err)
}

// LoadedPrograms lists the BPF programs loaded in the kernel (by anyone)
// that carry the names of Clovisor's socket and TLS uprobe programs, by id. Clovisor's
// own links are not pinned, so after its process ends none should remain.
func LoadedPrograms() (map[ebpf.ProgramID]string, error) {
	names := map[string]bool{}
	for _, load := range []func() (*ebpf.CollectionSpec, error){loadSocketTP, loadSocketTPSys, loadSocketKprobe, loadSocketFentry,
		loadTlsOpenSSL, loadTlsProcWatch, loadTlsGo} {
		spec, err := load()
		if err != nil {
			return nil, err
		}
		for name := range spec.Programs {
			names[name] = true
			if len(name) > 15 {
				names[name[:15]] = true // BPF_OBJ_NAME_LEN, when the kernel has no BTF func info
			}
		}
	}
	var err error
	found := map[ebpf.ProgramID]string{}
	var id ebpf.ProgramID
	for {
		id, err = ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return found, nil
		}
		if err != nil {
			return nil, err
		}
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // gone meanwhile
		}
		info, err := p.Info()
		p.Close()
		if err == nil && names[info.Name] {
			found[id] = info.Name
		}
	}
}
