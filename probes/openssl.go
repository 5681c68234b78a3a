package probes

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// The OpenSSL prober: uprobes on SSL_write, SSL_write_ex, SSL_read and
// SSL_read_ex of every file that defines them (libssl.so.1.1, libssl.so.3,
// programs with OpenSSL linked in, BoringSSL). See bpf/tls_openssl.c.

func init() {
	tlsProberFactories = append(tlsProberFactories, newOpenSSLProber)
}

// opensslFuncs are the probed functions, with the cookie bits of each.
var opensslFuncs = []struct {
	name string
	bits uint64
}{
	{"SSL_write", cookieSend},
	{"SSL_write_ex", cookieSend | cookieEx},
	{"SSL_read", 0},
	{"SSL_read_ex", cookieEx},
}

// Attach cookie bits (bpf/tls_openssl.c).
const (
	cookieSend   = 1 << 56
	cookieEx     = 1 << 57
	cookieArg5   = 1 << 58
	cookieLayout = 1 << 63
)

// sslLayout is where the socket and the protocol version are found from an
// SSL * of one OpenSSL version: in 3.2 and later, SSL * points at the
// ssl_st inside an ssl_connection_st, whose fields follow it.
type sslLayout struct {
	Version   uint16 // offset of the negotiated protocol version (int)
	RBIO      uint16 // offset of rbio (wbio follows)
	BIONum    uint8  // offset of num (the descriptor) in a BIO
	BIOMethod uint8  // offset of method in a BIO
}

func (l sslLayout) cookie() uint64 {
	return cookieLayout | uint64(l.Version) | uint64(l.RBIO)<<16 | uint64(l.BIONum)<<32 | uint64(l.BIOMethod)<<40
}

// Layouts by release line (from the releases' ssl/ssl_local.h and
// crypto/bio/bio_local.h on 64-bit targets). The plausibility of the
// version field is checked in the kernel for every call, so a wrong guess
// only costs the descriptor lookup (the socket is then found by the
// thread's I/O).
var (
	layout110 = sslLayout{Version: 0x0, RBIO: 0x10, BIONum: 0x28, BIOMethod: 0x0}
	layout111 = sslLayout{Version: 0x0, RBIO: 0x10, BIONum: 0x30, BIOMethod: 0x0}
	layout30  = sslLayout{Version: 0x0, RBIO: 0x10, BIONum: 0x38, BIOMethod: 0x8} // 3.0, 3.1
	layout32  = sslLayout{Version: 0x40, RBIO: 0x48, BIONum: 0x38, BIOMethod: 0x8}
	// 3.2.4, 3.3.3, 3.4.1 and later grew struct ssl_st by 8 bytes.
	layout324 = sslLayout{Version: 0x48, RBIO: 0x50, BIONum: 0x38, BIOMethod: 0x8}
)

// opensslVersion is a parsed "OpenSSL 3.0.19 27 Jan 2026" banner.
type opensslVersion struct {
	Major, Minor, Patch int
	Letter              string // 1.x releases: "1.1.1w"
	Text                string
}

func (v opensslVersion) String() string {
	return fmt.Sprintf("%d.%d.%d%s", v.Major, v.Minor, v.Patch, v.Letter)
}

var opensslBanner = regexp.MustCompile(`OpenSSL (\d+)\.(\d+)\.(\d+)([a-z]*)(?:-[A-Za-z0-9.]+)? +\d{1,2} [A-Z][a-z]{2} \d{4}`)

// parseOpenSSLVersion finds the version banner in data.
func parseOpenSSLVersion(data []byte) (opensslVersion, bool) {
	m := opensslBanner.FindSubmatch(data)
	if m == nil {
		return opensslVersion{}, false
	}
	atoi := func(b []byte) int { n, _ := strconv.Atoi(string(b)); return n }
	return opensslVersion{Major: atoi(m[1]), Minor: atoi(m[2]), Patch: atoi(m[3]), Letter: string(m[4]), Text: string(m[0])}, true
}

