package probes

import (
	"bufio"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestStartTLSAttachesAndCloseRemovesEverything: Python processes that
// imported ssl run before TLS tracing starts; without the cgroup filter,
// StartTLS probes their libssl once, for every process (however many map
// it), and Close leaves no program,
// map or link of TLS tracing in the kernel, while the socket tracer keeps
// its own.
func TestStartTLSAttachesAndCloseRemovesEverything(t *testing.T) {
	testbed.RequireRoot(t)
	python := testbed.RequireTool(t, "python3")
	var procs []*exec.Cmd
	for i := 0; i < 2; i++ {
		cmd := exec.Command(python, "-c", "import ssl, sys; print('up', flush=True); sys.stdin.read()")
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		defer stdin.Close()
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { stdin.Close(); cmd.Wait() }()
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil || line != "up\n" {
			t.Fatalf("python: %q %v", line, err)
		}
		procs = append(procs, cmd)
	}
	onlyOpenSSL(t)
	tr, err := Open(Options{Mode: ModeTracepoint})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	before, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	tt, err := tr.StartTLS(context.Background(), TLSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var ssl []TLSAttachment
	for _, a := range tt.Attached() {
		if filepath.Base(a.Path) == "libssl.so.3" {
			ssl = append(ssl, a)
		}
	}
	// Revealed by one of the python processes, or by any other process
	// of the machine that maps the library.
	if len(ssl) != 1 || ssl[0].Impl != "openssl" || !ssl[0].AllProcesses || ssl[0].PID <= 0 {
		t.Fatalf("libssl.so.3 attachments %+v, want one, for every process", ssl)
	}
	during, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	added := diff(during, before)
	// Programs: the watch's 3 (without the fork and exit watches, which
	// only per-process probes need) and OpenSSL's 6 (entry and return,
	// classic and uprobe_multi, and the two I/O fallbacks). Links: exec,
	// the two I/O fallbacks, one per file and way (uprobe_multi) or eight,
	// and the two mmap trace events' links.
	progs := tt.Programs()
	links := 1 + 2 + 2
	for _, a := range tt.Attached() {
		links += a.Probes
	}
	if len(added.Progs) != 3+len(progs) || len(added.Links) != links || len(added.Maps) < 4 {
		t.Errorf("StartTLS added %+v, want %d programs, %d links and the maps", added, 3+len(progs), links)
	}
	loaded, err := LoadedPrograms()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range added.Progs {
		if _, ok := loaded[ebpf.ProgramID(id)]; !ok {
			t.Errorf("program %d not found by LoadedPrograms: %v", id, loaded)
		}
	}
	start := time.Now()
	if err := tt.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Close took %v", time.Since(start))
	if left := testbed.StillLoaded(added, 3*time.Second); left.Count() != 0 {
		t.Errorf("still loaded after Close: %+v", left)
	}
	after, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Progs) != len(before.Progs) || len(after.Links) != len(before.Links) {
		t.Errorf("the socket tracer held %+v before, %+v after", before, after)
	}
}

// onlyOpenSSL leaves the OpenSSL prober alone in tlsProberFactories for
// the test, so that its counts do not depend on the other probers (and on
// the other programs running on the machine that those would probe).
func onlyOpenSSL(t *testing.T) {
	saved := tlsProberFactories
	t.Cleanup(func() { tlsProberFactories = saved })
	tlsProberFactories = []func(*Tracer) (tlsProber, error){newOpenSSLProber}
}

func diff(a, b testbed.BPFObjects) testbed.BPFObjects {
	minus := func(x, y []uint32) []uint32 {
		have := map[uint32]bool{}
		for _, v := range y {
			have[v] = true
		}
		var out []uint32
		for _, v := range x {
			if !have[v] {
				out = append(out, v)
			}
		}
		return out
	}
	return testbed.BPFObjects{Progs: minus(a.Progs, b.Progs), Maps: minus(a.Maps, b.Maps), Links: minus(a.Links, b.Links)}
}

func TestOpenSSLVersionsAndLayouts(t *testing.T) {
	for _, c := range []struct {
		banner string
		want   string
		layout sslLayout
		known  bool
	}{
		{"xxOpenSSL 1.1.1w  11 Sep 2023\x00", "1.1.1w", layout111, true},
		{"OpenSSL 1.1.0l  10 Sep 2019", "1.1.0l", layout110, true},
		{"OpenSSL 3.0.19 27 Jan 2026", "3.0.19", layout30, true},
		{"OpenSSL 3.1.6 4 Jun 2024", "3.1.6", layout30, true},
		{"OpenSSL 3.2.3 3 Sep 2024", "3.2.3", layout32, true},
		{"OpenSSL 3.2.4 11 Feb 2025", "3.2.4", layout324, true},
		{"OpenSSL 3.3.2 3 Sep 2024", "3.3.2", layout32, true},
		{"OpenSSL 3.3.3 11 Feb 2025", "3.3.3", layout324, true},
		{"OpenSSL 3.4.0 22 Oct 2024", "3.4.0", layout32, true},
		{"OpenSSL 3.4.1 11 Feb 2025", "3.4.1", layout324, true},
		{"OpenSSL 3.5.0 8 Apr 2025", "3.5.0", layout324, true},
		{"OpenSSL 1.0.2u  20 Dec 2019", "1.0.2u", sslLayout{}, false},
	} {
		v, ok := parseOpenSSLVersion([]byte(c.banner))
		if !ok || v.String() != c.want {
			t.Errorf("%q: parsed %v %v, want %s", c.banner, v, ok, c.want)
			continue
		}
		l, known := layoutFor(v)
		if l != c.layout || known != c.known {
			t.Errorf("%s: layout %+v %v, want %+v %v", c.want, l, known, c.layout, c.known)
		}
	}
	for _, bad := range []string{"OpenSSL", "OpenSSL 3.0", "BoringSSL", "openssl 3.0.1 1 Jan 2020"} {
		if v, ok := parseOpenSSLVersion([]byte(bad)); ok {
			t.Errorf("%q parsed as %v", bad, v)
		}
	}
	// The cookie packs the offsets where bpf/tls_openssl.c unpacks them.
	if c := layout324.cookie(); c != 1<<63|0x48|0x50<<16|0x38<<32|0x8<<40 {
		t.Errorf("cookie %#x", c)
	}
}

// TestTLSRescanFindsNewlyTracedCgroup: with the cgroup filter, a process of
// a cgroup that is not traced is not looked at; once its cgroup is traced,
// Rescan finds its libssl at once.
func TestTLSRescanFindsNewlyTracedCgroup(t *testing.T) {
	testbed.RequireRoot(t)
	python := testbed.RequireTool(t, "python3")
	lib := t.TempDir()
	for _, name := range []string{"libssl.so.3", "libcrypto.so.3"} {
		data, err := os.ReadFile(filepath.Join("/usr/lib/x86_64-linux-gnu", name))
		if err != nil {
			t.Fatalf("libssl3 (Debian) is needed: %v", err)
		}
		if err := os.WriteFile(filepath.Join(lib, name), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cg := testbed.NewCgroup(t, "rescan")
	cmd := exec.Command(python, "-c", "import ssl, sys; print('up', flush=True); sys.stdin.read()")
	cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+lib)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cg.Start(cmd); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "up\n" {
		t.Fatalf("python: %q %v", line, err)
	}
	tr, err := Open(Options{Mode: ModeTracepoint, FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	tt, err := tr.StartTLS(context.Background(), TLSOptions{Rescan: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer tt.Close()
	copyPath := filepath.Join(lib, "libssl.so.3")
	has := func() bool {
		for _, a := range tt.Attached() {
			if a.Path == copyPath && a.PID == cmd.Process.Pid {
				return true
			}
		}
		return false
	}
	if has() {
		t.Fatalf("the copy was probed although its cgroup is not traced: %+v", tt.Attached())
	}
	if err := tr.AddCgroup(cg.ID()); err != nil {
		t.Fatal(err)
	}
	tt.Rescan()
	deadline := time.Now().Add(5 * time.Second)
	for !has() {
		if time.Now().After(deadline) {
			t.Fatalf("the copy was not probed after Rescan: %+v", tt.Attached())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sslCalls is a running testdata/ssl_calls.c: a process that makes SSL
// calls through the machine's libssl on command.
type sslCalls struct {
	t   testing.TB
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
	pid int
}

// buildSSLCalls compiles testdata/ssl_calls.c against the machine's libssl.
func buildSSLCalls(t testing.TB) string {
	t.Helper()
	clang := testbed.RequireTool(t, "clang-14")
	if _, err := os.Stat("/usr/include/openssl/ssl.h"); err != nil {
		testbed.RequireTool(t, "openssl/ssl.h (libssl-dev)")
	}
	bin := filepath.Join(t.TempDir(), "ssl_calls")
	if out, err := exec.Command(clang, "-O1", "-o", bin, "testdata/ssl_calls.c", "-lssl", "-lcrypto").CombinedOutput(); err != nil {
		t.Fatalf("building ssl_calls: %v\n%s", err, out)
	}
	return bin
}

func startSSLCalls(t testing.TB, bin string, cg *testbed.Cgroup) *sslCalls {
	t.Helper()
	cmd := exec.Command(bin)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cg.Start(cmd); err != nil {
		t.Fatal(err)
	}
	p := &sslCalls{t: t, cmd: cmd, in: in, out: bufio.NewReader(out), pid: cmd.Process.Pid}
	t.Cleanup(func() { in.Close(); cmd.Process.Kill(); cmd.Wait() })
	if line := p.line(); line != fmt.Sprintf("ready %d", p.pid) {
		t.Fatalf("ssl_calls: %q", line)
	}
	return p
}

func (p *sslCalls) line() string {
	p.t.Helper()
	l, err := p.out.ReadString('\n')
	if err != nil {
		p.t.Fatalf("ssl_calls %d: %v", p.pid, err)
	}
	return strings.TrimSuffix(l, "\n")
}

// calls makes n SSL calls and returns their mean time.
func (p *sslCalls) calls(n int) string {
	p.t.Helper()
	fmt.Fprintf(p.in, "calls %d\n", n)
	l := p.line()
	ns, ok := strings.CutPrefix(l, "done ")
	if !ok {
		p.t.Fatalf("ssl_calls %d: %q", p.pid, l)
	}
	return ns + " ns/call"
}

// fork makes the process fork; the child takes the commands until exit.
func (p *sslCalls) fork() int {
	p.t.Helper()
	fmt.Fprintf(p.in, "fork\n")
	var child int
	if l := p.line(); func() bool { _, err := fmt.Sscanf(l, "child %d", &child); return err != nil }() {
		p.t.Fatalf("ssl_calls %d fork: %q", p.pid, l)
	}
	return child
}

// exit ends the process (or its forked child).
func (p *sslCalls) exit() { fmt.Fprintf(p.in, "exit\n") }

// sslRuns sums the run counts of the OpenSSL entry and return programs.
func sslRuns(t *testing.T, tt *TLSTracer) (entries, returns uint64) {
	t.Helper()
	for name, prog := range tt.Programs() {
		st, err := prog.Stats()
		if err != nil {
			t.Fatal(err)
		}
		switch name {
		case "ssl_entry", "ssl_entry_multi":
			entries += st.RunCount
		case "ssl_return", "ssl_return_multi":
			returns += st.RunCount
		}
	}
	return
}

// probedCode reads, in process pid's memory, the first byte of each
// probed function of the OpenSSL target of the file at path.
func probedCode(t *testing.T, tt *TLSTracer, pid int, path string) []byte {
	t.Helper()
	var offs []uint64
	tt.mu.Lock()
	for _, st := range tt.files {
		if st.name != path {
			continue
		}
		for _, ft := range st.targets {
			if ot, ok := ft.target.(*opensslTarget); ok {
				offs = append(offs, ot.addrs...)
			}
		}
	}
	tt.mu.Unlock()
	if len(offs) == 0 {
		t.Fatalf("no OpenSSL target in %s", path)
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	var out []byte
	for _, off := range offs {
		found := false
		for _, l := range strings.Split(string(maps), "\n") {
			f := strings.Fields(l)
			if len(f) < 6 || f[5] != path || f[1][2] != 'x' {
				continue
			}
			var start, end, foff uint64
			fmt.Sscanf(f[0], "%x-%x", &start, &end)
			fmt.Sscanf(f[2], "%x", &foff)
			if off < foff || off >= foff+(end-start) {
				continue
			}
			b := make([]byte, 1)
			if _, err := mem.ReadAt(b, int64(start+off-foff)); err != nil {
				t.Fatal(err)
			}
			out = append(out, b[0])
			found = true
		}
		if !found {
			t.Fatalf("offset %#x of %s not mapped executable in %d", off, path, pid)
		}
	}
	return out
}

// TestTLSPerProcessProbes: with the cgroup filter, the uprobes are the
// traced processes' own. Two processes map the machine's libssl.so.3, one
// in a traced cgroup and one not: only the traced one has breakpoints in
// its code (int3 at each probed function) and runs the programs (exactly
// once per call and way); the other's calls run nothing and its code is
// untouched. A child the traced process forks is probed on its own and
// loses its links when it exits; untracing the cgroup removes the traced
// process's links and breakpoints, tracing it again (AddCgroup rescans)
// probes it again, an exec by another thread than the leader (whose task
// the links named) probes it anew, its exit closes its links, and Close
// leaves nothing of TLS tracing in the kernel.
func TestTLSPerProcessProbes(t *testing.T) {
	testbed.RequireRoot(t)
	bin := buildSSLCalls(t)
	onlyOpenSSL(t)
	cgA, cgB := testbed.NewCgroup(t, "traced"), testbed.NewCgroup(t, "untraced")
	a, b := startSSLCalls(t, bin, cgA), startSSLCalls(t, bin, cgB)
	libssl := ""
	if raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", a.pid)); err == nil {
		for _, l := range strings.Split(string(raw), "\n") {
			if f := strings.Fields(l); len(f) >= 6 && filepath.Base(f[5]) == "libssl.so.3" {
				libssl = f[5]
			}
		}
	}
	if libssl == "" {
		t.Fatalf("ssl_calls maps no libssl.so.3")
	}

	tr, err := Open(Options{Mode: ModeTracepoint, FilterCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if err := tr.AddCgroup(cgA.ID()); err != nil {
		t.Fatal(err)
	}
	before, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	tt, err := tr.StartTLS(context.Background(), TLSOptions{Rescan: -1})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			tt.Close()
		}
	}()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()

	// links: the watch's five (exec, fork, exit, two mmap trace events),
	// the OpenSSL I/O fallback's two, and per probed process 2
	// (uprobe_multi) or 2 per function (uprobes).
	const fixedLinks = 5 + 2
	links := func() int {
		t.Helper()
		o, err := testbed.BPFObjectsOf(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		return len(diff(o, before).Links)
	}
	// On x86-64 the internal functions that SSL_read(_ex) and
	// SSL_write(_ex) wrap.
	wantFuncs := []string{"SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"}
	if runtime.GOARCH == "amd64" {
		wantFuncs = []string{"ssl_read_internal", "ssl_write_internal"}
	}
	active := func(pids ...int) []TLSAttachment {
		t.Helper()
		slices.Sort(pids) // Active's order
		got := tt.Active()
		if len(got) != len(pids) {
			return nil
		}
		for i, at := range got {
			if at.PID != pids[i] || at.Path != libssl || at.Impl != "openssl" || at.AllProcesses || (at.Probes != 2 && at.Probes != 2*len(at.Functions)) ||
				!slices.Equal(at.Functions, wantFuncs) {
				return nil
			}
		}
		return got
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("after 5 s, still not %s: active %+v, %d links", what, tt.Active(), links())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	const int3 = 0xcc
	breakpoints := func(pid int) (n, of int) {
		t.Helper()
		code := probedCode(t, tt, pid, libssl)
		for _, c := range code {
			if c == int3 {
				n++
			}
		}
		return n, len(code)
	}
	checkCode := func(pid int, want bool) {
		t.Helper()
		if runtime.GOARCH != "amd64" {
			return // the breakpoint instruction checked is x86's
		}
		n, of := breakpoints(pid)
		if (want && n != of) || (!want && n != 0) {
			t.Errorf("process %d: %d of the %d probed functions start with int3, want %v", pid, n, of, want)
		}
	}
	runs := func(p *sslCalls, n int, want uint64, who string) {
		t.Helper()
		e0, r0 := sslRuns(t, tt)
		took := p.calls(n)
		e1, r1 := sslRuns(t, tt)
		if e1-e0 != want || r1-r0 != want {
			t.Errorf("%s: %d SSL calls ran the entry program %d times and the return program %d times, want %d each",
				who, n, e1-e0, r1-r0, want)
		}
		t.Logf("%s: %s", who, took)
	}

	at := active(a.pid)
	if at == nil {
		t.Fatalf("active attachments %+v, want libssl of process %d only", tt.Active(), a.pid)
	}
	perProc := at[0].Probes
	if n := links(); n != fixedLinks+perProc {
		t.Errorf("%d links, want %d", n, fixedLinks+perProc)
	}
	checkCode(a.pid, true)
	checkCode(b.pid, false)
	runs(b, 2000, 0, "untraced process")
	runs(a, 2000, 2000, "traced process")

	// A child of the traced process: probed on its own, until it exits.
	child := a.fork()
	waitFor("probed in the child", func() bool { return active(a.pid, child) != nil })
	if n := links(); n != fixedLinks+2*perProc {
		t.Errorf("%d links with the child, want %d", n, fixedLinks+2*perProc)
	}
	runs(a, 1000, 1000, "traced process's child") // a's input goes to the child now
	a.exit()                                      // the child's
	waitFor("detached from the child", func() bool { return active(a.pid) != nil && links() == fixedLinks+perProc })

	// Untracing the cgroup detaches; tracing it again attaches again.
	if err := tr.RemoveCgroup(cgA.ID()); err != nil {
		t.Fatal(err)
	}
	waitFor("detached after RemoveCgroup", func() bool { return len(tt.Active()) == 0 && links() == fixedLinks })
	checkCode(a.pid, false)
	runs(a, 1000, 0, "process of an untraced cgroup")
	if err := tr.AddCgroup(cgA.ID()); err != nil {
		t.Fatal(err)
	}
	waitFor("probed again after AddCgroup", func() bool { return active(a.pid) != nil && links() == fixedLinks+perProc })
	checkCode(a.pid, true)
	runs(a, 1000, 1000, "process of a traced cgroup again")

	// A thread other than the leader executes the program again: it
	// becomes the leader, and the links made for the old leader's task
	// are useless; the process is probed anew.
	fmt.Fprintf(a.in, "texec\n")
	if l := a.line(); l != fmt.Sprintf("ready %d", a.pid) {
		t.Fatalf("ssl_calls after texec: %q", l)
	}
	waitFor("probed anew after the exec", func() bool {
		st, _ := tt.Stats()
		return st.Attached == 4 && active(a.pid) != nil && links() == fixedLinks+perProc
	})
	checkCode(a.pid, true)
	runs(a, 1000, 1000, "process after a thread's exec")

	// The traced process ends: its links go.
	a.exit()
	if err := a.cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	waitFor("detached after the exit", func() bool { return len(tt.Active()) == 0 && links() == fixedLinks })
	st, err := tt.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Attached != 4 || st.Detached != 4 || st.Processes != 0 {
		t.Errorf("stats %+v, want 4 attachments made and detached (process, child, process again, after the exec), no process probed", st)
	}
	runs(b, 1000, 0, "untraced process at the end")
	checkCode(b.pid, false)

	during, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	added := diff(during, before)
	closed = true
	if err := tt.Close(); err != nil {
		t.Fatal(err)
	}
	if left := testbed.StillLoaded(added, 3*time.Second); left.Count() != 0 {
		t.Errorf("still loaded after Close: %+v", left)
	}
	after, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Progs) != len(before.Progs) || len(after.Links) != len(before.Links) || len(after.Maps) != len(before.Maps) {
		t.Errorf("held %+v before TLS tracing, %+v after", before, after)
	}
}

// TestOpenSSLInternalFunctions: the internal functions behind SSL_read(_ex)
// and SSL_write(_ex) are found from the wrappers' code (libraries built by
// the test, whose symbol tables say where the internal functions are), with
// the position of the write's byte count pointer by the version (before
// and after OpenSSL 3.3, whose SSL_write_ex jumps through the PLT to
// SSL_write_ex2); wrappers that call each other, internal functions that
// do not start with a push, a version that contradicts the code, and
// versions before 1.1.1 are refused. The machine's libssl.so.3 has them.
func TestOpenSSLInternalFunctions(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the internal functions are used on x86-64 only")
	}
	clang := testbed.RequireTool(t, "clang-14")
	dir := t.TempDir()
	build := func(define string) *elf.File {
		t.Helper()
		so := filepath.Join(dir, "w"+define+".so")
		args := []string{"-O2", "-fPIC", "-shared", "-o", so, "testdata/ssl_wrappers.c"}
		if define != "" {
			args = append(args, "-D"+define)
		}
		if out, err := exec.Command(clang, args...).CombinedOutput(); err != nil {
			t.Fatalf("building ssl_wrappers.c -D%s: %v\n%s", define, err, out)
		}
		f, err := elf.Open(so)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	version := func(s string) opensslVersion {
		v, ok := parseOpenSSLVersion([]byte("OpenSSL " + s + " 1 Jan 2025"))
		if !ok {
			t.Fatalf("version %s", s)
		}
		return v
	}
	symOff := func(f *elf.File, name string) uint64 {
		t.Helper()
		syms, err := f.Symbols()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range syms {
			if s.Name == name {
				for _, p := range f.Progs {
					if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && s.Value >= p.Vaddr && s.Value < p.Vaddr+p.Memsz {
						return s.Value - p.Vaddr + p.Off
					}
				}
			}
		}
		t.Fatalf("no symbol %s", name)
		return 0
	}
	for _, c := range []struct {
		define, version string
		arg5            bool
		err             string // "" when found
	}{
		{"", "3.0.19", false, ""},
		{"", "1.1.1w", false, ""},
		{"FLAGS33", "3.3.0", true, ""},
		{"FLAGS33", "3.5.1", true, ""},
		{"FLAGS33", "3.2.4", false, "SSL_write's call"},
		{"", "3.3.0", false, "SSL_write's call"},
		{"NESTED", "3.0.19", false, "SSL_read and SSL_read_ex call 0 functions in common"},
		{"LEAF", "3.0.19", false, "not a push"},
		{"", "1.1.0l", false, "before 1.1.1"},
	} {
		f := build(c.define)
		r, w, err := findOpenSSLInternal(f, version(c.version))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("-D%s, OpenSSL %s: %+v %+v, error %v; want an error with %q", c.define, c.version, r, w, err, c.err)
			}
			continue
		}
		want := []opensslInternal{
			{name: "ssl_read_internal", off: symOff(f, "ssl_read_internal")},
			{name: "ssl_write_internal", off: symOff(f, "ssl_write_internal"), arg5: c.arg5},
		}
		if err != nil || r != want[0] || w != want[1] {
			t.Errorf("-D%s, OpenSSL %s: %+v %+v %v, want %+v", c.define, c.version, r, w, err, want)
		}
	}
	sys, err := elf.Open(SystemLibssl)
	if err != nil {
		testbed.RequireTool(t, SystemLibssl+" (libssl3)")
		return
	}
	defer sys.Close()
	v, _ := sectionBanner(sys)
	if v.Major == 0 {
		if crypto, err := elf.Open(filepath.Join(filepath.Dir(SystemLibssl), "libcrypto.so.3")); err == nil {
			v, _ = sectionBanner(crypto)
			crypto.Close()
		}
	}
	r, w, err := findOpenSSLInternal(sys, v)
	if err != nil || r.off == 0 || w.off == 0 || w.arg5 != (v.Major == 3 && v.Minor >= 3) {
		t.Errorf("%s (OpenSSL %s): %+v %+v %v", SystemLibssl, v, r, w, err)
	}
}

// SystemLibssl is the machine's libssl.so.3.
const SystemLibssl = "/usr/lib/x86_64-linux-gnu/libssl.so.3"

// TestTLSObjectsFollowPayloadBytes: the OpenSSL and Go crypto/tls objects
// start with the tracer's payload prefix, follow SetPayloadBytes, and are
// forgotten by the tracer when closed.
func TestTLSObjectsFollowPayloadBytes(t *testing.T) {
	testbed.RequireRoot(t)
	tr, err := Open(Options{Mode: testMode(), FilterCgroups: true, PayloadBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ossl, err := newOpenSSLProber(tr)
	if err != nil {
		t.Fatal(err)
	}
	gotls, err := newGoTLSProber(tr)
	if err != nil {
		ossl.Close()
		t.Fatal(err)
	}
	vars := map[string]*ebpf.Variable{
		"openssl": ossl.(*opensslProber).objs.PayloadCap,
		"go_tls":  gotls.(*goTLSProber).objs.PayloadCap,
	}
	check := func(want uint32) {
		t.Helper()
		for name, v := range vars {
			var got uint32
			if err := v.Get(&got); err != nil || got != want {
				t.Errorf("%s payload_cap = %d (%v), want %d", name, got, err, want)
			}
		}
	}
	check(64)
	if err := tr.SetPayloadBytes(500); err != nil {
		t.Fatal(err)
	}
	check(500)
	if n := len(tr.payloadVars); n != 3 {
		t.Errorf("tracer holds %d payload_cap variables, want 3 (socket, OpenSSL, Go)", n)
	}
	if err := errors.Join(ossl.Close(), gotls.Close()); err != nil {
		t.Fatal(err)
	}
	if n := len(tr.payloadVars); n != 1 {
		t.Errorf("after closing the TLS objects the tracer holds %d payload_cap variables, want 1", n)
	}
	if err := tr.SetPayloadBytes(0); err != nil || tr.PayloadBytes() != 0 {
		t.Errorf("SetPayloadBytes(0): %v, prefix now %d", err, tr.PayloadBytes())
	}
}
