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
// the watch cannot see (kernels without the mmap trace events).
//
// Where the probes go depends on the tracer's cgroup filter:
//
//   - Without it (every process is traced), each file is probed once, for
//     every process that maps it, now or later.
//   - With it, each traced process is probed on its own (a PID per link):
//     the kernel then sets its breakpoints in that process only, so that
//     the processes of untraced cgroups that map the same library (a load
//     generator, other pods of the same image) never trap into the kernel
//     at all. A uprobe belongs to a file, and without the PID every process
//     mapping the file would take the traps, even though the programs'
//     cgroup filter then returns at once. The watch also reports the
//     processes that traced ones fork (they inherit the parent's
//     breakpoints, but not its links: the child is probed on its own) and
//     the end of probed processes, whose links are then closed; a process
//     whose cgroup stops being traced (Tracer.RemoveCgroup, or found by a
//     rescan) loses its probes too. A process's probes outlive its exec
//     (by the thread group leader, whose task the links name): a probed
//     process that executes a program mapping the same library is traced
//     from the new program's first instruction.
//
//     The cost: a new traced process is probed some milliseconds after
//     its exec, fork or dlopen (the time to read its maps and attach,
//     docs/benchmarks.md), and the SSL calls it makes before are not seen;
//     a short-lived client (a curl) may be missed entirely. A file probed
//     once covers every later process from its first instruction:
//     TLSOptions.PerFile keeps that with the cgroup filter, at the cost of
//     the traps in untraced processes.

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
	// attachment made.
	OnAttach func(TLSAttachment)
	// PerFile probes each file once, for every process that maps it, also
	// when the tracer filters by cgroup (the default then is per traced
	// process; see above).
	PerFile bool
}

// TLSAttachment is the probes of one TLS implementation in one file.
type TLSAttachment struct {
	// Impl is the prober's name ("openssl", "go_tls").
	Impl string
	// Path is the file's path in the process's mount namespace.
	Path string
	// PID is the process whose maps revealed the file; unless
	// AllProcesses, the only process whose calls are probed.
	PID int
	// AllProcesses: the probes are the file's, for every process that
	// maps it (the tracer does not filter by cgroup).
	AllProcesses bool
	// Dev and Inode identify the file (as /proc/<pid>/maps shows them).
	Dev, Inode uint64
	// Probes is the number of links attached.
	Probes int
	// Functions are the functions probed.
	Functions []string
}

// fileID is a file's identity: device and inode.
type fileID struct{ dev, ino uint64 }

// fileTarget is what one prober found in a file.
type fileTarget struct {
	impl   string
	target tlsTarget
}

// fileState is what the manager found in a file.
type fileState struct {
	// name is the path as the first process that revealed it maps it.
	name string
	// targets are the probers' findings (none: nothing to probe).
	targets []fileTarget
	// links and atts are the file's probes for every process (when the
	// tracer does not filter by cgroup).
	links []link.Link
	atts  []TLSAttachment
}

// procState is a process probed on its own: the links per file.
type procState struct {
	cgroup uint64
	files  map[fileID]*procFile
}

type procFile struct {
	links []link.Link
	atts  []TLSAttachment
}

// procEvent is a watch event to act on.
type procEvent struct {
	pid  int
	exit bool
}

