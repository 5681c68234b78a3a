package probes

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestStartTLSAttachesAndCloseRemovesEverything: a Python process that
// imported ssl runs before TLS tracing starts; StartTLS probes its libssl
// (once, however many processes map it), and Close leaves no program,
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
	pidOK := len(ssl) == 1 && (ssl[0].PID == procs[0].Process.Pid || ssl[0].PID == procs[1].Process.Pid)
	if !pidOK || ssl[0].Impl != "openssl" {
		t.Fatalf("libssl.so.3 attachments %+v, want one, by one of the python processes", ssl)
	}
	during, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	added := diff(during, before)
	// Programs: the watch's 3 and OpenSSL's 6 (entry and return, classic
	// and uprobe_multi, and the two I/O fallbacks). Links: exec, the two
	// I/O fallbacks, one per file and way (uprobe_multi) or eight, and
	// the two mmap trace events' links.
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
