package tcsessions

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/ring"
	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
)

// The overhead benchmarks measure what wire tracing costs the traffic
// itself: throughput (iperf3) and request rate (wrk against nginx) between
// two pods of a bridged node, without tracing and with a Tracer attached to
// the pods' host veths as the agent attaches it (default selection, tcx
// where the kernel has it), its Run loop draining the ring buffer through
// the HTTP analyzer into a sink that counts exchanges. Untraced and traced
// runs alternate in one benchmark run, untraced first and last (U T U T U T
// U), so that drift in the machine's load (a shared VM) falls on both sides
// alike; each traced run is compared with the mean of the untraced runs
// around it. Each traced run must have been seen by the tracer (the bytes
// iperf3's receiver read, the HTTP responses wrk counted), so that a failed
// attach cannot pass for zero overhead.
//
// Their length is fixed (overheadRounds runs of overheadIperfSeconds or
// overheadWrkSeconds each), whatever b.N: run them with -benchtime=1x.
//
//	go test -run='^$' -bench=Overhead -benchtime=1x ./tcsessions/

// overheadVariant (CLOVISOR_OVERHEAD_VARIANT) traces less than the agent,
// to tell where the cost comes from: "untracked" attaches the programs but
// tracks no connection (only port 9 in the table), "records" makes the
// records without payload prefixes and analyzers, "floor" attaches no
// tracer at all but a program that only returns TCX_NEXT, through tcx on
// ingress and egress of both pods' veths: the least any tc-based tracer
// costs; "read" is the agent's configuration with a Run loop that reads
// every record and prefix from the ring buffer and drops it (no Assembler,
// no analyzer): the kernel side and the ring without the user-space
// analysis. The checks that the tracer saw the traffic apply to the
// agent's configuration (and, for "read", that records arrived).
var overheadVariant = os.Getenv("CLOVISOR_OVERHEAD_VARIANT")

// overheadStats (CLOVISOR_OVERHEAD_STATS=0 turns it off) enables the
// kernel's BPF run-time statistics for the benchmark, which the bpf-ns
// figures need; they cost every program run two clock reads, so the
// throughput ratios are best taken with them off.
var overheadStats = os.Getenv("CLOVISOR_OVERHEAD_STATS") != "0"

// overheadWrkConnections is wrk's -c, the keep-alive connections shared by
// its threads: 8, or CLOVISOR_OVERHEAD_WRK_CONNECTIONS.
var overheadWrkConnections = envPositive("CLOVISOR_OVERHEAD_WRK_CONNECTIONS", 8)

// overheadTraced (CLOVISOR_OVERHEAD_TRACED) says whose veths a traced run
// traces: "both" (or unset) both pods' veths, as the agent's default
// selection does; "server" the server pod's veth only, so that the traffic
// crosses one traced veth instead of two (the tracer's pod interfaces are
// that veth alone; the node NIC is selected as by default).
var overheadTraced = os.Getenv("CLOVISOR_OVERHEAD_TRACED")

// tracedPods is the pods whose veths a traced run traces (overheadTraced).
func tracedPods(b testing.TB, cli, srv *testbed.Pod) []*testbed.Pod {
	switch overheadTraced {
	case "", "both":
		return []*testbed.Pod{cli, srv}
	case "server":
		return []*testbed.Pod{srv}
	}
	b.Fatalf("CLOVISOR_OVERHEAD_TRACED=%s: want both or server", overheadTraced)
	return nil
}

// overheadIperfAffinity (CLOVISOR_OVERHEAD_IPERF_AFFINITY=n,m) pins
// iperf3's client to CPU n and its server's test to CPU m (iperf3 -A n,m),
// so that every run has the same placement; unset, the scheduler places
// them (the default, as in a cluster).
var overheadIperfAffinity = os.Getenv("CLOVISOR_OVERHEAD_IPERF_AFFINITY")

// overheadRounds is the number of traced runs (untraced runs: one more):
// 3, or CLOVISOR_OVERHEAD_ROUNDS.
var overheadRounds = envPositive("CLOVISOR_OVERHEAD_ROUNDS", 3)