// TLSTracer is the running manager. Close detaches everything.
type TLSTracer struct {
	t          *Tracer
	log        *slog.Logger
	opts       TLSOptions
	probers    []tlsProber
	perProcess bool // one set of links per traced process, else per file

	watch      tlsProcWatchObjects
	watchLoad  bool
	watchLinks []io.Closer
	rd         *ringbuf.Reader

	mu       sync.Mutex
	files    map[fileID]*fileState
	procs    map[int]*procState
	attached []TLSAttachment // the last maxAttachedKept made
	nAttach  int             // all made
	scans    uint64
	detached uint64

	urgent    chan procEvent
	rescan    chan struct{}
	untrace   chan uint64
	queuedMu  sync.Mutex
	queued    map[int]bool
	cgroupDir string // cgroup2 mount, for the cgroup filter

	closing sync.WaitGroup // links being closed in the background
	cancel  context.CancelFunc
	wg      sync.WaitGroup
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
	m := &TLSTracer{t: t, log: o.Logger.With("component", "tls"), opts: o, perProcess: t.opts.FilterCgroups && !o.PerFile,
		files: map[fileID]*fileState{}, procs: map[int]*procState{},
		urgent: make(chan procEvent, 1024), rescan: make(chan struct{}, 1), untrace: make(chan uint64, 256), queued: map[int]bool{}}
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
	if m.perProcess {
		t.setTLSManager(nil, m)
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
// tracepoint is required (and, per process, the fork and exit ones), the
// mmap trace events are optional (without them, libraries loaded after the
// program started are found by the periodic rescan only).
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
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{"traced_cgroups": m.t.cgroups}}
	if m.perProcess {
		err = spec.LoadAndAssign(&m.watch, opts)
	} else {
		// Without the fork and exit programs, which only per-process
		// probes need.
		var o struct {
			tlsProcWatchMaps
			WatchExec      *ebpf.Program `ebpf:"watch_exec"`
			WatchMmapEnter *ebpf.Program `ebpf:"watch_mmap_enter"`
			WatchMmapExit  *ebpf.Program `ebpf:"watch_mmap_exit"`
		}
		if err = spec.LoadAndAssign(&o, opts); err == nil {
			m.watch.tlsProcWatchMaps = o.tlsProcWatchMaps
			m.watch.WatchExec, m.watch.WatchMmapEnter, m.watch.WatchMmapExit = o.WatchExec, o.WatchMmapEnter, o.WatchMmapExit
		}
	}
	if err != nil {
		return loadErr("process watch", err)
	}
	m.watchLoad = true
	raw := []struct {
		prog *ebpf.Program
		what string
	}{{m.watch.WatchExec, "exec watch (BTF tracepoint sched_process_exec)"}}
	if m.perProcess {
		raw = append(raw, struct {
			prog *ebpf.Program
			what string
		}{m.watch.WatchFork, "fork watch (BTF tracepoint sched_process_fork)"}, struct {
			prog *ebpf.Program
			what string
		}{m.watch.WatchExit, "exit watch (BTF tracepoint sched_process_exit)"})
	}
	for _, r := range raw {
		l, err := link.AttachTracing(link.TracingOptions{Program: r.prog, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return fmt.Errorf("attaching the %s: %w", r.what, err)
		}
		m.watchLinks = append(m.watchLinks, l)
	}
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

// readWatch turns watch events into urgent scans, and exits into
// detaching.
func (m *TLSTracer) readWatch() {
	var rec ringbuf.Record
	for {
		if err := m.rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return
			}
			continue
		}
		if len(rec.RawSample) < 8 {
			continue
		}
		// struct watch_event starts with the tgid and the kind.
		pid := int(binary.NativeEndian.Uint32(rec.RawSample))
		switch tlsProcWatchWatchKind(binary.NativeEndian.Uint32(rec.RawSample[4:])) {
		case tlsProcWatchWatchKindPROC_EXIT:
			m.enqueue(pid, true)
		case tlsProcWatchWatchKindPROC_EXEC_THREAD:
			// The process's links name a task that is gone: new ones.
			if m.perProcess {
				m.enqueue(pid, true)
			}
			m.enqueue(pid, false)
		default:
			m.enqueue(pid, false)
		}
	}
}

