package tcsessions

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
)

// helperEnv, when set, makes the test binary a tracer process: it opens a
// tracer with the JSON configuration the variable holds, prints "ready"
// and waits to be killed. The crash tests SIGKILL it.
const helperEnv = "CLOVISOR_TC_HELPER"

func TestMain(m *testing.M) {
	if js := os.Getenv(helperEnv); js != "" {
		os.Exit(helperMain(js))
	}
	os.Exit(m.Run())
}

func helperMain(js string) int {
	var cfg Config
	if err := json.Unmarshal([]byte(js), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	tr, err := Open(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Printf("ready %d\n", len(tr.Interfaces()))
	select {}
}

// crashedTracer runs a tracer in a child process and SIGKILLs it once it
// has attached: whatever it made stays behind as after a real crash.
func crashedTracer(t *testing.T, cfg Config) {
	t.Helper()
	js, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), helperEnv+"="+string(js))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "ready") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper: %q %v", line, err)
	}
	if err := cmd.Process.Signal(unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("helper did not die by SIGKILL: %v", err)
	}
}

// bpffs mounts a private bpf file system for the test's pins.
func bpffs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting the bpffs: %v", err)
		}
	})
	return dir
}

var idRE = regexp.MustCompile(`\b(id|prog_id|link_id) \d+|tag [0-9a-f]+|\(\d+\)`)

// normalizedState is tcState without ids, so that states compare across
// loads of the same programs.
func normalizedState(t *testing.T, ns *testbed.Netns) string {
	return idRE.ReplaceAllString(tcState(t, ns), "")
}

// ours reports whether a state holds anything of Clovisor's.
func ours(state string) bool {
	return strings.Contains(state, "clv_tc") || strings.Contains(state, FilterNamePrefix)
}

// attachedAt counts the attachments of ours at a hook ("ingress" or
// "egress") that bpftool net show lists in a tc state: tcx links by their
// program's name ("tcx/ingress clv_tc ..."), cls_bpf filters by theirs
// ("clsact/egress clovisor_tc_egress ...").
func attachedAt(state, hook string) int {
	n := 0
	for _, l := range strings.Split(state, "\n") {
		if strings.Contains(l, "/"+hook+" clv_tc") || strings.Contains(l, "/"+hook+" "+FilterNamePrefix) {
			n++
		}
	}
	return n
}

// TestCloseLeavesNothing: after Close, the namespace's tc state is what it
// was before Open (no tcx link, filter or qdisc left), the process holds
// no BPF object any more, the pin directory is empty and the state file
// gone; in every attach mode.
func TestCloseLeavesNothing(t *testing.T) {
	for _, v := range []struct {
		name, mode string
		pin        bool
	}{{"tcx", AttachTCX, false}, {"tcx pinned", AttachTCX, true}, {"clsact", AttachClsact, false}} {
		t.Run(v.name, func(t *testing.T) {
			node := testbed.NewNode(t, testbed.Bridged)
			node.AddPod(t, "a")
			node.AddPod(t, "b")
			pristine := normalizedState(t, node.NS)
			held0, err := testbed.BPFObjectsOf(os.Getpid())
			if err != nil {
				t.Fatal(err)
			}
			cfg := Config{Netns: node.NS.Path(), StateDir: t.TempDir(), Attach: v.mode}
			if v.pin {
				cfg.PinDir = filepath.Join(bpffs(t), "clovisor")
			}
			log, lb := testLogger(t)
			cfg.Logger = log
			tr, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if n := len(tr.Interfaces()); n != 3 {
				t.Fatalf("%d interfaces: %+v", n, tr.Interfaces())
			}
			during := tcState(t, node.NS)
			if attachedAt(during, "ingress") < 3 || attachedAt(during, "egress") < 3 {
				t.Errorf("not attached everywhere:\n%s", during)
			}
			if v.pin {
				if ents, _ := os.ReadDir(cfg.PinDir); len(ents) != 6 {
					t.Errorf("%d pins, want 6", len(ents))
				}
			}
			wantProgs := len(tr.Programs()) // one on both hooks, or one per hook
			held, err := testbed.BPFObjectsOf(os.Getpid())
			if err != nil {
				t.Fatal(err)
			}
			if err := tr.Close(); err != nil {
				t.Fatal(err)
			}
			if err := tr.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
			if after := normalizedState(t, node.NS); after != pristine {
				t.Errorf("state after Close differs from before Open:\nbefore:\n%s\nafter:\n%s", pristine, after)
			}
			// Only what this tracer added must go.
			mine := testbed.BPFObjects{Progs: minus(held.Progs, held0.Progs), Maps: minus(held.Maps, held0.Maps), Links: minus(held.Links, held0.Links)}
			if len(mine.Progs) != wantProgs || len(mine.Maps) < 8 {
				t.Errorf("tracer held %+v", mine)
			}
			if left := testbed.StillLoaded(mine, 3*time.Second); left.Count() != 0 {
				t.Errorf("still loaded after Close: %+v", left)
			}
			if v.pin {
				if ents, _ := os.ReadDir(cfg.PinDir); len(ents) != 0 {
					t.Errorf("pins left: %v", ents)
				}
			}
			if _, err := os.Stat(filepath.Join(cfg.StateDir, "tc-state.json")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state file left: %v", err)
			}
			if t.Failed() {
				t.Log(lb.String())
			}
		})
	}
}

