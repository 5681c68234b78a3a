package sockets_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/sockets"
	"github.com/clovisor/clovisor/spans"
)

// progCost is a program's run time and count between two readings.
type progCost struct{ ns, runs uint64 }

func readCosts(b *testing.B, progs map[string]*ebpf.Program) map[string]progCost {
	out := map[string]progCost{}
	for name, p := range progs {
		st, err := p.Stats()
		if err != nil {
			b.Fatal(err)
		}
		out[name] = progCost{uint64(st.Runtime.Nanoseconds()), st.RunCount}
	}
	return out
}

// BenchmarkOpenSSLProbeCost: the cost of the uprobes of one SSL call, in
// two programs, each measuring its own mean wall time per call, once
// without TLS tracing and once with its SSL functions probed (entry and
// return, per process: the program's cgroup is traced):
//
//   - testdata/nested_ssl.c ("bench") calls a function of its own named
//     SSL_write 500,000 times on an SSL object with no socket. The prober
//     probes it as an API function, whose first instruction the kernel
//     single-steps out of line (a second trap): ns/call-*.
//   - probes/testdata/ssl_calls.c calls the machine's libssl (SSL_write
//     and SSL_read alternately, 200,000 calls, each returning WANT_READ on
//     an SSL object with memory BIOs). On x86-64 the prober probes the
//     internal functions those wrap, whose first instruction (a push) the
//     kernel emulates: ns/call-libssl-*.
//
// The difference is what a probed call costs the program: the traps into
// the kernel, and the two BPF programs, whose own run time the kernel's BPF
// statistics give (ns/run-*). Such calls are reported as unbound (no
// socket), so the figure leaves out the event itself (see
// BenchmarkOpenSSLOverheadWrk for that).
//
//	sudo go test -run='^$' -bench=OpenSSLProbeCost -benchtime=1x ./sockets/
func BenchmarkOpenSSLProbeCost(b *testing.B) {
	testbed.RequireRoot(b)
	clang := testbed.RequireTool(b, "clang-14")
	dir := b.TempDir()
	bin, libsslBin := filepath.Join(dir, "nested_ssl"), filepath.Join(dir, "ssl_calls")
	if out, err := exec.Command(clang, "-O1", "-o", bin, "testdata/nested_ssl.c").CombinedOutput(); err != nil {
		b.Fatalf("building: %v\n%s", err, out)
	}
	if out, err := exec.Command(clang, "-O1", "-o", libsslBin, "../probes/testdata/ssl_calls.c", "-lssl", "-lcrypto").CombinedOutput(); err != nil {
		b.Fatalf("building: %v\n%s", err, out)
	}
	const calls, libsslCalls = 500000, 200000
	cg := testbed.NewCgroup(b, "probecost")
	run := func(ready func(pid int)) float64 {
		cmd := exec.Command(bin, "bench", strconv.Itoa(calls))
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		if err := cg.Start(cmd); err != nil {
			b.Fatal(err)
		}
		if ready != nil {
			ready(cmd.Process.Pid)
		}
		io.WriteString(stdin, "go\n")
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if err := cmd.Wait(); err != nil {
			b.Fatal(err)
		}
		ns, err := strconv.ParseFloat(strings.TrimSpace(line), 64)
		if err != nil {
			b.Fatalf("bench printed %q", line)
		}
		return ns
	}
	// ssl_calls runs throughout: unprobed first, then probed.
	lc := exec.Command(libsslBin)
	lcIn, _ := lc.StdinPipe()
	lcOut, _ := lc.StdoutPipe()
	if err := cg.Start(lc); err != nil {
		b.Fatal(err)
	}
	defer func() { lcIn.Close(); lc.Wait() }()
	lcr := bufio.NewReader(lcOut)
	lcCalls := func() float64 {
		fmt.Fprintf(lcIn, "calls %d\n", libsslCalls)
		line, _ := lcr.ReadString('\n')
		ns, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, "done ")), 64)
		if err != nil {
			b.Fatalf("ssl_calls printed %q", line)
		}
		return ns
	}
	if line, _ := lcr.ReadString('\n'); !strings.HasPrefix(line, "ready ") {
		b.Fatalf("ssl_calls printed %q", line)
	}

	tr, err := probes.Open(probes.Options{Mode: sockets.AttachModeUnderTest(b), FilterCgroups: true})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	if err := tr.AddCgroup(cg.ID()); err != nil {
		b.Fatal(err)
	}
	plain := run(nil)
	libsslPlain := lcCalls()
	tt, err := tr.StartTLS(context.Background(), probes.TLSOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tt.Close()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()
	probedIn := func(pid int, path string) bool {
		return slices.ContainsFunc(tt.Active(), func(a probes.TLSAttachment) bool { return a.Path == path && a.PID == pid })
	}
	report := func(c0, c1 map[string]progCost, n uint64, suffix string) {
		for _, name := range []string{"ssl_entry_multi", "ssl_return_multi", "ssl_entry", "ssl_return"} {
			d := progCost{c1[name].ns - c0[name].ns, c1[name].runs - c0[name].runs}
			if d.runs > 0 {
				b.ReportMetric(float64(d.ns)/float64(d.runs), "ns/run-"+name+suffix)
				if d.runs != n {
					b.Errorf("%s ran %d times for %d calls", name, d.runs, n)
				}
			}
		}
	}
	var c0 map[string]progCost
	probed := run(func(pid int) {
		deadline := time.Now().Add(5 * time.Second)
		for !probedIn(pid, bin) {
			if time.Now().After(deadline) {
				b.Fatalf("%s not attached", bin)
			}
			time.Sleep(5 * time.Millisecond)
		}
		c0 = readCosts(b, tt.Programs())
	})
	c1 := readCosts(b, tt.Programs())
	report(c0, c1, calls, "")
	var funcs []string
	for _, a := range tt.Active() {
		if a.PID == lc.Process.Pid && filepath.Base(a.Path) == "libssl.so.3" {
			funcs = a.Functions
		}
	}
	if funcs == nil {
		b.Fatalf("ssl_calls's libssl not probed: %+v", tt.Active())
	}
	c0 = readCosts(b, tt.Programs())
	libsslProbed := lcCalls()
	c1 = readCosts(b, tt.Programs())
	report(c0, c1, libsslCalls, "-libssl")
	b.ReportMetric(plain, "ns/call-unprobed")
	b.ReportMetric(probed, "ns/call-probed")
	b.ReportMetric(probed-plain, "ns/call-probes")
	b.ReportMetric(libsslPlain, "ns/call-libssl-unprobed")
	b.ReportMetric(libsslProbed, "ns/call-libssl-probed")
	b.ReportMetric(libsslProbed-libsslPlain, "ns/call-libssl-probes")
	b.Logf("libssl probed in %s", strings.Join(funcs, ", "))
}