// enqueue asks for a prompt scan of pid (once, however many events), or
// for dropping its probes when it ended.
func (m *TLSTracer) enqueue(pid int, exit bool) {
	m.queuedMu.Lock()
	if exit {
		// A scan queued before stays before the exit; a later one (of a
		// new process with the same pid) must not be merged into it.
		delete(m.queued, pid)
	} else if m.queued[pid] {
		m.queuedMu.Unlock()
		return
	} else {
		m.queued[pid] = true
	}
	m.queuedMu.Unlock()
	select {
	case m.urgent <- procEvent{pid: pid, exit: exit}:
	default:
		// Full: the next rescan will see it (and that it is gone).
		if !exit {
			m.queuedMu.Lock()
			delete(m.queued, pid)
			m.queuedMu.Unlock()
		}
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
		case ev := <-m.urgent:
			m.handle(ev)
		case id := <-m.untrace:
			m.dropCgroup(id)
		case <-tick:
			m.scanAll(ctx)
		case <-m.rescan:
			m.scanAll(ctx)
		}
	}
}

func (m *TLSTracer) handle(ev procEvent) {
	if ev.exit {
		m.dropProc(ev.pid)
		return
	}
	m.queuedMu.Lock()
	delete(m.queued, ev.pid)
	m.queuedMu.Unlock()
	// The watch has filtered by cgroup already.
	m.scanPID(ev.pid, false)
}

// Rescan asks for a scan of every process soon (without waiting for it):
// Tracer.AddCgroup calls it, so that the running processes of a newly
// traced cgroup are probed now rather than at the next periodic rescan.
func (m *TLSTracer) Rescan() {
	select {
	case m.rescan <- struct{}{}:
	default: // one is pending already
	}
}

// untraceCgroup asks for the probes of a cgroup's processes to go.
func (m *TLSTracer) untraceCgroup(id uint64) {
	select {
	case m.untrace <- id:
	default:
		m.Rescan() // which finds the processes of untraced cgroups
	}
}

// scanAll scans every process, serving urgent scans in between; per
// process, it also drops the probes of processes that are gone.
func (m *TLSTracer) scanAll(ctx context.Context) {
	ents, err := os.ReadDir(m.opts.ProcRoot)
	if err != nil {
		m.log.Warn("cannot list processes", "dir", m.opts.ProcRoot, "err", err)
		return
	}
	self := os.Getpid()
	alive := map[int]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		alive[pid] = true
		if ctx != nil {
			select {
			case <-ctx.Done():
				return
			case ev := <-m.urgent:
				m.handle(ev)
			case id := <-m.untrace:
				m.dropCgroup(id)
			default:
			}
		}
		m.scanPID(pid, true)
	}
	for _, pid := range m.procPIDs() {
		if !alive[pid] {
			m.dropProc(pid)
		}
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

// processGone reports the errors of attaching to a process that ended
// (uprobe_multi: ESRCH, which cilium/ebpf reports as os.ErrNotExist;
// perf event uprobes: ESRCH).
func processGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

// gone reports errors that only mean the process (or file) went away.
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) || errors.Is(err, syscall.EACCES)
}

// scanPID probes the new files that pid maps executable. checkCgroup:
// skip it unless it is in a traced cgroup (when the tracer filters). Per
// process, the cgroup is always checked (a process found in an untraced
// cgroup loses its probes).
func (m *TLSTracer) scanPID(pid int, checkCgroup bool) {
	var cg uint64
	if m.cgroupDir != "" && (checkCgroup || m.perProcess) {
		var traced bool
		if cg, traced = m.pidCgroup(pid); !traced {
			if m.perProcess {
				m.dropProc(pid)
			}
			return
		}
	}
	maps, err := execMappings(m.opts.ProcRoot, pid)
	m.mu.Lock()
	m.scans++
	m.mu.Unlock()
	if err != nil {
		if !gone(err) {
			m.log.Debug("cannot read memory maps", "pid", pid, "err", err)
		}
		if m.perProcess {
			m.dropProc(pid)
		}
		return
	}
	if !m.perProcess {
		for _, mp := range maps {
			m.mu.Lock()
			_, known := m.files[mp.id]
			m.mu.Unlock()
			if !known {
				m.probeFile(pid, mp)
			}
		}
		return
	}
	for _, mp := range maps {
		m.mu.Lock()
		st := m.files[mp.id]
		ps := m.procs[pid]
		_, done := ps.file(mp.id)
		m.mu.Unlock()
		if done || (st != nil && len(st.targets) == 0) {
			continue
		}
		m.probeProcFile(pid, cg, mp, st)
	}
	// The probes of files the process no longer maps stay: after an exec
	// (by the leader, whose task the links name), the new program's
	// loader may map the same library again a moment later, and the
	// kernel then sets the breakpoints as it does (before this scan can
	// see the mapping); a probe of an unmapped file costs nothing.
	m.mu.Lock()
	if ps := m.procs[pid]; ps != nil {
		ps.cgroup = cg
	}
	m.mu.Unlock()
}

