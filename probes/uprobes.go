package probes

import (
	"bufio"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
)

// The TLS uprobe manager finds the executable files that traced processes
// map (programs and shared libraries, from /proc/<pid>/maps, opened through
// /proc/<pid>/root so that files of containers are found in their own
// mount namespace) and offers each new file, once, to every TLS prober
// (tlsProberFactories). It looks at every process at start, and again at
// once when a process executes a program or maps a file executable (a BPF
// object of its own: bpf/tls_procwatch.c), so that libraries loaded by the
// dynamic loader or by dlopen later (Python's _ssl at `import ssl`) are
// probed before the program uses them; a slow periodic rescan catches what
// the watch cannot see (cgroups traced later, kernels without the mmap
// trace events).

// TLSOptions configure StartTLS.
type TLSOptions struct {
	// Logger (default: the tracer's).
	Logger *slog.Logger
	// ProcRoot is the proc file system (default /proc).
	ProcRoot string
	// Rescan is how often every traced process is looked at again
	// (default 30 s; negative: never).
	Rescan time.Duration
	// OnAttach, if set, is called (from the manager's goroutine) for every
	// file probed.
	OnAttach func(TLSAttachment)
}

// TLSAttachment is one file whose TLS functions are probed.
type TLSAttachment struct {
	// Impl is the prober's name ("openssl", "go_tls").
	Impl string
	// Path is the file's path in the process's mount namespace.
	Path string
	// PID is the process whose maps revealed the file.
	PID int
	// Dev and Inode identify the file (as /proc/<pid>/maps shows them).
	Dev, Inode uint64
	// Probes is the number of uprobes attached.
	Probes int
}

// fileID is a file's identity: device and inode.
type fileID struct{ dev, ino uint64 }

// fileState is what the manager did with a file.
type fileState struct {
	links []link.Link
}

// TLSTracer is the running manager. Close detaches everything.
type TLSTracer struct {
	t       *Tracer
	log     *slog.Logger
	opts    TLSOptions
	probers []tlsProber

	watch      tlsProcWatchObjects
	watchLoad  bool
	watchLinks []io.Closer
	rd         *ringbuf.Reader

	mu       sync.Mutex
	files    map[fileID]*fileState
	attached []TLSAttachment
	scans    uint64

	urgent    chan int
	rescan    chan struct{}
	queuedMu  sync.Mutex
	queued    map[int]bool
	cgroupDir string // cgroup2 mount, for the cgroup filter

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// StartTLS loads the TLS probers and starts the manager: when it returns,
// every process running (in a traced cgroup, when the tracer filters by
// cgroup) has had its files probed. The manager runs until ctx ends or
// Close; Close detaches and unloads everything it made.
func (t *Tracer) StartTLS(ctx context.Context, o TLSOptions) (*TLSTracer, error) {
	if o.Logger == nil {
		o.Logger = t.opts.Logger
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.Rescan == 0 {
		o.Rescan = 30 * time.Second
	}
	m := &TLSTracer{t: t, log: o.Logger.With("component", "tls"), opts: o, files: map[fileID]*fileState{},
		urgent: make(chan int, 1024), rescan: make(chan struct{}, 1), queued: map[int]bool{}}
	if len(tlsProberFactories) == 0 {
		return nil, errors.New("no TLS probers are built in")
	}
	var errs []string
	for _, f := range tlsProberFactories {
		p, err := f(t)
		if err != nil {
			errs = append(errs, err.Error())
			m.log.Warn("TLS prober not loaded", "reason", err.Error())
			continue
		}
		m.probers = append(m.probers, p)
	}
	if len(m.probers) == 0 {
		return nil, fmt.Errorf("no TLS prober could be loaded: %s", strings.Join(errs, "; "))
	}
	if t.opts.FilterCgroups {
		dir, err := cgroup2Mount(o.ProcRoot)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("cgroup v2 mount (for the cgroup filter): %w", err)
		}
		m.cgroupDir = dir
	}
	if err := m.startWatch(); err != nil {
		m.Close()
		return nil, err
	}
	m.scanAll(nil)

	ctx, m.cancel = context.WithCancel(ctx)
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		m.readWatch()
	}()
	go func() {
		defer m.wg.Done()
		m.work(ctx)
	}()
	return m, nil
}