// isCPU says whether s is a CPU number this machine has.
func isCPU(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n < runtime.NumCPU()
}

// envPositive is the positive number in the environment variable name, or
// def when it is unset or not one.
func envPositive(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

const (
	// overheadIperfSeconds is the length of one iperf3 run.
	overheadIperfSeconds = 4
	// overheadWrkSeconds is the length of one wrk run.
	overheadWrkSeconds = 5
	// overheadWrkThreads is wrk's -t.
	overheadWrkThreads = 2
	// overheadFileBytes is the size of the file wrk fetches.
	overheadFileBytes = 1024
)

// overheadIperf is the part of iperf3's JSON report the benchmark reads.
type overheadIperf struct {
	End struct {
		SumSent struct {
			Bytes uint64 `json:"bytes"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         uint64  `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// ifaceCounts is what the sink counted on one interface.
type ifaceCounts struct {
	// exchanges counts every record; http counts those whose HTTP
	// transaction the analyzer read with status 200.
	exchanges, http uint64
	// maxRequestBytes is the largest Request.NewBytes of one exchange
	// (an iperf3 data connection's bytes).
	maxRequestBytes uint64
}

// wireTrace is a Tracer working in a node's namespace, its Run loop
// draining the ring buffer into counts per interface.
type wireTrace struct {
	tr *Tracer
	// floor: the do-nothing programs' links (variant floor; tr is nil).
	floor  []link.Link
	progs  map[string]*ebpf.Program
	stop   context.CancelFunc
	done   chan error
	counts map[string]*ifaceCounts // Run's until done
	// cpu0 and t0: the process's CPU time and the time when the
	// traffic began.
	cpu0 time.Duration
	t0   time.Time
	// readerCPU is the process's CPU time per wall time while the
	// traffic ran, in percent of one core: the tracer's user space
	// (Run, the Assembler, the analyzer), since nothing else in the
	// process works then; readerTime is that CPU time.
	readerCPU  float64
	readerTime time.Duration
	// bpfTime and bpfRuns are the programs' run time and runs (the
	// kernel's BPF statistics, enabled by the benchmark).
	bpfTime time.Duration
	bpfRuns uint64
}

// enableBPFStats turns the kernel's BPF run-time statistics on for the
// benchmark (for every program: the untraced runs pay their small cost
// too).
func enableBPFStats(b *testing.B) {
	if !overheadStats {
		return
	}
	st, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	b.Cleanup(func() { st.Close() })
}

// processCPU is the user and system time of this process (its threads, not
// its children).
func processCPU(b testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// startWireTrace opens a tracer on the node with the agent's default
// interface selection (every host-side veth, the default-route NIC) and
// ports, checks that the pods' veths are attached, and starts Run. With
// overheadTraced "server", the pod interfaces are the given pods' veths
// only, and no other veth may be attached.
func startWireTrace(b testing.TB, node *testbed.Node, pods ...*testbed.Pod) *wireTrace {
	b.Helper()
	if overheadVariant == "floor" {
		return startFloor(b, node, pods...)
	}
	log, _ := testLogger(b)
	cfg := Config{Netns: node.NS.Path(), StateDir: b.TempDir(), Logger: log,
		Ports: []Port{{Port: 5201}, {Port: 8080, Protocol: "http"}}}
	if overheadTraced == "server" {
		for _, p := range pods {
			cfg.PodInterfaces = append(cfg.PodInterfaces, p.HostVeth)
		}
	}
	analyzers := protocols.NewRegistry(http1.New())
	switch overheadVariant {
	case "":
	case "untracked":
		cfg.Ports = []Port{{Port: 9}}
	case "records":
		cfg.PayloadBytes, analyzers = -1, nil
	case "read":
	default:
		b.Fatalf("CLOVISOR_OVERHEAD_VARIANT=%s: want untracked, records, read or floor", overheadVariant)
	}
	tr, err := Open(cfg)
	if err != nil {
		b.Fatal(err)
	}
	attached := map[string]bool{}
	for _, i := range tr.Interfaces() {
		attached[i.Name] = i.Role == RolePod
	}
	for _, p := range pods {
		if !attached[p.HostVeth] {
			tr.Close()
			b.Fatalf("%s is not attached as a pod veth: %+v", p.HostVeth, tr.Interfaces())
		}
		delete(attached, p.HostVeth)
	}
	for name, pod := range attached {
		if pod && len(cfg.PodInterfaces) > 0 {
			tr.Close()
			b.Fatalf("%s is attached as a pod veth, but only %v were selected", name, cfg.PodInterfaces)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &wireTrace{tr: tr, progs: tr.Programs(), stop: cancel, done: make(chan error, 1), counts: map[string]*ifaceCounts{}}
	if overheadVariant == "read" {
		// Count what arrives per interface as records, nothing more.
		go func() {
			var e ExchangeEvent
			w.done <- ring.Read(ctx, tr.objs.TcEvents, func(raw []byte) {
				if len(raw) == 0 || raw[0] != uint8(tcTcEventKindTC_EVENT_EXCHANGE) || decodeExchangeInto(raw, &e) != nil {
					return
				}
				name, _, _ := tr.interfaceName(int(e.Tuple.Ifindex))
				w.iface(name).exchanges++
			}, nil)
		}()
		w.cpu0, w.t0 = processCPU(b), time.Now()
		return w
	}
	go func() {
		w.done <- tr.Run(ctx, analyzers, func(x *Exchange) {
			c := w.iface(x.Interface)
			c.exchanges++
			if x.Tx != nil && x.Tx.StatusCode == 200 {
				c.http++
			}
			c.maxRequestBytes = max(c.maxRequestBytes, x.Request.NewBytes)
		})
	}()
	w.cpu0, w.t0 = processCPU(b), time.Now()
	return w
}

// iface is the counts of an interface, made at its first record (Run's
// goroutine only).
func (w *wireTrace) iface(name string) *ifaceCounts {
	c := w.counts[name]
	if c == nil {
		c = &ifaceCounts{}
		w.counts[name] = c
	}
	return c
}

// startFloor attaches a program that only returns TCX_NEXT to ingress and
// egress of each pod's host veth (variant floor).
func startFloor(b testing.TB, node *testbed.Node, pods ...*testbed.Pod) *wireTrace {
	b.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "floor_next", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}, // TCX_NEXT
	})
	if err != nil {
		b.Fatalf("loading the floor program: %v", err)
	}
	w := &wireTrace{progs: map[string]*ebpf.Program{"floor_next": prog}, counts: map[string]*ifaceCounts{}}
	for _, p := range pods {
		err := node.NS.Run(b, func() error {
			ifc, err := net.InterfaceByName(p.HostVeth)
			if err != nil {
				return err
			}
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				l, err := link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: at})
				if err != nil {
					return err
				}
				w.floor = append(w.floor, l)
			}
			return nil
		})
		if err != nil {
			b.Fatalf("attaching the floor program to %s: %v", p.HostVeth, err)
		}
	}
	w.cpu0, w.t0 = processCPU(b), time.Now()
	return w
}

// close lets Run deliver what the kernel wrote, stops it, reads the
// kernel's counters and closes the tracer (detaching every program).
func (w *wireTrace) close(b testing.TB) (map[string]*ifaceCounts, Stats) {
	b.Helper()
	w.readerTime = processCPU(b) - w.cpu0
	w.readerCPU = 100 * float64(w.readerTime) / float64(time.Since(w.t0))
	for _, p := range w.progs {
		if st, err := p.Stats(); err == nil {
			w.bpfTime += st.Runtime
			w.bpfRuns += st.RunCount
		}
	}
	if w.tr == nil {
		for _, l := range w.floor {
			if err := l.Close(); err != nil {
				b.Errorf("detaching the floor program: %v", err)
			}
		}
		for _, p := range w.progs {
			p.Close()
		}
		return w.counts, Stats{}
	}
	time.Sleep(3 * PollInterval)
	w.stop()
	if err := <-w.done; err != nil {
		b.Errorf("Run: %v", err)
	}
	st, err := w.tr.Stats()
	if err != nil {
		b.Errorf("Stats: %v", err)
	}
	if err := w.tr.Close(); err != nil {
		b.Errorf("Close: %v", err)
	}
	return w.counts, st
}

// alternate runs measure untraced, then traced and untraced again,
// overheadRounds times (U T U T ... U), and returns the untraced and
// traced figures in order. measure opens and closes the tracer itself when
// traced is set.
func alternate(b *testing.B, measure func(traced bool) float64) (untraced, traced []float64) {
	b.Helper()
	untraced = append(untraced, measure(false))
	for range overheadRounds {
		traced = append(traced, measure(true))
		untraced = append(untraced, measure(false))
	}
	return untraced, traced
}

func mean(xs []float64) float64 {
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// reportOverhead reports the mean untraced and traced figures, their ratio
// in percent, and the rounds' ratios (a traced run against the mean of the
// two untraced runs around it): the worst, the median, their mean with its
// standard error, and the one-sided 95% lower bound of that mean (see
// roundStats), which says whether a run was long enough to show a target.
func reportOverhead(b *testing.B, unit string, untraced, traced []float64) {
	b.Helper()
	u, t := mean(untraced), mean(traced)
	ratios := roundRatios(untraced, traced)
	var rounds []string
	for _, r := range ratios {
		rounds = append(rounds, fmt.Sprintf("%.1f%%", r))
	}
	st := roundStats(ratios)
	b.Logf("untraced %s: %s", unit, figures(untraced))
	b.Logf("traced   %s: %s", unit, figures(traced))
	b.Logf("traced/untraced per round: %s; overall %.1f%%", strings.Join(rounds, " "), 100*t/u)
	b.Logf("rounds: %d, median %.1f%%, mean %.1f%%, SD %.1f, lag-1 correlation %.2f, SE %.2f, 95%% lower bound %.1f%%",
		len(ratios), st.median, st.mean, st.sd, st.lag1, st.se, st.lower95)
	b.ReportMetric(u, "untraced-"+unit)
	b.ReportMetric(t, "traced-"+unit)
	b.ReportMetric(100*t/u, "traced/untraced-%")
	b.ReportMetric(slices.Min(ratios), "worst-round-%")
	b.ReportMetric(st.median, "median-round-%")
	if len(ratios) > 2 {
		b.ReportMetric(st.se, "round-se-%")
		b.ReportMetric(st.lower95, "lower95-%")
	}
}

// roundRatios is each traced run's figure in percent of the mean of the
// untraced runs before and after it (untraced has one more run).
func roundRatios(untraced, traced []float64) []float64 {
	ratios := make([]float64, len(traced))
	for i, x := range traced {
		ratios[i] = 100 * x / ((untraced[i] + untraced[i+1]) / 2)
	}
	return ratios
}

// ratioStats summarises the rounds' ratios.
type ratioStats struct {
	median, mean, sd float64
	// lag1 is the correlation of neighbouring rounds (clamped at 0): two
	// neighbours share an untraced run, so they are not independent.
	lag1 float64
	// se is the standard error of the mean, widened for lag1:
	// sd/√n · √(1 + 2·lag1), the variance of the mean of a series whose
	// neighbours alone are correlated.
	se float64
	// lower95 is mean − 1.645·se, the one-sided 95% lower bound of the
	// mean (normal approximation: meant for tens of rounds or more).
	lower95 float64
}

func roundStats(xs []float64) ratioStats {
	var st ratioStats
	n := len(xs)
	if n == 0 {
		return st
	}
	st.median = testbed.Median(xs)
	st.mean = mean(xs)
	if n < 2 {
		st.lower95 = st.mean
		return st
	}
	var ss, cov float64
	for i, x := range xs {
		ss += (x - st.mean) * (x - st.mean)
		if i > 0 {
			cov += (x - st.mean) * (xs[i-1] - st.mean)
		}
	}
	st.sd = math.Sqrt(ss / float64(n-1))
	if ss > 0 {
		st.lag1 = max(cov/ss, 0)
	}
	st.se = st.sd / math.Sqrt(float64(n)) * math.Sqrt(1+2*st.lag1)
	st.lower95 = st.mean - 1.645*st.se
	return st
}

// runLog writes a line about one run to standard error as the run ends:
// the testing package keeps only the first 10 lines a benchmark logs,
// which a long run's summary (reportOverhead) needs for itself.
func runLog(b *testing.B, format string, args ...any) {
	b.Helper()
	fmt.Fprintf(os.Stderr, "%s: %s\n", b.Name(), fmt.Sprintf(format, args...))
}

func figures(xs []float64) string {
	var s []string
	for _, x := range xs {
		s = append(s, strconv.FormatFloat(x, 'f', 2, 64))
	}
	return strings.Join(s, " ")
}

// BenchmarkOverheadIperf3: iperf3 bulk transfers (one TCP stream, client
// pod to server pod, overheadIperfSeconds each) with and without tracing,
// alternating; the figure is the receiver's rate
// (end.sum_received.bits_per_second). Each traced transfer's data
// connection must be in the records of each traced veth (both, or the
// server's: overheadTraced) with at least the bytes the receiver read.
func BenchmarkOverheadIperf3(b *testing.B) {
	testbed.RequireRoot(b)
	testbed.RequireTool(b, "iperf3")
	node := testbed.NewNode(b, testbed.Bridged)
	cli, srv := node.AddPod(b, "cli"), node.AddPod(b, "srv")
	pods := tracedPods(b, cli, srv)
	testbed.StartIperf3(b, srv.NS, srv.IP, 5201)
	args := []string{"-c", srv.IP.String(), "-p", "5201", "-J"}
	if a := overheadIperfAffinity; a != "" {
		if n, m, ok := strings.Cut(a, ","); !ok || !isCPU(n) || !isCPU(m) {
			b.Fatalf("CLOVISOR_OVERHEAD_IPERF_AFFINITY=%s: want two CPU numbers, client,server", a)
		}
		args = append(args, "-A", a)
	}
	run := func(seconds int) overheadIperf {
		out := cli.NS.Exec(b, "iperf3", slices.Concat(args, []string{"-t", strconv.Itoa(seconds)})...)
		var r overheadIperf
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			b.Fatalf("iperf3 JSON: %v\n%s", err, out)
		}
		if r.Error != "" || r.End.SumReceived.Bytes == 0 {
			b.Fatalf("iperf3: %q, received %d bytes", r.Error, r.End.SumReceived.Bytes)
		}
		return r
	}
	run(1) // warm-up, not counted
	enableBPFStats(b)
	var cpu, bpfPerMB []float64
	b.ResetTimer()
	untraced, traced := alternate(b, func(tracing bool) float64 {
		if !tracing {
			return run(overheadIperfSeconds).End.SumReceived.BitsPerSecond / 1e9
		}
		w := startWireTrace(b, node, pods...)
		r := run(overheadIperfSeconds)
		counts, st := w.close(b)
		for _, p := range pods {
			veth := p.HostVeth
			c := counts[veth]
			if overheadVariant == "untracked" || overheadVariant == "floor" {
				break
			}
			if c == nil || c.maxRequestBytes < r.End.SumReceived.Bytes {
				b.Fatalf("traced run not seen on %s: records %+v; iperf3 received %d bytes", veth, c, r.End.SumReceived.Bytes)
			}
		}
		cpu = append(cpu, w.readerCPU)
		perMB := float64(w.bpfTime.Nanoseconds()) / (float64(r.End.SumReceived.Bytes) / 1e6)
		bpfPerMB = append(bpfPerMB, perMB)
		var dataBytes uint64
		if c := counts[srv.HostVeth]; c != nil {
			dataBytes = c.maxRequestBytes
		}
		runLog(b, "traced: %.2f Gbit/s; data connection %d bytes on %s (iperf3 received %d); reader CPU %.1f%%; BPF %v in %d runs (%.0f ns/run, %.0f ns/MB); kernel %+v",
			r.End.SumReceived.BitsPerSecond/1e9, dataBytes, srv.HostVeth,
			r.End.SumReceived.Bytes, w.readerCPU, w.bpfTime, w.bpfRuns, float64(w.bpfTime.Nanoseconds())/float64(max(w.bpfRuns, 1)), perMB, st)
		return r.End.SumReceived.BitsPerSecond / 1e9
	})
	b.StopTimer()
	reportOverhead(b, "Gbit/s", untraced, traced)
	b.ReportMetric(mean(cpu), "reader-cpu-%")
	b.ReportMetric(mean(bpfPerMB), "bpf-ns/MB")
}

// BenchmarkOverheadWrk: wrk (overheadWrkThreads threads,
// overheadWrkConnections keep-alive connections, overheadWrkSeconds) from
// the client pod against nginx in the server pod serving a 1 KiB file, with
// and without tracing, alternating; the figure is wrk's Requests/sec. In
// each traced run the server veth's records must hold an HTTP 200
// transaction, read by the analyzer, for at least 10% of the responses wrk
// counted (a tracer that is not attached, or not read, sees none; the
// records the kernel drops when the reader falls behind are missing). It
// reports the worst run's share as seen-%, and the largest share of
// records the kernel dropped because the ring buffer was full
// (Stats.ExchangesLost over all records) as lost-%: at saturation on a
// small machine the reader gets too little CPU to keep up.
func BenchmarkOverheadWrk(b *testing.B) {
	testbed.RequireRoot(b)
	testbed.RequireTool(b, "wrk")
	testbed.RequireTool(b, "nginx")
	node := testbed.NewNode(b, testbed.Bridged)
	cli, srv := node.AddPod(b, "cli"), node.AddPod(b, "srv")
	pods := tracedPods(b, cli, srv)
	root := b.TempDir()
	body := strings.Repeat("clovisor overhead benchmark.....\n", overheadFileBytes/33+1)[:overheadFileBytes-1] + "\n"
	if err := os.WriteFile(filepath.Join(root, "small.html"), []byte(body), 0o644); err != nil {
		b.Fatal(err)
	}
	testbed.StartNginx(b, srv.NS, 8080, root, srv.IP)
	url := "http://" + netip.AddrPortFrom(srv.IP, 8080).String() + "/small.html"
	run := func(seconds int) testbed.WrkResult {
		out := cli.NS.Exec(b, "wrk", "-t", strconv.Itoa(overheadWrkThreads), "-c", strconv.Itoa(overheadWrkConnections),
			"-d", strconv.Itoa(seconds)+"s", url)
		r, err := testbed.ParseWrk(out)
		if err != nil {
			b.Fatalf("wrk: %v\n%s", err, out)
		}
		if strings.Contains(r.Errors, "Non-2xx") || r.Requests == 0 {
			b.Fatalf("wrk: %d requests, %s\n%s", r.Requests, r.Errors, out)
		}
		if r.Errors != "" {
			runLog(b, "wrk: %s", r.Errors)
		}
		return r
	}
	run(1) // warm-up, not counted
	enableBPFStats(b)
	var seen, lost, cpu, bpfPerReq, readerPer10k []float64
	b.ResetTimer()
	untraced, traced := alternate(b, func(tracing bool) float64 {
		if !tracing {
			return run(overheadWrkSeconds).PerSec
		}
		w := startWireTrace(b, node, pods...)
		r := run(overheadWrkSeconds)
		counts, st := w.close(b)
		c := counts[srv.HostVeth]
		if c == nil && overheadVariant != "untracked" && overheadVariant != "floor" {
			b.Fatalf("traced run not seen on %s: no records; kernel %+v", srv.HostVeth, st)
		}
		if c == nil {
			c = &ifaceCounts{}
		}
		pct := 100 * float64(c.http) / float64(r.Requests)
		seen = append(seen, pct)
		var delivered uint64
		for _, c := range counts {
			delivered += c.exchanges
		}
		lostPct := 100 * float64(st.ExchangesLost) / float64(delivered+st.ExchangesLost)
		lost = append(lost, lostPct)
		cpu = append(cpu, w.readerCPU)
		perReq := float64(w.bpfTime.Nanoseconds()) / float64(r.Requests)
		bpfPerReq = append(bpfPerReq, perReq)
		per10k := w.readerTime.Seconds() / float64(r.Requests) * 1e4
		readerPer10k = append(readerPer10k, per10k)
		runLog(b, "traced: %.0f requests/s; %s: %d records, %d HTTP 200 (%.1f%% of wrk's %d); %s: %+v; reader CPU %.1f%% (%.3f s per 10k requests); BPF %v in %d runs (%.0f ns/run, %.0f ns/request); kernel %+v (%.1f%% of records lost)",
			r.PerSec, srv.HostVeth, c.exchanges, c.http, pct, r.Requests, cli.HostVeth, counts[cli.HostVeth], w.readerCPU, per10k,
			w.bpfTime, w.bpfRuns, float64(w.bpfTime.Nanoseconds())/float64(max(w.bpfRuns, 1)), perReq, st, lostPct)
		if pct < 10 && overheadVariant == "" {
			b.Fatalf("traced run: the tracer read %d HTTP 200 exchanges on %s for wrk's %d requests", c.http, srv.HostVeth, r.Requests)
		}
		return r.PerSec
	})
	b.StopTimer()
	reportOverhead(b, "req/s", untraced, traced)
	b.ReportMetric(slices.Min(seen), "seen-%")
	b.ReportMetric(slices.Max(lost), "lost-%")
	b.ReportMetric(mean(cpu), "reader-cpu-%")
	b.ReportMetric(mean(bpfPerReq), "bpf-ns/request")
	b.ReportMetric(mean(readerPer10k), "reader-cpu-s/10k-requests")
}

func TestRoundStats(t *testing.T) {
	if got := roundRatios([]float64{10, 20, 10}, []float64{15, 12}); !slices.Equal(got, []float64{100, 80}) {
		t.Errorf("roundRatios = %v, want [100 80]", got)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	for _, c := range []struct {
		xs   []float64
		want ratioStats
	}{
		// Independent-looking rounds: no widening.
		{[]float64{90, 100, 110, 100}, ratioStats{median: 100, mean: 100, sd: math.Sqrt(200.0 / 3), se: math.Sqrt(200.0/3) / 2,
			lower95: 100 - 1.645*math.Sqrt(200.0/3)/2}},
		// Neighbours alike (lag-1 correlation 100/400): se² = (400/3)/4 · 1.5 = 50.
		{[]float64{90, 90, 110, 110}, ratioStats{median: 100, mean: 100, sd: math.Sqrt(400.0 / 3), lag1: 0.25, se: math.Sqrt(50),
			lower95: 100 - 1.645*math.Sqrt(50)}},
		// Neighbours opposite: the correlation is clamped at 0, never narrows.
		{[]float64{90, 110, 90, 110}, ratioStats{median: 100, mean: 100, sd: math.Sqrt(400.0 / 3), se: math.Sqrt(400.0/3) / 2,
			lower95: 100 - 1.645*math.Sqrt(400.0/3)/2}},
		// Odd count: the middle one.
		{[]float64{97, 95, 120}, ratioStats{median: 97, mean: 104, sd: math.Sqrt(((104.0-97)*(104-97) + 81 + 256) / 2),
			se:      math.Sqrt(((104.0-97)*(104-97)+81+256)/2) / math.Sqrt(3),
			lower95: 104 - 1.645*math.Sqrt(((104.0-97)*(104-97)+81+256)/2)/math.Sqrt(3)}},
		{[]float64{98}, ratioStats{median: 98, mean: 98, lower95: 98}},
	} {
		got := roundStats(c.xs)
		if !near(got.median, c.want.median) || !near(got.mean, c.want.mean) || !near(got.sd, c.want.sd) ||
			!near(got.lag1, c.want.lag1) || !near(got.se, c.want.se) || !near(got.lower95, c.want.lower95) {
			t.Errorf("roundStats(%v) = %+v, want %+v", c.xs, got, c.want)
		}
	}
}