// layoutFor returns the SSL layout of an OpenSSL version, and false for
// versions whose layout is not known (before 1.1.0).
func layoutFor(v opensslVersion) (sslLayout, bool) {
	at := func(minor, patch int) bool { // v >= 3.minor.patch
		return v.Minor > minor || (v.Minor == minor && v.Patch >= patch)
	}
	switch {
	case v.Major == 1 && v.Minor == 1 && v.Patch == 0:
		return layout110, true
	case v.Major == 1 && v.Minor == 1 && v.Patch == 1:
		return layout111, true
	case v.Major == 3 && !at(2, 0):
		return layout30, true
	case v.Major == 3 && v.Minor == 2:
		if at(2, 4) {
			return layout324, true
		}
		return layout32, true
	case v.Major == 3 && v.Minor == 3:
		if at(3, 3) {
			return layout324, true
		}
		return layout32, true
	case v.Major == 3 && v.Minor == 4:
		if at(4, 1) {
			return layout324, true
		}
		return layout32, true
	case v.Major >= 3:
		// 3.5 and later: the newest layout known; checked per call.
		return layout324, true
	}
	return sslLayout{}, false
}

type opensslProber struct {
	t     *Tracer
	spec  *ebpf.CollectionSpec // configured, for the I/O fallback's programs
	objs  opensslObjs
	multi bool // objs has the uprobe_multi programs

	mu      sync.Mutex
	io      []*ebpf.Program // the socket I/O fallback, loaded with the first library
	ioNames []string
	ioLinks []io.Closer
	ioDone  bool
}

// opensslObjs are the loaded uprobe programs and maps of
// bpf/tls_openssl.c.
type opensslObjs struct {
	SslEntry       *ebpf.Program  `ebpf:"ssl_entry"`
	SslReturn      *ebpf.Program  `ebpf:"ssl_return"`
	SslEntryMulti  *ebpf.Program  `ebpf:"ssl_entry_multi"`
	SslReturnMulti *ebpf.Program  `ebpf:"ssl_return_multi"`
	SslCalls       *ebpf.Map      `ebpf:"ssl_calls"`
	SslStats       *ebpf.Map      `ebpf:"ssl_stats"`
	PayloadCap     *ebpf.Variable `ebpf:"payload_cap"`
}

// opensslClassic are the same without the uprobe_multi programs, for
// kernels before 6.6, which refuse to load those.
type opensslClassic struct {
	SslEntry   *ebpf.Program  `ebpf:"ssl_entry"`
	SslReturn  *ebpf.Program  `ebpf:"ssl_return"`
	SslCalls   *ebpf.Map      `ebpf:"ssl_calls"`
	SslStats   *ebpf.Map      `ebpf:"ssl_stats"`
	PayloadCap *ebpf.Variable `ebpf:"payload_cap"`
}