func minus(a, b []uint32) []uint32 {
	seen := map[uint32]bool{}
	for _, x := range b {
		seen[x] = true
	}
	var out []uint32
	for _, x := range a {
		if !seen[x] {
			out = append(out, x)
		}
	}
	return out
}

// TestCrashRecovery: a tracer process killed with SIGKILL leaves its cls_bpf
// filters and clsact qdiscs (and, when pinned, its tcx links) attached; the
// next instance finds and removes exactly those before attaching, and its
// Close leaves the namespace as it was. Unpinned tcx links die with the
// process: nothing is left.
func TestCrashRecovery(t *testing.T) {
	for _, v := range []struct {
		name, mode string
		pin        bool
		want       CleanupReport
	}{
		{"clsact", AttachClsact, false, CleanupReport{Filters: 4, Qdiscs: 2}},
		{"tcx pinned", AttachTCX, true, CleanupReport{Links: 4}},
		{"tcx", AttachTCX, false, CleanupReport{}},
	} {
		t.Run(v.name, func(t *testing.T) {
			node := testbed.NewNode(t, testbed.Routed)
			pod := node.AddPod(t, "a")
			pristine := normalizedState(t, node.NS)
			cfg := Config{Netns: node.NS.Path(), StateDir: t.TempDir(), Attach: v.mode}
			if v.pin {
				cfg.PinDir = filepath.Join(bpffs(t), "clovisor")
			}
			crashedTracer(t, cfg)
			left := tcState(t, node.NS)
			if stale := ours(left); stale != (v.want != CleanupReport{}) {
				t.Fatalf("after the crash, objects of ours left: %v, want %v:\n%s", stale, v.want != CleanupReport{}, left)
			}

			log, lb := testLogger(t)
			cfg.Logger = log
			tr, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if got := tr.Cleaned(); got != v.want {
				t.Errorf("cleaned %+v, want %+v\n%s", got, v.want, lb.String())
			}
			// The new instance traces: one exchange through the pod.
			root := t.TempDir()
			randomFile(t, root, "f", 10)
			testbed.StartNginx(t, pod.NS, 8080, root, pod.IP)
			var got []*Exchange
			done := make(chan error, 1)
			ctx, cancel := contextWithCancel()
			go func() {
				done <- tr.Run(ctx, nil, func(x *Exchange) {
					if x.Interface == pod.HostVeth && x.Request.NewBytes > 0 {
						got = append(got, x)
					}
				})
			}()
			curl(t, node.Outside, "http://"+pod.IP.String()+":8080/f")
			time.Sleep(3 * PollInterval)
			cancel()
			<-done
			if len(got) != 1 {
				t.Errorf("%d exchanges after recovery, want 1", len(got))
			}
			// Exactly one set of our objects: no duplicate filters.
			if s := tcState(t, node.NS); attachedAt(s, "ingress") != 2 {
				t.Errorf("after recovery:\n%s", s)
			}
			if err := tr.Close(); err != nil {
				t.Fatal(err)
			}
			if after := normalizedState(t, node.NS); after != pristine {
				t.Errorf("state after recovery and Close differs from before:\nbefore:\n%s\nafter:\n%s", pristine, after)
			}
		})
	}
}