// file reports whether the process has been probed in file id (with or
// without success).
func (ps *procState) file(id fileID) (*procFile, bool) {
	if ps == nil {
		return nil, false
	}
	pf, ok := ps.files[id]
	return pf, ok
}

// openMapped opens the file of mapping mp through pid's root.
func (m *TLSTracer) openMapped(pid int, mp mapping) (*os.File, string, bool) {
	root := filepath.Join(m.opts.ProcRoot, strconv.Itoa(pid), "root")
	fh, err := os.Open(filepath.Join(root, mp.path))
	if err != nil {
		if !gone(err) {
			m.log.Debug("cannot open mapped file", "path", mp.path, "pid", pid, "err", err)
		}
		return nil, "", false // another process may show the file again
	}
	return fh, root, true
}

// inspect offers the open file fh (mapping mp of pid) to every prober.
// The probers reach it through the descriptor: a process that ends
// meanwhile does not take its files away. exe is nil when the file is not
// an ELF file or cannot be probed.
func (m *TLSTracer) inspect(pid int, mp mapping, fh *os.File, root string) (*fileState, *link.Executable) {
	st := &fileState{name: mp.path}
	ef, err := elf.NewFile(fh)
	if err != nil {
		// Not an ELF file: nothing to probe, and nothing worth a warning.
		m.log.Debug("not probing", "path", mp.path, "pid", pid, "reason", err.Error())
		return st, nil
	}
	path := fmt.Sprintf("/proc/self/fd/%d", fh.Fd())
	exe, err := link.OpenExecutable(path)
	if err != nil {
		m.log.Warn("cannot probe file", "path", mp.path, "pid", pid, "reason", err.Error())
		return st, nil
	}
	tf := &tlsFile{Path: path, Name: mp.path, Root: root, ELF: ef, Exe: exe}
	for _, p := range m.probers {
		target, err := p.inspect(tf)
		if errors.Is(err, errNotMine) {
			continue
		}
		if err != nil {
			// Once per file: the file is remembered.
			m.log.Warn("TLS library not probed", "impl", p.name(), "path", mp.path, "pid", pid, "reason", err.Error())
			continue
		}
		st.targets = append(st.targets, fileTarget{impl: p.name(), target: target})
	}
	return st, exe
}

// attachTargets attaches every target of st to exe, in process pid (0:
// all), and records the attachments.
// ended reports that the process ended before anything was attached.
func (m *TLSTracer) attachTargets(st *fileState, exe *link.Executable, pid int, mp mapping) (links []link.Link, atts []TLSAttachment, ended bool) {
	for _, ft := range st.targets {
		target := pid
		if !m.perProcess {
			target = 0
		}
		ls, err := ft.target.attach(exe, target)
		if err != nil {
			if m.perProcess && processGone(err) {
				ended = true // the process ended
				continue
			}
			m.log.Warn("TLS library not probed", "impl", ft.impl, "path", mp.path, "pid", pid, "reason", err.Error())
			continue
		}
		links = append(links, ls...)
		a := TLSAttachment{Impl: ft.impl, Path: mp.path, PID: pid, AllProcesses: !m.perProcess,
			Dev: mp.id.dev, Inode: mp.id.ino, Probes: len(ls)}
		if f, ok := ft.target.(interface{ functions() []string }); ok {
			a.Functions = f.functions()
		}
		atts = append(atts, a)
		m.mu.Lock()
		m.attached = append(m.attached, a)
		if len(m.attached) > maxAttachedKept {
			m.attached = append(m.attached[:0], m.attached[len(m.attached)-maxAttachedKept/2:]...)
		}
		m.nAttach++
		m.mu.Unlock()
		m.log.Debug("TLS library probed", "impl", a.Impl, "path", a.Path, "pid", pid, "probes", a.Probes, "all_processes", a.AllProcesses,
			"functions", strings.Join(a.Functions, ","))
		if m.opts.OnAttach != nil {
			m.opts.OnAttach(a)
		}
	}
	return links, atts, ended && len(links) == 0
}