// BenchmarkOpenSSLOverheadWrk: wrk (OpenSSL) against nginx with TLS (one
// worker, a 1 KiB file by default (CLOVISOR_BENCH_FILE_BYTES), 8 keep-alive connections) between two network
// namespaces, untraced and traced side by side in one run: untraced,
// traced, untraced, traced, untraced, traced, untraced (4 s each, after a
// 1 s warm-up), so that drift in the machine's load falls on both sides.
// Traced is the agent's configuration for a node where the server's pod is
// traced and the client is not: the socket tracer on nginx's cgroup only,
// TLS tracing (OpenSSL uprobes in nginx's processes; wrk, in its own
// untraced cgroup, maps the same libssl), and the tracker turning events
// into spans with the HTTP/1.x analyzer, into a sink that counts them. A
// traced run fails unless the spans show at least half of wrk's responses
// as HTTP 200 SERVER spans through openssl.
//
//	sudo go test -run='^$' -bench=OpenSSLOverheadWrk -benchtime=1x ./sockets/
func BenchmarkOpenSSLOverheadWrk(b *testing.B) {
	p := testbed.NewTLSPair(b)
	p.WriteFile(b, "file.txt", []byte(strings.Repeat("k", testbed.WrkFileBytes(b))))
	url := p.URL("/file.txt")
	runWrk := func(d time.Duration) (int64, float64) {
		r := p.Wrk(b, d, url)
		return r.Requests, r.PerSec
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()

	var untraced, traced, rounds []float64
	var bpfNS, tracedReqs, spansSeen uint64
	costs := map[string]progCost{}
	var cpuTraced time.Duration
	var srvCPU, cliCPU [2][]float64 // CPU per request of nginx's and wrk's cgroups: untraced, traced
	for i := 0; i < 7; i++ {
		on := i%2 == 1
		var tr *probes.Tracer
		var tt *probes.TLSTracer
		var stop context.CancelFunc
		var done chan error
		var seen atomic.Int64
		if on {
			if tr, err = probes.Open(probes.Options{Mode: sockets.AttachModeUnderTest(b), FilterCgroups: true}); err != nil {
				b.Fatal(err)
			}
			if err := tr.AddCgroup(p.ServerCG.ID()); err != nil {
				b.Fatal(err)
			}
			if tt, err = tr.StartTLS(context.Background(), probes.TLSOptions{}); err != nil {
				b.Fatal(err)
			}
			tk := sockets.NewTracker(sockets.Config{Analyzers: protocols.NewRegistry(http1.New()), Sink: func(s *spans.Session) {
				if s.Tx.StatusCode == 200 && s.PayloadSource == "openssl" && s.Kind == spans.Server {
					seen.Add(1)
				}
			}})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stop = cancel
			done = make(chan error, 1)
			go func() { done <- sockets.Run(ctx, tr.Events, tk) }()
		}
		runWrk(time.Second) // warm-up
		var c0 map[string]progCost
		cpu0 := procCPU()
		srv0, cli0 := p.ServerCG.CPU(b), p.ClientCG.CPU(b)
		if on {
			c0 = readCosts(b, tt.Programs())
			for name, prog := range tr.Programs() {
				st, _ := prog.Stats()
				c0["sock:"+name] = progCost{uint64(st.Runtime.Nanoseconds()), st.RunCount}
			}
		}
		n, rate := runWrk(4 * time.Second)
		srvUS := float64((p.ServerCG.CPU(b) - srv0).Microseconds()) / float64(n)
		cliUS := float64((p.ClientCG.CPU(b) - cli0).Microseconds()) / float64(n)
		if on {
			srvCPU[1] = append(srvCPU[1], srvUS)
			cliCPU[1] = append(cliCPU[1], cliUS)
		} else {
			srvCPU[0] = append(srvCPU[0], srvUS)
			cliCPU[0] = append(cliCPU[0], cliUS)
		}
		if on {
			if act := tt.Active(); len(act) != 2 || act[0].PID == act[1].PID {
				b.Errorf("TLS probes in %+v, want nginx's master and worker", act)
			}
		}
		if !on {
			untraced = append(untraced, rate)
			continue
		}
		cpuTraced += procCPU() - cpu0
		traced = append(traced, rate)
		tracedReqs += uint64(n)
		c1 := readCosts(b, tt.Programs())
		for name, prog := range tr.Programs() {
			st, _ := prog.Stats()
			c1["sock:"+name] = progCost{uint64(st.Runtime.Nanoseconds()), st.RunCount}
		}
		for name := range c1 {
			d := progCost{c1[name].ns - c0[name].ns, c1[name].runs - c0[name].runs}
			costs[name] = progCost{costs[name].ns + d.ns, costs[name].runs + d.runs}
			bpfNS += d.ns
		}
		time.Sleep(300 * time.Millisecond) // the last spans
		stop()
		if err := <-done; err != nil {
			b.Error(err)
		}
		tt.Close()
		tr.Close()
		// nginx's side of each exchange gives a span (the warm-up's too).
		s := seen.Load()
		if s < n/2 {
			b.Fatalf("traced run: %d openssl SERVER spans with status 200 for %d responses", s, n)
		}
		spansSeen += uint64(s)
	}
	mean := func(x []float64) float64 {
		var s float64
		for _, v := range x {
			s += v
		}
		return s / float64(len(x))
	}
	for i, t := range traced {
		rounds = append(rounds, 100*t/((untraced[i]+untraced[i+1])/2))
	}
	b.ReportMetric(mean(untraced), "req/s-untraced")
	b.ReportMetric(mean(traced), "req/s-traced")
	b.ReportMetric(100*mean(traced)/mean(untraced), "traced-%")
	slices.Sort(rounds)
	b.ReportMetric(rounds[0], "round-min-%")
	b.ReportMetric(rounds[len(rounds)-1], "round-max-%")
	b.ReportMetric(float64(bpfNS)/float64(tracedReqs), "bpf-ns/req")
	b.ReportMetric(100*cpuTraced.Seconds()/(12), "reader-cpu-%")
	b.ReportMetric(1e6*cpuTraced.Seconds()/float64(tracedReqs), "reader-us/req")
	b.ReportMetric(mean(srvCPU[0]), "nginx-us/req-untraced")
	b.ReportMetric(mean(srvCPU[1]), "nginx-us/req-traced")
	b.ReportMetric(mean(cliCPU[0]), "wrk-us/req-untraced")
	b.ReportMetric(mean(cliCPU[1]), "wrk-us/req-traced")
	b.ReportMetric(float64(spansSeen)/float64(tracedReqs), "spans/resp")
	var perProg []string
	for name, c := range costs {
		if c.runs > 0 && strings.HasPrefix(name, "ssl_") {
			b.ReportMetric(float64(c.ns)/float64(c.runs), "ns/run-"+name)
			b.ReportMetric(float64(c.runs)/float64(tracedReqs), "runs/req-"+name)
		}
		if c.runs > 0 {
			perProg = append(perProg, fmt.Sprintf("%s %.2f runs × %.0f ns", name, float64(c.runs)/float64(tracedReqs), float64(c.ns)/float64(c.runs)))
		}
	}
	slices.Sort(perProg)
	b.Logf("BPF per request: %s", strings.Join(perProg, "; "))
	b.Logf("untraced %.0f, traced %.0f req/s; rounds %.1f%%", untraced, traced, rounds)
}

// procCPU is the process's user+system CPU time so far.
func procCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