// foreignTool plays another tool on an interface: a clsact qdisc of its
// own with a cls_bpf filter on each hook (one at Clovisor's default
// priority 1 with protocol IP, which Clovisor's filter cannot share) and a
// tcx program on ingress. It returns a description of them to compare.
func foreignTool(t *testing.T, node *testbed.Node, dev string) (describe func() string) {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "foreign_tool", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}, // pass
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	ns, err := netns.GetFromPath(node.NS.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lk, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	idx := lk.Attrs().Index
	if err := h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT,
	}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []*netlink.BpfFilter{
		{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1,
			Protocol: unix.ETH_P_IP, Priority: 1}, Fd: prog.FD(), Name: "foreign_ingress", DirectAction: true},
		{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_EGRESS, Handle: 7,
			Protocol: unix.ETH_P_ALL, Priority: 5}, Fd: prog.FD(), Name: "foreign_egress", DirectAction: true},
	} {
		if err := h.FilterAdd(f); err != nil {
			t.Fatal(err)
		}
	}
	// A tcx link held by this test process.
	var l link.Link
	w, err := newNSWorker(node.NS.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	if err := w.do(func() error {
		var err error
		l, err = link.AttachTCX(link.TCXOptions{Interface: idx, Program: prog, Attach: ebpf.AttachTCXIngress})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return func() string {
		var lines []string
		for _, args := range [][]string{
			{"qdisc", "show", "dev", dev},
			{"filter", "show", "dev", dev, "ingress"},
			{"filter", "show", "dev", dev, "egress"},
		} {
			out, err := exec.Command("tc", append([]string{"-n", node.NS.Name}, args...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("tc %v: %v: %s", args, err, out)
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.Contains(line, "foreign") || strings.Contains(line, "qdisc clsact") {
					lines = append(lines, line)
				}
			}
		}
		for _, line := range strings.Split(tcxState(t, node.NS), "\n") {
			if strings.HasPrefix(line, dev+" ") && strings.Contains(line, "foreign") {
				lines = append(lines, line)
			}
		}
		return strings.Join(lines, "\n")
	}
}

// TestForeignObjectsUntouched: another tool's clsact qdisc, its filters
// (one at the priority Clovisor asks for, with another protocol) and its
// tcx program survive Clovisor's start, stop, crash and recovery
// unchanged, in both attach modes; Clovisor's own filters find another
// priority.
func TestForeignObjectsUntouched(t *testing.T) {
	for _, mode := range attachModes {
		t.Run(mode, func(t *testing.T) {
			node := testbed.NewNode(t, testbed.Bridged)
			pod := node.AddPod(t, "a")
			foreign := foreignTool(t, node, pod.HostVeth)
			before := foreign()
			if !strings.Contains(before, "handle 0x1 foreign_ingress direct-action") ||
				!strings.Contains(before, "handle 0x7 foreign_egress direct-action") ||
				!strings.Contains(before, "tcx/ingress foreign_tool") || !strings.Contains(before, "qdisc clsact") {
				t.Fatalf("foreign tool's objects:\n%s", before)
			}
			cfg := Config{Netns: node.NS.Path(), StateDir: t.TempDir(), Attach: mode}
			log, lb := testLogger(t)
			cfg.Logger = log
			tr, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if n := len(tr.Interfaces()); n != 2 {
				t.Fatalf("interfaces %+v\n%s", tr.Interfaces(), lb.String())
			}
			if got := foreign(); got != before {
				t.Errorf("foreign objects changed by Open:\nbefore:\n%s\nafter:\n%s", before, got)
			}
			if mode == AttachClsact {
				// Our filter cannot join the foreign one's priority
				// (another protocol): the kernel picked one.
				if n := strings.Count(tcState(t, node.NS), "handle 0xc10 "+FilterNamePrefix); n != 4 {
					t.Errorf("%d filters of ours, want 4", n)
				}
				if !strings.Contains(lb.String(), "filter priority taken") {
					t.Errorf("no priority fallback logged:\n%s", lb.String())
				}
			}
			if err := tr.Close(); err != nil {
				t.Fatal(err)
			}
			if got := foreign(); got != before {
				t.Errorf("foreign objects changed by Close:\nbefore:\n%s\nafter:\n%s", before, got)
			}
			crashedTracer(t, cfg)
			if got := foreign(); got != before {
				t.Errorf("foreign objects changed by the crashed instance:\nbefore:\n%s\nafter:\n%s", before, got)
			}
			tr, err = Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := tr.Close(); err != nil {
				t.Fatal(err)
			}
			if got := foreign(); got != before {
				t.Errorf("foreign objects changed by recovery:\nbefore:\n%s\nafter:\n%s", before, got)
			}
			if s := tcState(t, node.NS); ours(s) {
				t.Errorf("objects of ours left:\n%s", s)
			}
			if t.Failed() {
				t.Log(lb.String())
			}
		})
	}
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