// probeFile probes a new file for every process that maps it, and
// remembers the outcome.
func (m *TLSTracer) probeFile(pid int, mp mapping) {
	fh, root, ok := m.openMapped(pid, mp)
	if !ok {
		return
	}
	defer fh.Close()
	st, exe := m.inspect(pid, mp, fh, root)
	if exe != nil && len(st.targets) > 0 {
		st.links, st.atts, _ = m.attachTargets(st, exe, pid, mp)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files == nil { // closed meanwhile
		closeLinks(st.links)
		return
	}
	m.files[mp.id] = st
}

// probeProcFile probes file mp in process pid (in cgroup cg): st is what
// an earlier look at the file found, or nil for a file not seen before.
func (m *TLSTracer) probeProcFile(pid int, cg uint64, mp mapping, st *fileState) {
	fh, root, ok := m.openMapped(pid, mp)
	if !ok {
		return
	}
	defer fh.Close()
	var exe *link.Executable
	if st == nil {
		st, exe = m.inspect(pid, mp, fh, root)
		m.mu.Lock()
		if m.files == nil {
			m.mu.Unlock()
			return
		}
		m.files[mp.id] = st
		m.mu.Unlock()
		if exe == nil || len(st.targets) == 0 {
			return
		}
	} else {
		// The offsets found before are valid only in the same file: the
		// path may now name another (an upgraded library).
		var sst syscall.Stat_t
		if err := syscall.Fstat(int(fh.Fd()), &sst); err != nil {
			return
		}
		if sst.Ino != mp.id.ino {
			if st, exe = m.inspect(pid, mp, fh, root); exe == nil || len(st.targets) == 0 {
				return
			}
		} else {
			var err error
			if exe, err = link.OpenExecutable(fmt.Sprintf("/proc/self/fd/%d", fh.Fd())); err != nil {
				return
			}
		}
	}
	// Registered before the links exist, so that an exit right after is
	// reported.
	if err := m.watch.ProbedTgids.Put(uint32(pid), uint8(1)); err != nil {
		m.log.Debug("process exits will be found by the rescan only", "pid", pid, "reason", err.Error())
	}
	links, atts, ended := m.attachTargets(st, exe, pid, mp)
	if ended {
		m.dropProc(pid) // its other files' probes
		_ = m.watch.ProbedTgids.Delete(uint32(pid))
		return
	}
	m.mu.Lock()
	if m.procs == nil { // closed meanwhile
		m.mu.Unlock()
		closeLinks(links)
		return
	}
	ps := m.procs[pid]
	if ps == nil {
		ps = &procState{cgroup: cg, files: map[fileID]*procFile{}}
		m.procs[pid] = ps
	}
	// Recorded also without links (the process ended, or the attach
	// failed and was logged): not tried again for this process.
	ps.files[mp.id] = &procFile{links: links, atts: atts}
	m.mu.Unlock()
}

// dropProc detaches the probes of pid (it ended, or is not traced).
func (m *TLSTracer) dropProc(pid int) {
	m.mu.Lock()
	ps := m.procs[pid]
	if ps == nil {
		m.mu.Unlock()
		return
	}
	delete(m.procs, pid)
	var links []link.Link
	for _, pf := range ps.files {
		links = append(links, pf.links...)
		m.detached += uint64(len(pf.atts))
	}
	m.mu.Unlock()
	_ = m.watch.ProbedTgids.Delete(uint32(pid))
	m.closeLater(links)
}

// dropCgroup detaches the probes of the processes of cgroup id.
func (m *TLSTracer) dropCgroup(id uint64) {
	m.mu.Lock()
	var pids []int
	for pid, ps := range m.procs {
		if ps.cgroup == id {
			pids = append(pids, pid)
		}
	}
	m.mu.Unlock()
	for _, pid := range pids {
		m.dropProc(pid)
	}
}

func (m *TLSTracer) procPIDs() []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	pids := make([]int, 0, len(m.procs))
	for pid := range m.procs {
		pids = append(pids, pid)
	}
	return pids
}