// startWatch loads bpf/tls_procwatch.c and attaches it: the exec
// tracepoint is required, the mmap trace events are optional (without
// them, libraries loaded after the program started are found by the
// periodic rescan only).
func (m *TLSTracer) startWatch() error {
	spec, err := loadTlsProcWatch()
	if err != nil {
		return err
	}
	for name, v := range map[string]any{
		"self_tgid":      uint32(os.Getpid()),
		"filter_cgroups": boolByte(m.t.opts.FilterCgroups),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return fmt.Errorf("setting %s: %w", name, err)
		}
	}
	if err := spec.LoadAndAssign(&m.watch, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"traced_cgroups": m.t.cgroups,
	}}); err != nil {
		return loadErr("process watch", err)
	}
	m.watchLoad = true
	l, err := link.AttachTracing(link.TracingOptions{Program: m.watch.WatchExec, AttachType: ebpf.AttachTraceRawTp})
	if err != nil {
		return fmt.Errorf("attaching the exec watch (BTF tracepoint sched_process_exec): %w", err)
	}
	m.watchLinks = append(m.watchLinks, l)
	ids, err := tracepointIDs("syscalls", "sys_enter_mmap", "sys_exit_mmap")
	if err != nil {
		m.log.Warn("libraries loaded after a program starts are found by the periodic rescan only",
			"rescan", m.opts.Rescan, "reason", err.Error())
	} else {
		// attachTracepoint records into a Tracer: borrow a scratch one.
		var tmp Tracer
		for i, p := range []*ebpf.Program{m.watch.WatchMmapEnter, m.watch.WatchMmapExit} {
			if err := tmp.attachTracepoint(p, ids[i]); err != nil {
				tmp.Close()
				return err
			}
		}
		m.watchLinks = append(m.watchLinks, tmp.closers...)
	}
	m.rd, err = ringbuf.NewReader(m.watch.ProcEvents)
	if err != nil {
		return fmt.Errorf("opening the process watch ring: %w", err)
	}
	return nil
}

// readWatch turns watch events into urgent scans.
func (m *TLSTracer) readWatch() {
	var rec ringbuf.Record
	for {
		if err := m.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return
			}
			continue
		}
		if len(rec.RawSample) < 4 {
			continue
		}
		// struct watch_event starts with the tgid.
		m.enqueue(int(binary.NativeEndian.Uint32(rec.RawSample)))
	}
}

// enqueue asks for a prompt scan of pid (once, however many events).
func (m *TLSTracer) enqueue(pid int) {
	m.queuedMu.Lock()
	if m.queued[pid] {
		m.queuedMu.Unlock()
		return
	}
	m.queued[pid] = true
	m.queuedMu.Unlock()
	select {
	case m.urgent <- pid:
	default:
		// Full: the next rescan will see it.
		m.queuedMu.Lock()
		delete(m.queued, pid)
		m.queuedMu.Unlock()
	}
}

// work runs the urgent scans, and the periodic full rescans between them.
func (m *TLSTracer) work(ctx context.Context) {
	var tick <-chan time.Time
	if m.opts.Rescan > 0 {
		tk := time.NewTicker(m.opts.Rescan)
		defer tk.Stop()
		tick = tk.C
	}
	for {
		select {
		case <-ctx.Done():
			m.rd.Close() // ends readWatch
			return
		case pid := <-m.urgent:
			m.scanUrgent(pid)
		case <-tick:
			m.scanAll(ctx)
		case <-m.rescan:
			m.scanAll(ctx)
		}
	}
}

func (m *TLSTracer) scanUrgent(pid int) {
	m.queuedMu.Lock()
	delete(m.queued, pid)
	m.queuedMu.Unlock()
	// The watch has filtered by cgroup already.
	m.scanPID(pid, false)
}

// Rescan asks for a scan of every process soon (without waiting for it):
// call it after tracing more cgroups, so that their running processes'
// libraries are probed now rather than at the next periodic rescan.
func (m *TLSTracer) Rescan() {
	select {
	case m.rescan <- struct{}{}:
	default: // one is pending already
	}
}