func (o *opensslObjs) Close() error {
	var errs []error
	for _, c := range []io.Closer{o.SslEntry, o.SslReturn, o.SslEntryMulti, o.SslReturnMulti, o.SslCalls, o.SslStats} {
		if c != nil && !reflect.ValueOf(c).IsNil() {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

func newOpenSSLProber(t *Tracer) (tlsProber, error) {
	spec, err := loadTlsOpenSSL()
	if err != nil {
		return nil, err
	}
	p := &opensslProber{t: t, spec: spec}
	err = t.loadTLSObjects(spec, &p.objs)
	if err == nil {
		p.multi = true
		return p, nil
	}
	t.opts.Logger.Debug("OpenSSL uprobes without uprobe_multi links (Linux 6.6+)", "component", "tls", "reason", err.Error())
	var c opensslClassic
	if err := t.loadTLSObjects(spec, &c); err != nil {
		return nil, loadErr("OpenSSL uprobes", err)
	}
	p.objs = opensslObjs{SslEntry: c.SslEntry, SslReturn: c.SslReturn, SslCalls: c.SslCalls, SslStats: c.SslStats,
		PayloadCap: c.PayloadCap}
	return p, nil
}

func (p *opensslProber) name() string { return "openssl" }

// definedFuncs returns the file offsets (what uprobes take) of the
// functions of names that f defines: dynamic symbols first, then the
// static symbol table.
func definedFuncs(f *elf.File, names ...string) map[string]uint64 {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	found := map[string]uint64{}
	look := func(syms []elf.Symbol) {
		for _, s := range syms {
			if !want[s.Name] || s.Section == elf.SHN_UNDEF || s.Value == 0 || elf.ST_TYPE(s.Info) != elf.STT_FUNC {
				continue
			}
			// The symbol's address, as an offset in the file: through
			// the loadable executable segment that holds it.
			for _, prog := range f.Progs {
				if prog.Type == elf.PT_LOAD && prog.Flags&elf.PF_X != 0 && s.Value >= prog.Vaddr && s.Value < prog.Vaddr+prog.Memsz {
					found[s.Name] = s.Value - prog.Vaddr + prog.Off
					break
				}
			}
		}
	}
	if syms, err := f.DynamicSymbols(); err == nil {
		look(syms)
	}
	if len(found) == 0 {
		if syms, err := f.Symbols(); err == nil {
			look(syms)
		}
	}
	return found
}

// versionOf finds the OpenSSL version of the library in f: its own banner
// (static copies), else the banner of the libcrypto it needs, in the same
// folder. The description says where it came from, for the log.
func versionOf(f *tlsFile) (opensslVersion, string) {
	if v, ok := sectionBanner(f.ELF); ok {
		return v, "banner in the file"
	}
	libs, _ := f.ELF.ImportedLibraries()
	for _, lib := range libs {
		if !strings.HasPrefix(lib, "libcrypto.") {
			continue
		}
		path := filepath.Join(f.Root, filepath.Dir(f.Name), lib)
		ef, err := elf.Open(path)
		if err != nil {
			return opensslVersion{}, fmt.Sprintf("no banner; %s: %v", lib, err)
		}
		v, ok := sectionBanner(ef)
		ef.Close()
		if ok {
			return v, "banner in " + lib
		}
		return opensslVersion{}, "no banner in " + lib
	}
	return opensslVersion{}, "no banner and no libcrypto"
}

// sectionBanner looks for the version banner in the read-only data.
func sectionBanner(f *elf.File) (opensslVersion, bool) {
	for _, name := range []string{".rodata", ".rodata.str1.1", ".rodata.str1.8", ".data.rel.ro"} {
		s := f.Section(name)
		if s == nil || s.Type == elf.SHT_NOBITS {
			continue
		}
		data, err := s.Data()
		if err != nil {
			continue
		}
		if !bytes.Contains(data, []byte("OpenSSL ")) {
			continue
		}
		if v, ok := parseOpenSSLVersion(data); ok {
			return v, true
		}
	}
	return opensslVersion{}, false
}

// opensslTarget is the functions of one file and their cookies.
type opensslTarget struct {
	p       *opensslProber
	fns     []string
	addrs   []uint64
	cookies []uint64
}

func (p *opensslProber) inspect(f *tlsFile) (tlsTarget, error) {
	names := make([]string, len(opensslFuncs))
	for i, fn := range opensslFuncs {
		names[i] = fn.name
	}
	have := definedFuncs(f.ELF, names...)
	if _, ok := have["SSL_write"]; !ok {
		return nil, errNotMine
	}
	if _, ok := have["SSL_read"]; !ok {
		return nil, errNotMine
	}
	var base uint64
	v, from := versionOf(f)
	desc := "unknown OpenSSL version (" + from + ")"
	if v.Major != 0 {
		desc = "OpenSSL " + v.String() + " (" + from + ")"
		if l, ok := layoutFor(v); ok {
			base = l.cookie()
		} else {
			desc += ", SSL layout unknown"
		}
	}
	if base == 0 {
		desc += ": sockets found by the thread's I/O only"
	}
	p.t.opts.Logger.Debug("OpenSSL library", "component", "tls", "path", f.Name, "version", desc)

	r, w, err := findOpenSSLInternal(f.ELF, v)
	if err == nil {
		t := &opensslTarget{p: p}
		// The internal functions the four wrap: cheaper probe sites.
		t.fns = []string{r.name, w.name}
		t.addrs = []uint64{r.off, w.off}
		wbits := uint64(cookieSend | cookieEx)
		if w.arg5 {
			wbits |= cookieArg5
		}
		t.cookies = []uint64{base | cookieEx, base | wbits}
		return t, nil
	}
	p.t.opts.Logger.Debug("OpenSSL: probing the API functions", "component", "tls", "path", f.Name, "reason", err.Error())
	return p.apiTarget(have, base), nil
}

// apiTarget probes the API functions of have (file offsets by name).
func (p *opensslProber) apiTarget(have map[string]uint64, base uint64) *opensslTarget {
	t := &opensslTarget{p: p}
	for _, fn := range opensslFuncs {
		if off, ok := have[fn.name]; ok {
			t.fns = append(t.fns, fn.name)
			t.addrs = append(t.addrs, off)
			t.cookies = append(t.cookies, base|fn.bits)
		}
	}
	return t
}

func (t *opensslTarget) functions() []string { return t.fns }

func (t *opensslTarget) attach(exe *link.Executable, pid int) ([]link.Link, error) {
	links, err := t.p.attachMulti(exe, pid, t.fns, t.addrs, t.cookies)
	if err != nil {
		return nil, err
	}
	if err := t.p.attachIO(); err != nil {
		t.p.t.opts.Logger.Warn("OpenSSL: plaintext of SSL objects without a socket descriptor BIO cannot be bound to its socket",
			"component", "probes", "reason", err.Error())
	}
	return links, nil
}

// attachMulti attaches the entry and return programs to the functions
// fns of exe (in process pid only, unless 0): with two uprobe_multi links
// when the kernel has them, else one uprobe per function and way. Returns
// are attached before entries, so that no entry is recorded whose return
// would be missed.
func (p *opensslProber) attachMulti(exe *link.Executable, pid int, fns []string, addrs, cookies []uint64) ([]link.Link, error) {
	p.mu.Lock()
	multi := p.multi
	p.mu.Unlock()
	if multi {
		opts := &link.UprobeMultiOptions{Addresses: addrs, Cookies: cookies, PID: uint32(pid)}
		ret, err := exe.UretprobeMulti(nil, p.objs.SslReturnMulti, opts)
		if err == nil {
			var ent link.Link
			if ent, err = exe.UprobeMulti(nil, p.objs.SslEntryMulti, opts); err == nil {
				return []link.Link{ret, ent}, nil
			}
			ret.Close()
		}
		if pid != 0 && processGone(err) {
			return nil, err // the process is gone
		}
		// Kernels before 6.6 may load the uprobe_multi programs and refuse
		// the link only (EINVAL): classic uprobes then, for this file and
		// every later one, if they work.
		links, cerr := p.attachClassic(exe, pid, fns, addrs, cookies)
		if cerr != nil {
			return nil, fmt.Errorf("attaching to %s: uprobe_multi: %v; uprobes: %w", strings.Join(fns, ", "), err, cerr)
		}
		p.mu.Lock()
		p.multi = false
		p.mu.Unlock()
		p.t.opts.Logger.Debug("OpenSSL uprobes without uprobe_multi links", "component", "tls", "reason", err.Error())
		return links, nil
	}
	return p.attachClassic(exe, pid, fns, addrs, cookies)
}

// attachClassic attaches one uprobe per function and way.
func (p *opensslProber) attachClassic(exe *link.Executable, pid int, fns []string, addrs, cookies []uint64) ([]link.Link, error) {
	var links []link.Link
	for _, ret := range []bool{true, false} {
		for i, fn := range fns {
			opts := &link.UprobeOptions{Address: addrs[i], Cookie: cookies[i], PID: pid}
			var l link.Link
			var err error
			if ret {
				l, err = exe.Uretprobe(fn, p.objs.SslReturn, opts)
			} else {
				l, err = exe.Uprobe(fn, p.objs.SslEntry, opts)
			}
			if err != nil {
				closeLinks(links)
				return nil, fmt.Errorf("attaching to %s: %w", fn, err)
			}
			links = append(links, l)
		}
	}
	return links, nil
}

// closeLinks closes links at once (each uprobe link's detach waits for
// RCU grace periods: in parallel they overlap).
func closeLinks(links []link.Link) error {
	errs := make([]error, len(links))
	var wg sync.WaitGroup
	for i, l := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = l.Close()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// sslIOSyscalls are the system calls whose entries the I/O fallback
// watches before Linux 6.3 (programs sslio_<name>).
var sslIOSyscalls = []string{"read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg"}

// attachIO loads and attaches the socket I/O fallback, once: the BTF
// tracepoints sock_send_length and sock_recv_length (Linux 6.3+), else the
// trace events of the read and write system calls' entries.
func (p *opensslProber) attachIO() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ioDone {
		return nil
	}
	p.ioDone = true
	ok, err := kernelHasBTFType("btf_trace_sock_send_length")
	if err != nil {
		return err
	}
	var names []string
	var ids []uint64
	if ok {
		names = []string{"ssl_sock_send", "ssl_sock_recv"}
	} else {
		events := make([]string, len(sslIOSyscalls))
		for i, c := range sslIOSyscalls {
			names = append(names, "sslio_"+c)
			events[i] = "sys_enter_" + c
		}
		if ids, err = tracepointIDs("syscalls", events...); err != nil {
			return fmt.Errorf("no sock_send_length tracepoint (Linux 6.3+), and the system calls' trace events are not usable: %w", err)
		}
	}
	spec := p.spec.Copy()
	for name := range spec.Programs {
		if !slices.Contains(names, name) {
			delete(spec.Programs, name)
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"ssl_calls": p.objs.SslCalls,
	}})
	if err != nil {
		return loadErr("the OpenSSL socket I/O fallback", err)
	}
	// Only the programs are kept: the maps they use are the shared
	// ssl_calls and, through it, nothing else.
	for _, name := range names {
		p.io = append(p.io, coll.DetachProgram(name))
		p.ioNames = append(p.ioNames, name)
	}
	coll.Close()
	for i, prog := range p.io {
		if ids == nil {
			l, err := link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
			if err != nil {
				return fmt.Errorf("attaching %s: %w", prog, err)
			}
			p.ioLinks = append(p.ioLinks, l)
			continue
		}
		var tmp Tracer
		err := tmp.attachTracepoint(prog, ids[i])
		p.ioLinks = append(p.ioLinks, tmp.closers...)
		if err != nil {
			return err
		}
	}
	return nil
}

// OpenSSLStats are the OpenSSL prober's kernel counters.
type OpenSSLStats struct {
	Calls, ByDescriptor, ByIO, ByCache, Unbound, Nested, BadLayout uint64
}

func (p *opensslProber) stats() (OpenSSLStats, error) {
	var s OpenSSLStats
	for idx, dst := range map[tlsOpenSSLSslStat]*uint64{
		tlsOpenSSLSslStatSSL_STAT_CALLS:      &s.Calls,
		tlsOpenSSLSslStatSSL_STAT_BY_FD:      &s.ByDescriptor,
		tlsOpenSSLSslStatSSL_STAT_BY_IO:      &s.ByIO,
		tlsOpenSSLSslStatSSL_STAT_BY_CACHE:   &s.ByCache,
		tlsOpenSSLSslStatSSL_STAT_UNBOUND:    &s.Unbound,
		tlsOpenSSLSslStatSSL_STAT_NESTED:     &s.Nested,
		tlsOpenSSLSslStatSSL_STAT_BAD_LAYOUT: &s.BadLayout,
	} {
		var per []uint64
		if err := p.objs.SslStats.Lookup(uint32(idx), &per); err != nil {
			return s, fmt.Errorf("reading OpenSSL stats[%d]: %w", idx, err)
		}
		for _, v := range per {
			*dst += v
		}
	}
	return s, nil
}

// programs are the prober's programs by name (run-time statistics).
func (p *opensslProber) programs() map[string]*ebpf.Program {
	progs := map[string]*ebpf.Program{
		"ssl_entry":  p.objs.SslEntry,
		"ssl_return": p.objs.SslReturn,
	}
	if p.objs.SslEntryMulti != nil {
		progs["ssl_entry_multi"] = p.objs.SslEntryMulti
		progs["ssl_return_multi"] = p.objs.SslReturnMulti
	}
	p.mu.Lock()
	for i, prog := range p.io {
		progs[p.ioNames[i]] = prog
	}
	p.mu.Unlock()
	return progs
}

func (p *opensslProber) Close() error {
	p.mu.Lock()
	var errs []error
	for i := len(p.ioLinks) - 1; i >= 0; i-- {
		errs = append(errs, p.ioLinks[i].Close())
	}
	for _, prog := range p.io {
		errs = append(errs, prog.Close())
	}
	p.ioLinks, p.io, p.ioNames = nil, nil, nil
	p.mu.Unlock()
	p.t.dropPayloadVar(p.objs.PayloadCap)
	errs = append(errs, p.objs.Close())
	return errors.Join(errs...)
}