// closeLater closes links in the background (each close waits for the
// kernel's RCU grace periods): new processes are not kept waiting for
// their probes meanwhile. Close waits for them.
func (m *TLSTracer) closeLater(links []link.Link) {
	if len(links) == 0 {
		return
	}
	m.closing.Add(1)
	go func() {
		defer m.closing.Done()
		if err := closeLinks(links); err != nil {
			m.log.Debug("closing uprobe links", "err", err)
		}
	}()
}

// pidCgroup returns the cgroup v2 id of pid, and whether it is traced.
func (m *TLSTracer) pidCgroup(pid int) (uint64, bool) {
	raw, err := os.ReadFile(filepath.Join(m.opts.ProcRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(raw), "\n") {
		rel, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(m.cgroupDir, rel), &st); err != nil {
			return 0, false
		}
		var v uint8
		return st.Ino, m.t.cgroups.Lookup(st.Ino, &v) == nil
	}
	return 0, false
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

// PerProcess reports whether the uprobes are attached per traced process
// (the tracer filters by cgroup, and PerFile was not asked for).
func (m *TLSTracer) PerProcess() bool { return m.perProcess }

// maxAttachedKept bounds the history Attached keeps: per process, every
// new traced process that maps a TLS library adds one.
const maxAttachedKept = 4096

// Attached lists the attachments made so far (also those detached
// since), in the order they were made: all of them, or the last 2048 to
// 4096 once more were made.
func (m *TLSTracer) Attached() []TLSAttachment {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]TLSAttachment(nil), m.attached...)
}

// Active lists the attachments in place now: per file, then per process.
func (m *TLSTracer) Active() []TLSAttachment {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []TLSAttachment
	for _, st := range m.files {
		out = append(out, st.atts...)
	}
	for _, ps := range m.procs {
		for _, pf := range ps.files {
			out = append(out, pf.atts...)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].PID != out[j].PID {
			return out[i].PID < out[j].PID
		}
		return out[i].Path < out[j].Path
	})
	return out
}

// TLSStats are the manager's and the probers' counters.
type TLSStats struct {
	// Files is the number of distinct files looked at, Attached the
	// number of attachments made, Detached the number detached again
	// (processes that ended, left the traced cgroups or unmapped the
	// file), Processes the number of processes with probes of their own
	// now, Scans the number of process scans.
	Files, Attached, Processes int
	Detached, Scans            uint64
	// OpenSSL are the OpenSSL prober's kernel counters.
	OpenSSL OpenSSLStats
}

// Stats reads the counters.
func (m *TLSTracer) Stats() (TLSStats, error) {
	m.mu.Lock()
	s := TLSStats{Files: len(m.files), Attached: m.nAttach, Processes: len(m.procs), Detached: m.detached, Scans: m.scans}
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
	m.t.setTLSManager(m, nil)
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
	for _, ps := range m.procs {
		for _, pf := range ps.files {
			links = append(links, pf.links...)
		}
	}
	m.files, m.procs = nil, nil
	m.mu.Unlock()
	errs = append(errs, closeLinks(links))
	m.closing.Wait()
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