// scanAll scans every process, serving urgent scans in between.
func (m *TLSTracer) scanAll(ctx context.Context) {
	ents, err := os.ReadDir(m.opts.ProcRoot)
	if err != nil {
		m.log.Warn("cannot list processes", "dir", m.opts.ProcRoot, "err", err)
		return
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if ctx != nil {
			select {
			case <-ctx.Done():
				return
			case u := <-m.urgent:
				m.scanUrgent(u)
			default:
			}
		}
		m.scanPID(pid, true)
	}
}

// mapping is one executable file mapping of a process.
type mapping struct {
	path string
	id   fileID
}

// execMappings reads the executable file mappings of pid, each file once.
func execMappings(procRoot string, pid int) ([]mapping, error) {
	f, err := os.Open(filepath.Join(procRoot, strconv.Itoa(pid), "maps"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	seen := map[fileID]bool{}
	var out []mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// address perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || len(fields[1]) < 3 || fields[1][2] != 'x' {
			continue
		}
		path := strings.Join(fields[5:], " ")
		if !strings.HasPrefix(path, "/") || strings.HasSuffix(path, " (deleted)") {
			continue
		}
		ino, err := strconv.ParseUint(fields[4], 10, 64)
		if err != nil || ino == 0 {
			continue
		}
		maj, min, ok := strings.Cut(fields[3], ":")
		if !ok {
			continue
		}
		ma, err1 := strconv.ParseUint(maj, 16, 32)
		mi, err2 := strconv.ParseUint(min, 16, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		id := fileID{dev: ma<<32 | mi, ino: ino}
		if seen[id] {
			continue
		}
		seen[id] = true
		out = append(out, mapping{path: path, id: id})
	}
	return out, sc.Err()
}

// gone reports errors that only mean the process (or file) went away.
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) || errors.Is(err, syscall.EACCES)
}

// scanPID probes the new files that pid maps executable. checkCgroup:
// skip it unless it is in a traced cgroup (when the tracer filters).
func (m *TLSTracer) scanPID(pid int, checkCgroup bool) {
	if checkCgroup && m.cgroupDir != "" && !m.pidTraced(pid) {
		return
	}
	maps, err := execMappings(m.opts.ProcRoot, pid)
	m.mu.Lock()
	m.scans++
	m.mu.Unlock()
	if err != nil {
		if !gone(err) {
			m.log.Debug("cannot read memory maps", "pid", pid, "err", err)
		}
		return
	}
	for _, mp := range maps {
		m.mu.Lock()
		_, known := m.files[mp.id]
		m.mu.Unlock()
		if known {
			continue
		}
		m.probeFile(pid, mp)
	}
}

// probeFile offers a new file to every prober and remembers the outcome.
// The file is opened once, through the process's root, and the probers
// reach it through that descriptor: a process that ends meanwhile does not
// take its files away.
func (m *TLSTracer) probeFile(pid int, mp mapping) {
	root := filepath.Join(m.opts.ProcRoot, strconv.Itoa(pid), "root")
	fh, err := os.Open(filepath.Join(root, mp.path))
	if err != nil {
		if !gone(err) {
			m.log.Debug("cannot open mapped file", "path", mp.path, "pid", pid, "err", err)
		}
		return // another process may show the file again
	}
	defer fh.Close()
	var sst syscall.Stat_t
	if err := syscall.Fstat(int(fh.Fd()), &sst); err != nil {
		return
	}
	st := &fileState{}
	ef, err := elf.NewFile(fh)
	if err != nil {
		// Not an ELF file: nothing to probe, and nothing worth a warning.
		m.log.Debug("not probing", "path", mp.path, "pid", pid, "reason", err.Error())
		m.remember(mp.id, st)
		return
	}
	path := fmt.Sprintf("/proc/self/fd/%d", fh.Fd())
	exe, err := link.OpenExecutable(path)
	if err != nil {
		m.log.Warn("cannot probe file", "path", mp.path, "pid", pid, "reason", err.Error())
		m.remember(mp.id, st)
		return
	}
	tf := &tlsFile{Path: path, Name: mp.path, Root: root, ELF: ef, Exe: exe}
	for _, p := range m.probers {
		links, err := p.attach(tf)
		if errors.Is(err, errNotMine) {
			continue
		}
		if err != nil {
			// Once per file: the file is remembered below.
			m.log.Warn("TLS library not probed", "impl", p.name(), "path", mp.path, "pid", pid, "reason", err.Error())
			continue
		}
		st.links = append(st.links, links...)
		a := TLSAttachment{Impl: p.name(), Path: mp.path, PID: pid, Dev: mp.id.dev, Inode: mp.id.ino, Probes: len(links)}
		m.mu.Lock()
		m.attached = append(m.attached, a)
		m.mu.Unlock()
		m.log.Debug("TLS library probed", "impl", a.Impl, "path", a.Path, "pid", pid, "probes", a.Probes)
		if m.opts.OnAttach != nil {
			m.opts.OnAttach(a)
		}
	}
	m.remember(mp.id, st)
}

