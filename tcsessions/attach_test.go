package tcsessions

import (
	"bytes"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/clovisor/clovisor/internal/testbed"
)

// logBuffer collects a tracer's log for assertions.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func testLogger(t testing.TB) (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// tcState describes the tc objects of a namespace: every tcx program and
// every clsact qdisc and filter, as bpftool and tc print them (ids and
// tags removed so that states compare across loads).
func tcState(t *testing.T, ns *testbed.Netns) string {
	t.Helper()
	var sb strings.Builder
	out, err := exec.Command("ip", "netns", "exec", ns.Name, "bpftool", "net", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool net show: %v: %s", err, out)
	}
	sb.Write(out)
	sb.WriteString(tcxState(t, ns))
	out, err = exec.Command("ip", "-n", ns.Name, "link", "show").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || !strings.HasSuffix(f[0], ":") {
			continue
		}
		dev, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		for _, args := range [][]string{
			{"qdisc", "show", "dev", dev},
			{"filter", "show", "dev", dev, "ingress"},
			{"filter", "show", "dev", dev, "egress"},
		} {
			out, _ := exec.Command("tc", append([]string{"-n", ns.Name}, args...)...).CombinedOutput()
			sb.WriteString(strings.Join(args, " ") + ":\n" + string(out))
		}
	}
	return sb.String()
}

// tcxState lists the tcx programs of every interface of a namespace (the
// bpftool of Debian 12 does not show them), by program name, in chain
// order.
func tcxState(t *testing.T, ns *testbed.Netns) string {
	t.Helper()
	w, err := newNSWorker(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	links, err := w.nl.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	sb.WriteString("tcx:\n")
	for _, lk := range links {
		for _, h := range hooks {
			var res *link.QueryResult
			if err := w.do(func() error {
				var err error
				res, err = link.QueryPrograms(link.QueryOptions{Target: lk.Attrs().Index, Attach: h.tcx})
				return err
			}); err != nil {
				t.Fatalf("querying tcx programs of %s: %v", lk.Attrs().Name, err)
			}
			for _, p := range res.Programs {
				name := "?"
				if prog, err := ebpf.NewProgramFromID(p.ID); err == nil {
					if info, err := prog.Info(); err == nil {
						name = info.Name
					}
					prog.Close()
				}
				_, pinned := p.LinkID()
				fmt.Fprintf(&sb, "%s tcx/%s %s link=%v\n", lk.Attrs().Name, h.name, name, pinned)
			}
		}
	}
	return sb.String()
}

// TestAttachAPI: with nothing selected, interfaces are traced and released
// by name; per-interface ports follow the interface; loopback and
// interfaces without Ethernet frames are refused.
func TestAttachAPI(t *testing.T) {
	node := testbed.NewNode(t, testbed.Bridged)
	pod := node.AddPod(t, "a")
	node.NS.IP(t, "tuntap", "add", "tun7", "mode", "tun")
	pristine := tcState(t, node.NS)
	log, lb := testLogger(t)
	tr, err := Open(Config{Netns: node.NS.Path(), StateDir: t.TempDir(), Logger: log, Attach: AttachClsact,
		PodInterfaces: []string{}, NodeInterfaces: []string{"tun*"},
		Ports: []Port{{Port: 6379, Protocol: "redis", Interface: pod.HostVeth}}})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if n := len(tr.Interfaces()); n != 0 || !strings.Contains(lb.String(), "selected interface not traced") {
		t.Fatalf("interfaces %+v\nlog: %s", tr.Interfaces(), lb.String())
	}
	if err := tr.Attach(pod.HostVeth, RolePod); err != nil {
		t.Fatal(err)
	}
	if err := tr.Attach(pod.HostVeth, RoleNode); err != nil {
		t.Fatal(err)
	}
	ifs := tr.Interfaces()
	if len(ifs) != 1 || ifs[0].Name != pod.HostVeth || ifs[0].Role != RolePod || ifs[0].Mode != AttachClsact {
		t.Fatalf("interfaces %+v", ifs)
	}
	// The interface's port is in dports2proto under its index.
	var proto uint32
	if err := tr.objs.Dports2proto.Lookup(tcPortKey{Ifindex: uint32(ifs[0].Index), Port: 6379}, &proto); err != nil || proto != 9 {
		t.Errorf("per-interface port: %d %v", proto, err)
	}
	if err := tr.SetPort(Port{Port: 11211, Protocol: "memcached", Interface: pod.HostVeth}); err != nil {
		t.Error(err)
	}
	if err := tr.SetPort(Port{Port: 1, Interface: "nope"}); err == nil {
		t.Error("port on an untraced interface accepted")
	}
	for _, name := range []string{"lo", "tun7", "missing0"} {
		if err := tr.Attach(name, RoleNode); err == nil {
			t.Errorf("Attach(%s) accepted", name)
		}
	}
	if err := tr.Detach(pod.HostVeth); err != nil {
		t.Fatal(err)
	}
	if err := tr.Detach(pod.HostVeth); err == nil {
		t.Error("second Detach accepted")
	}
	if err := tr.objs.Dports2proto.Lookup(tcPortKey{Ifindex: uint32(ifs[0].Index), Port: 6379}, &proto); err == nil {
		t.Error("per-interface port left after Detach")
	}
	if got := tcState(t, node.NS); got != pristine {
		t.Errorf("after Detach:\n%s\nbefore:\n%s", got, pristine)
	}
}
