package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/clovisor/clovisor/internal/testbed"
)

var agentBin string

func TestMain(m *testing.M) {
	testbed.ExecProbedMain() // when run as the exec wrapper (tls_test.go)
	dir, err := os.MkdirTemp("", "clovisor-agent-test")
	if err != nil {
		panic(err)
	}
	agentBin = filepath.Join(dir, "clovisor")
	if out, err := exec.Command("go", "build", "-o", agentBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building the agent: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agent is a running clovisor process.
type agent struct {
	cmd            *exec.Cmd
	stdout, stderr *syncBuffer
	done           chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startAgent runs the agent binary and waits until it has attached.
func startAgent(t testing.TB, env []string, args ...string) *agent {
	t.Helper()
	// Wire tracing is off unless a test asks for it: other test packages
	// make host-side veths meanwhile, and their traffic would show here.
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--wire") }) {
		args = append([]string{"--wire=false"}, args...)
	}
	a := &agent{cmd: exec.Command(agentBin, args...), stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan error, 1)}
	a.cmd.Env = append(os.Environ(), env...)
	a.cmd.Stdout, a.cmd.Stderr = a.stdout, a.stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.done <- a.cmd.Wait() }()
	t.Cleanup(func() {
		if a.cmd.ProcessState == nil {
			a.cmd.Process.Kill()
			<-a.done
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(a.stderr.String(), "msg=tracing") {
		select {
		case err := <-a.done:
			t.Fatalf("agent exited: %v\n%s", err, a.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent did not start:\n%s", a.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return a
}

// stop sends SIGTERM and waits for a clean exit.
func (a *agent) stop(t testing.TB) {
	t.Helper()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-a.done:
		if err != nil {
			t.Fatalf("agent exited with %v:\n%s", err, a.stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("agent did not stop within 20 s of SIGTERM:\n%s", a.stderr.String())
	}
}

func cgroupFlag(p *testbed.HTTPPair) string {
	return "--cgroup=" + p.ClientCG.Path() + "," + p.ServerCG.Path()
}

// TestConsoleOutput is the README's main job: no collector configured, so
// each session is printed as a line.
func TestConsoleOutput(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	p := testbed.NewHTTPPair(t)
	p.WriteFile(t, "index.html", []byte("<h1>hello</h1>\n"))
	a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}, cgroupFlag(p))
	p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", p.URL("/index.html"))
	p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", p.URL("/missing"))
	waitFor(t, func() bool { return strings.Count(a.stdout.String(), "\n") >= 4 }, a)
	a.stop(t)

	lines := strings.Split(strings.TrimSpace(a.stdout.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines, want 4:\n%s", len(lines), a.stdout.String())
	}
	want := []struct{ proc, summary, kind string }{
		{"curl[", "GET /index.html 200", "CLIENT"},
		{"nginx[", "GET /index.html 200", "SERVER"},
		{"curl[", "GET /missing 404", "CLIENT"},
		{"nginx[", "GET /missing 404", "SERVER"},
	}
	for _, w := range want {
		found := false
		for _, l := range lines {
			if strings.Contains(l, w.proc) && strings.Contains(l, w.summary) && strings.Contains(l, w.kind) &&
				strings.Contains(l, p.ClientIP.String()+":") && strings.Contains(l, "-> "+p.ServerIP.String()+":8080") {
				found = true
			}
		}
		if !found {
			t.Errorf("no line with %s %s %s:\n%s", w.proc, w.summary, w.kind, a.stdout.String())
		}
	}
	for _, msg := range []string{"socket tracer attached", "msg=stopped"} {
		if !strings.Contains(a.stderr.String(), msg) {
			t.Errorf("log lacks %q:\n%s", msg, a.stderr.String())
		}
	}
}

// TestJSONOutput: --output=json prints one object per span.
func TestJSONOutput(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	p := testbed.NewHTTPPair(t)
	p.WriteFile(t, "index.html", []byte("<h1>hello</h1>\n"))
	a := startAgent(t, nil, cgroupFlag(p), "--output=json")
	p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", p.URL("/index.html?x=1"))
	waitFor(t, func() bool { return strings.Count(a.stdout.String(), "\n") >= 2 }, a)
	a.stop(t)
	sc := bufio.NewScanner(strings.NewReader(a.stdout.String()))
	kinds := map[string]bool{}
	for sc.Scan() {
		var span struct {
			Name       string         `json:"name"`
			Kind       string         `json:"kind"`
			TraceID    string         `json:"trace_id"`
			Attributes map[string]any `json:"attributes"`
			Resource   map[string]any `json:"resource"`
		}
		if err := json.Unmarshal(sc.Bytes(), &span); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		kinds[span.Kind] = true
		if span.Name != "GET" || span.Attributes["url.path"] != "/index.html" || span.Attributes["url.query"] != "x=1" ||
			span.Attributes["http.response.status_code"] != float64(200) || len(span.TraceID) != 32 {
			t.Errorf("span %s", sc.Text())
		}
	}
	if len(kinds) != 2 {
		t.Errorf("kinds %v, want a client and a server span:\n%s", kinds, a.stdout.String())
	}
}

func waitFor(t *testing.T, cond func() bool, a *agent) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out; stdout:\n%s\nstderr:\n%s", a.stdout.String(), a.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestJaeger: the agent exports over OTLP (gRPC and HTTP) to a real
// Jaeger, where the spans are found with their attributes, the server's
// span a child of the client's.
func TestJaeger(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	for _, proto := range []string{"grpc", "http/protobuf"} {
		t.Run(strings.ReplaceAll(proto, "/", "_"), func(t *testing.T) {
			j := testbed.StartJaeger(t)
			p := testbed.NewHTTPPair(t)
			p.WriteFile(t, "data.json", []byte(`{"ok":true}`))
			endpoint := j.OTLPHTTPEndpoint()
			if proto == "grpc" {
				endpoint = "http://" + j.OTLPGRPCEndpoint()
			}
			a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=" + endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL=" + proto,
				"OTEL_BSP_SCHEDULE_DELAY=200"}, cgroupFlag(p))
			p.Client(t, nil, "curl", "-sS", "-o", "/dev/null", "-A", "e2e-agent/1.0", p.URL("/data.json?id=7"))
			// Flushing at SIGTERM must deliver the spans.
			a.stop(t)
			if a.stdout.String() != "" {
				t.Errorf("OTLP mode printed spans:\n%s", a.stdout.String())
			}
			cs := j.WaitForSpans(t, "curl", 1, 20*time.Second)
			ss := j.WaitForSpans(t, "nginx", 1, 20*time.Second)
			if len(cs) != 1 || len(ss) != 1 {
				t.Fatalf("%d curl spans, %d nginx spans", len(cs), len(ss))
			}
			check := func(s testbed.Span, kind string, cg *testbed.Cgroup, exe string) {
				t.Helper()
				want := map[string]string{
					"span.kind":                 kind,
					"http.request.method":       "GET",
					"url.path":                  "/data.json",
					"url.query":                 "id=7",
					"http.response.status_code": "200",
					"user_agent.original":       "e2e-agent/1.0",
					"server.address":            p.ServerIP.String(),
					"network.transport":         "tcp",
					"network.type":              "ipv4",
					"clovisor.point":            "socket",
					"clovisor.cgroup.id":        fmt.Sprint(cg.ID()),
					"clovisor.cgroup.path":      cg.Path(),
					"process.executable.name":   exe,
				}
				for k, v := range want {
					if tag, ok := s.Tag(k); !ok || tag.String() != v {
						t.Errorf("%s span: %s = %v (present %v), want %s", kind, k, tag.Value, ok, v)
					}
				}
				if s.OperationName != "GET" || s.Duration <= 0 {
					t.Errorf("%s span: name %q duration %d", kind, s.OperationName, s.Duration)
				}
			}
			check(cs[0], "client", p.ClientCG, "curl")
			check(ss[0], "server", p.ServerCG, "nginx")
			for _, s := range []testbed.Span{cs[0], ss[0]} {
				if pid, ok := s.Tag("process.pid"); !ok || pid.String() == "0" {
					t.Errorf("%s: process.pid %v", s.OperationName, pid.Value)
				}
				if _, ok := s.Process.Tag("host.name"); !ok {
					t.Errorf("resource without host.name: %+v", s.Process)
				}
			}
			if ss[0].TraceID != cs[0].TraceID || len(ss[0].References) != 1 || ss[0].References[0].SpanID != cs[0].SpanID {
				t.Errorf("server span %s/%s refs %+v is not the child of client span %s/%s", ss[0].TraceID, ss[0].SpanID,
					ss[0].References, cs[0].TraceID, cs[0].SpanID)
			}
		})
	}
}

// TestSIGTERMUnderLoadLeavesNothing: stopped while traffic flows, the
// agent exits cleanly and leaves no program of ours in the kernel.
func TestSIGTERMUnderLoadLeavesNothing(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "bash")
	p := testbed.NewHTTPPair(t)
	p.WriteFile(t, "x", []byte("x"))
	a := startAgent(t, nil, cgroupFlag(p), "--output=json")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// HTTP/1.0 GETs through bash's /dev/tcp: a client that maps no TLS
	// library, so that the processes probed are nginx's two.
	load, start := p.ClientCommand(ctx, "bash", "-c", fmt.Sprintf(
		`while :; do exec 3<>/dev/tcp/%s/%d; printf 'GET /x HTTP/1.0\r\n\r\n' >&3; cat <&3 >/dev/null; exec 3>&-; done`, p.ServerIP, p.Port))
	if err := start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); load.Wait() }()
	waitFor(t, func() bool { return strings.Count(a.stdout.String(), "\n") >= 20 }, a)
	held, err := testbed.BPFObjectsOf(a.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	// The socket tracer's five programs and their five links; TLS
	// tracing's 15 programs (process watch 5, OpenSSL 6, Go crypto/tls 4)
	// and its eleven links (exec, fork, exit, two mmap trace events, two
	// socket I/O fallbacks, and the two uprobe_multi links of each of
	// nginx's master and worker, probed per process in the libssl.so.3
	// they map; no Go program runs here); and the maps.
	if len(held.Progs) != 5+15 || len(held.Links) != 5+11 || len(held.Maps) < 4 {
		t.Errorf("agent holds %+v, want 20 programs, 16 links and the maps", held)
	}
	a.stop(t)
	if left := testbed.StillLoaded(held, 3*time.Second); left.Count() != 0 {
		t.Errorf("left in the kernel after SIGTERM: %+v", left)
	}
	// Every line printed is a whole JSON object: nothing was cut off.
	for _, l := range strings.Split(strings.TrimSpace(a.stdout.String()), "\n") {
		if !json.Valid([]byte(l)) {
			t.Errorf("broken output line %q", l)
		}
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"--output=xml"},
		{"--port=0"},
		{"--port=http"},
		{"--probe-mode=magic"},
		{"--cgroup=/no/such/cgroup-of-clovisor"},
		{"--payload-bytes=100000"},
		{"--tls-probes=everywhere"},
		{"stray"},
	} {
		out, err := exec.Command(agentBin, args...).CombinedOutput()
		if err == nil {
			t.Errorf("%v: exit 0", args)
		}
		if !strings.Contains(string(out), "clovisor:") && !strings.Contains(string(out), "Usage") {
			t.Errorf("%v: no clear message: %s", args, out)
		}
	}
}

// TestWireOutput: the agent traces what crosses pod veths (here of a
// routed node in its own namespace, chosen by the configuration file) and
// prints each wire-level exchange with its interface and L7 facts.
func TestWireOutput(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	n := testbed.NewNode(t, testbed.Routed)
	srv, cli := n.AddPod(t, "srv"), n.AddPod(t, "cli")
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "x.txt"), []byte("wire\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	testbed.StartNginx(t, srv.NS, 8080, root, srv.IP)
	conf := filepath.Join(t.TempDir(), "clovisor.yaml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`wire:
  netns: /run/netns/%s
  podInterfaces: ["@veth"]
  nodeInterfaces: []
  ports:
    - {port: 8080, protocol: http}
`, n.NS.Name)), 0o644); err != nil {
		t.Fatal(err)
	}
	quiet := testbed.NewCgroup(t, "quiet") // socket tracing of an empty cgroup: wire lines only
	a := startAgent(t, nil, "--wire=true", "--config="+conf, "--cgroup="+quiet.Path(), "--output=json")
	cli.NS.Exec(t, "curl", "-sS", "-o", "/dev/null", fmt.Sprintf("http://%s/x.txt", netip.AddrPortFrom(srv.IP, 8080)))
	waitFor(t, func() bool { return strings.Count(a.stdout.String(), "\n") >= 2 }, a)
	if n := tcPrograms(t, n.NS, srv.HostVeth) + tcPrograms(t, n.NS, cli.HostVeth); n != 4 {
		t.Errorf("%d tc programs on the two pod veths while tracing, want 4 (ingress and egress each)", n)
	}
	held, err := testbed.BPFObjectsOf(a.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	// SIGTERM leaves nothing: no program on the veths, no qdisc we made,
	// none of the agent's BPF objects in the kernel.
	a.stop(t)
	for _, dev := range []string{srv.HostVeth, cli.HostVeth} {
		if n := tcPrograms(t, n.NS, dev); n != 0 {
			t.Errorf("%s: %d tc programs left after SIGTERM", dev, n)
		}
		if q := n.NS.Exec(t, "tc", "qdisc", "show", "dev", dev); strings.Contains(q, "clsact") {
			t.Errorf("%s: clsact qdisc left after SIGTERM: %s", dev, q)
		}
	}
	if left := testbed.StillLoaded(held, 3*time.Second); left.Count() != 0 {
		t.Errorf("left in the kernel after SIGTERM: %+v", left)
	}

	ifaces := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSpace(a.stdout.String()), "\n") {
		var span struct {
			Attributes map[string]any `json:"attributes"`
		}
		if err := json.Unmarshal([]byte(l), &span); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		at := span.Attributes
		if at["clovisor.point"] != "pod_veth" || at["http.request.method"] != "GET" || at["url.path"] != "/x.txt" ||
			at["http.response.status_code"] != float64(200) {
			t.Errorf("span %s", l)
		}
		ifaces[fmt.Sprint(at["network.interface.name"])] = true
	}
	if len(ifaces) != 2 || !ifaces[srv.HostVeth] || !ifaces[cli.HostVeth] {
		t.Errorf("interfaces %v, want %s and %s:\n%s", ifaces, srv.HostVeth, cli.HostVeth, a.stdout.String())
	}
}

func TestBadConfigFile(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(conf, []byte("wire:\n  podInterfaces: [\"@veth\"]\n  bogusSetting: 1\n"), 0o644)
	out, err := exec.Command(agentBin, "--config="+conf).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "bogusSetting") || !strings.Contains(string(out), conf) {
		t.Errorf("exit %v, output %s", err, out)
	}
}

// tcPrograms counts the BPF programs attached to a device's tc hooks
// (tcx ingress and egress, and cls_bpf filters under a clsact qdisc).
func tcPrograms(t *testing.T, ns *testbed.Netns, dev string) int {
	t.Helper()
	count := 0
	if err := ns.Run(t, func() error {
		ifc, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: at})
			if err != nil {
				return err
			}
			count += len(res.Programs)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"ingress", "egress"} {
		out := ns.Exec(t, "tc", "filter", "show", "dev", dev, dir)
		count += strings.Count(out, " bpf ")
	}
	return count
}

// TestJaegerWireTrace: with socket tracing of curl's and nginx's cgroups
// and wire tracing of a node's pod veths, one exchange from curl in one
// pod to nginx in another shows in Jaeger as ONE trace of four spans: the
// socket CLIENT span of curl (the root), and as its children the socket
// SERVER span of nginx, the wire span of the client pod's veth (CLIENT,
// its service the client pod's workload: its network namespace's name)
// and the wire span of the server pod's veth (SERVER, the server pod's
// workload), each with the HTTP attributes read where it was seen.
func TestJaegerWireTrace(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	j := testbed.StartJaeger(t)
	n := testbed.NewNode(t, testbed.Routed)
	srv, cli := n.AddPod(t, "srv"), n.AddPod(t, "cli")
	srvCG, cliCG := testbed.NewCgroup(t, "nginx"), testbed.NewCgroup(t, "curl")
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "item.json"), []byte(`{"id":1}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	testbed.StartNginxInCgroup(t, srv.NS, srvCG, 8080, root, srv.IP)
	conf := filepath.Join(t.TempDir(), "clovisor.yaml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`wire:
  netns: /run/netns/%s
  podInterfaces: ["@veth"]
  nodeInterfaces: []
  ports:
    - {port: 8080, protocol: http}
`, n.NS.Name)), 0o644); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=" + j.OTLPHTTPEndpoint(), "OTEL_BSP_SCHEDULE_DELAY=200"},
		"--wire=true", "--config="+conf, "--cgroup="+srvCG.Path()+","+cliCG.Path())
	cmd := cli.NS.Command(context.Background(), "curl", "-sS", "-o", "/dev/null",
		fmt.Sprintf("http://%s/item.json", netip.AddrPortFrom(srv.IP, 8080)))
	if err := cliCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("curl: %v", err)
	}
	// The records of the last exchange come at the close; SIGTERM
	// flushes them.
	time.Sleep(300 * time.Millisecond)
	a.stop(t)

	cs := j.WaitForSpans(t, "curl", 1, 20*time.Second)
	var trace testbed.Trace
	deadline := time.Now().Add(20 * time.Second)
	for {
		traces, err := j.Traces("curl")
		if err != nil {
			t.Fatal(err)
		}
		if len(traces) == 1 && len(traces[0].Spans) >= 4 || time.Now().After(deadline) {
			if len(traces) != 1 {
				t.Fatalf("%d traces with curl's spans, want 1", len(traces))
			}
			trace = traces[0]
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(trace.Spans) != 4 || len(cs) != 1 {
		for _, s := range trace.Spans {
			t.Logf("span %s %s %s refs %+v", s.Process.ServiceName, s.OperationName, s.SpanID, s.References)
		}
		t.Fatalf("the trace holds %d spans, want 4 (stderr:\n%s)", len(trace.Spans), a.stderr.String())
	}
	want := map[string]struct{ kind, point, iface string }{
		"curl":      {"client", "socket", ""},
		"nginx":     {"server", "socket", ""},
		cli.NS.Name: {"client", "pod_veth", cli.HostVeth},
		srv.NS.Name: {"server", "pod_veth", srv.HostVeth},
	}
	root0 := cs[0]
	for _, s := range trace.Spans {
		w, ok := want[s.Process.ServiceName]
		if !ok {
			t.Errorf("span of service %q", s.Process.ServiceName)
			continue
		}
		delete(want, s.Process.ServiceName)
		tags := map[string]string{"span.kind": w.kind, "clovisor.point": w.point, "http.request.method": "GET",
			"url.path": "/item.json", "http.response.status_code": "200", "server.address": srv.IP.String()}
		if w.iface != "" {
			tags["network.interface.name"] = w.iface
		}
		for k, v := range tags {
			if tag, ok := s.Tag(k); !ok || tag.String() != v {
				t.Errorf("%s span: %s = %v, want %s", s.Process.ServiceName, k, tag.Value, v)
			}
		}
		if s.SpanID == root0.SpanID {
			if len(s.References) != 0 {
				t.Errorf("curl's span has references %+v", s.References)
			}
			continue
		}
		if len(s.References) != 1 || s.References[0].RefType != "CHILD_OF" || s.References[0].SpanID != root0.SpanID {
			t.Errorf("%s span %s: references %+v, want CHILD_OF curl's span %s", s.Process.ServiceName, s.SpanID, s.References, root0.SpanID)
		}
		// The response reached curl after it crossed the veths. (The
		// start may precede curl's span by the send call's own time:
		// the socket tracer dates a send when the call returns, after
		// the veths carried its packet.)
		if s.StartTime+s.Duration > root0.StartTime+root0.Duration || s.StartTime < root0.StartTime-1000 {
			t.Errorf("%s span [%d, +%d µs] does not fit curl's [%d, +%d µs]", s.Process.ServiceName, s.StartTime, s.Duration,
				root0.StartTime, root0.Duration)
		}
	}
	if len(want) != 0 {
		t.Errorf("no span of %v", want)
	}
}
