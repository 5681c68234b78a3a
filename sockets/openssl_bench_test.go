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

// BenchmarkOpenSSLProbeCost: the cost of the uprobes of one SSL call. A
// program (testdata/nested_ssl.c, "bench") calls SSL_write 500,000 times
// on an SSL object with no socket and measures its own mean wall time per
// call, once without TLS tracing and once with its SSL functions probed
// (entry and return). The difference is what a probed call costs the
// program: two traps into the kernel, and the two BPF programs, whose own
// run time the kernel's BPF statistics give (ns/run-*). Such calls are
// reported as unbound (no socket), so the figure leaves out the event
// itself (see BenchmarkOpenSSLOverheadWrk for that).
//
//	sudo go test -run='^$' -bench=OpenSSLProbeCost -benchtime=1x ./sockets/
func BenchmarkOpenSSLProbeCost(b *testing.B) {
	testbed.RequireRoot(b)
	clang := testbed.RequireTool(b, "clang-14")
	bin := filepath.Join(b.TempDir(), "nested_ssl")
	if out, err := exec.Command(clang, "-O1", "-o", bin, "testdata/nested_ssl.c").CombinedOutput(); err != nil {
		b.Fatalf("building: %v\n%s", err, out)
	}
	const calls = 500000
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
	tr, err := probes.Open(probes.Options{Mode: sockets.AttachModeUnderTest(b), FilterCgroups: true})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	if err := tr.AddCgroup(cg.ID()); err != nil {
		b.Fatal(err)
	}
	plain := run(nil)
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
	var c0 map[string]progCost
	probed := run(func(pid int) {
		deadline := time.Now().Add(5 * time.Second)
		for !slices.ContainsFunc(tt.Attached(), func(a probes.TLSAttachment) bool { return a.Path == bin }) {
			if time.Now().After(deadline) {
				b.Fatalf("%s not attached", bin)
			}
			time.Sleep(5 * time.Millisecond)
		}
		c0 = readCosts(b, tt.Programs())
	})
	c1 := readCosts(b, tt.Programs())
	b.ReportMetric(plain, "ns/call-unprobed")
	b.ReportMetric(probed, "ns/call-probed")
	b.ReportMetric(probed-plain, "ns/call-probes")
	for _, name := range []string{"ssl_entry_multi", "ssl_return_multi", "ssl_entry", "ssl_return"} {
		d := progCost{c1[name].ns - c0[name].ns, c1[name].runs - c0[name].runs}
		if d.runs > 0 {
			b.ReportMetric(float64(d.ns)/float64(d.runs), "ns/run-"+name)
			if d.runs != calls {
				b.Errorf("%s ran %d times for %d calls", name, d.runs, calls)
			}
		}
	}
}

// BenchmarkOpenSSLOverheadWrk: wrk (OpenSSL) against nginx with TLS (one
// worker, a 1 KiB file, 8 keep-alive connections) between two network
// namespaces, untraced and traced side by side in one run: untraced,
// traced, untraced, traced, untraced, traced, untraced (4 s each, after a
// 1 s warm-up), so that drift in the machine's load falls on both sides.
// Traced is the agent's configuration: the socket tracer on both cgroups,
// TLS tracing (OpenSSL uprobes on the libssl that wrk and nginx share),
// and the tracker turning events into spans with the HTTP/1.x analyzer,
// into a sink that counts them. A traced run fails unless the spans show
// at least 10% of wrk's responses as HTTP 200 through openssl.
//
//	sudo go test -run='^$' -bench=OpenSSLOverheadWrk -benchtime=1x ./sockets/
func BenchmarkOpenSSLOverheadWrk(b *testing.B) {
	p := testbed.NewTLSPair(b)
	wrk := testbed.RequireTool(b, "wrk")
	p.WriteFile(b, "1k.txt", []byte(strings.Repeat("k", 1024)))
	url := p.URL("/1k.txt")
	runWrk := func(d time.Duration) (int64, float64) {
		cmd, start := p.ClientCommand(context.Background(), wrk, "-t", "2", "-c", "8", "-d", fmt.Sprintf("%ds", int(d.Seconds())), url)
		var out strings.Builder
		cmd.Stdout = &out
		if err := start(); err != nil {
			b.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			b.Fatalf("wrk: %v\n%s", err, out.String())
		}
		var n int64
		var rate float64
		for _, l := range strings.Split(out.String(), "\n") {
			l = strings.TrimSpace(l)
			if strings.Contains(l, " requests in ") {
				n, _ = strconv.ParseInt(strings.Fields(l)[0], 10, 64)
			}
			if r, ok := strings.CutPrefix(l, "Requests/sec:"); ok {
				rate, _ = strconv.ParseFloat(strings.TrimSpace(r), 64)
			}
			if strings.HasPrefix(l, "Non-2xx") || strings.HasPrefix(l, "Socket errors") {
				b.Fatalf("wrk: %s", l)
			}
		}
		if n == 0 || rate == 0 {
			b.Fatalf("wrk printed:\n%s", out.String())
		}
		return n, rate
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()

	var untraced, traced, rounds []float64
	var bpfNS, tracedReqs uint64
	costs := map[string]progCost{}
	var cpuTraced time.Duration
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
			for _, id := range []uint64{p.ClientCG.ID(), p.ServerCG.ID()} {
				if err := tr.AddCgroup(id); err != nil {
					b.Fatal(err)
				}
			}
			if tt, err = tr.StartTLS(context.Background(), probes.TLSOptions{}); err != nil {
				b.Fatal(err)
			}
			tk := sockets.NewTracker(sockets.Config{Analyzers: protocols.NewRegistry(http1.New()), Sink: func(s *spans.Session) {
				if s.Tx.StatusCode == 200 && s.PayloadSource == "openssl" {
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
		if on {
			c0 = readCosts(b, tt.Programs())
			for name, prog := range tr.Programs() {
				st, _ := prog.Stats()
				c0["sock:"+name] = progCost{uint64(st.Runtime.Nanoseconds()), st.RunCount}
			}
		}
		n, rate := runWrk(4 * time.Second)
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
		// Both ends of each exchange give a span (the warm-up's too).
		if s := seen.Load(); s < n/5 {
			b.Fatalf("traced run: %d openssl spans with status 200 for %d responses", s, n)
		}
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
	for name, c := range costs {
		if c.runs > 0 && strings.HasPrefix(name, "ssl_") {
			b.ReportMetric(float64(c.ns)/float64(c.runs), "ns/run-"+name)
			b.ReportMetric(float64(c.runs)/float64(tracedReqs), "runs/req-"+name)
		}
	}
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