func (m *TLSTracer) remember(id fileID, st *fileState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files == nil { // closed meanwhile
		for _, l := range st.links {
			l.Close()
		}
		return
	}
	m.files[id] = st
}

// pidTraced reports whether pid's cgroup v2 group is traced.
func (m *TLSTracer) pidTraced(pid int) bool {
	raw, err := os.ReadFile(filepath.Join(m.opts.ProcRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(raw), "\n") {
		rel, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(m.cgroupDir, rel), &st); err != nil {
			return false
		}
		var v uint8
		return m.t.cgroups.Lookup(st.Ino, &v) == nil
	}
	return false
}

// cgroup2Mount finds the cgroup v2 mount point in this process's mountinfo.
func cgroup2Mount(procRoot string) (string, error) {
	f, err := os.Open(filepath.Join(procRoot, "self", "mountinfo"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		if fs := strings.Fields(post); len(fs) == 0 || fs[0] != "cgroup2" {
			continue
		}
		if f := strings.Fields(pre); len(f) >= 5 {
			return strings.ReplaceAll(f[4], `\040`, " "), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 file system mounted")
}

// Attached lists the files probed so far, in the order they were.
func (m *TLSTracer) Attached() []TLSAttachment {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]TLSAttachment(nil), m.attached...)
}

// TLSStats are the manager's and the probers' counters.
type TLSStats struct {
	// Files is the number of distinct files looked at, Attached the
	// number probed, Scans the number of process scans.
	Files, Attached int
	Scans           uint64
	// OpenSSL are the OpenSSL prober's kernel counters.
	OpenSSL OpenSSLStats
}

// Stats reads the counters.
func (m *TLSTracer) Stats() (TLSStats, error) {
	m.mu.Lock()
	s := TLSStats{Files: len(m.files), Attached: len(m.attached), Scans: m.scans}
	m.mu.Unlock()
	for _, p := range m.probers {
		if op, ok := p.(*opensslProber); ok {
			var err error
			if s.OpenSSL, err = op.stats(); err != nil {
				return s, err
			}
		}
	}
	return s, nil
}

// Programs returns the probers' programs by name (run-time statistics).
func (m *TLSTracer) Programs() map[string]*ebpf.Program {
	out := map[string]*ebpf.Program{}
	for _, p := range m.probers {
		if pp, ok := p.(interface {
			programs() map[string]*ebpf.Program
		}); ok {
			for n, prog := range pp.programs() {
				out[n] = prog
			}
		}
	}
	return out
}

// Close stops the manager, detaches every uprobe and the watch, and
// unloads the programs, in reverse order of creation.
func (m *TLSTracer) Close() error {
	if m.cancel != nil {
		m.cancel()
		m.wg.Wait()
	} else if m.rd != nil {
		m.rd.Close()
	}
	var errs []error
	for i := len(m.watchLinks) - 1; i >= 0; i-- {
		errs = append(errs, m.watchLinks[i].Close())
	}
	m.watchLinks = nil
	m.mu.Lock()
	ids := make([]fileID, 0, len(m.files))
	for id := range m.files {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].ino < ids[j].ino })
	var links []link.Link
	for _, id := range ids {
		links = append(links, m.files[id].links...)
	}
	errs = append(errs, closeLinks(links))
	m.files = nil
	m.mu.Unlock()
	for i := len(m.probers) - 1; i >= 0; i-- {
		errs = append(errs, m.probers[i].Close())
	}
	m.probers = nil
	if m.watchLoad {
		errs = append(errs, m.watch.Close())
		m.watchLoad = false
	}
	return errors.Join(errs...)
}
