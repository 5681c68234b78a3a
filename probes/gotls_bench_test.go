package probes

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/ring"
	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes/internal/gotlsdemo"
)

// BenchmarkGoTLSUprobeCost measures what the crypto/tls uprobes cost a
// traced Go program: keep-alive HTTPS GETs of /hello (a 1231-byte body)
// from the Go client to the Go server (two pods), the client timing them.
// The socket tracer runs throughout; the uprobes are attached to the
// binary (both ends) in every other round of b.N/rounds requests, so that
// the machine's load, which drifts on a shared VM, weighs on both alike.
// Two cases:
//
//	pods-traced    the pods' cgroups are traced: the uprobes send events
//	pods-untraced  another cgroup is traced: the uprobes fire and return
//	               at the cgroup filter
//
// Reported (medians over the rounds): the client's mean time per request
// without and with the uprobes ("client-ns/req", "+gotls-client-ns/req"),
// the same for the CPU time of client and server together ("cpu-ns/req":
// their threads' run time, which includes the uprobes' traps), the
// median of the rounds' differences per uprobe hit ("ns/hit", "cpu-ns/hit"),
// and from the BPF statistics the hits per request and the BPF run time
// per program run.
func BenchmarkGoTLSUprobeCost(b *testing.B) {
	bin := gotlsdemo.Build(b, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	const rounds = 6
	for _, podsTraced := range []bool{true, false} {
		b.Run(map[bool]string{true: "pods-traced", false: "pods-untraced"}[podsTraced], func(b *testing.B) {
			p := gotlsdemo.NewPair(b)
			srv := p.StartServer(b, bin)
			stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
			if err != nil {
				b.Fatalf("enabling BPF statistics: %v", err)
			}
			defer stats.Close()
			tr, err := Open(Options{Mode: testMode(), FilterCgroups: true})
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			cgroups := []uint64{p.ClientCG.ID(), p.ServerCG.ID()}
			if !podsTraced {
				cgroups = []uint64{testbed.NewCgroup(b, "other").ID()}
			}
			for _, id := range cgroups {
				if err := tr.AddCgroup(id); err != nil {
					b.Fatal(err)
				}
			}
			pr, err := newGoTLSProber(tr)
			if err != nil {
				b.Fatal(err)
			}
			defer pr.Close()
			o := pr.(*goTLSProber).objs
			progs := map[string]*ebpf.Program{"wr_enter": o.GotlsWrEnter, "wr_ret": o.GotlsWrRet,
				"rd_enter": o.GotlsRdEnter, "rd_ret": o.GotlsRdRet}
			file := openTLSFile(b, bin)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- ring.Read(ctx, tr.Events, func([]byte) {}, nil) }()

			// One round: n requests, the client's ns per request and the
			// CPU time of both ends per request.
			round := func(n int) (wall, cpu float64) {
				srvCPU := taskCPU(b, srv.Process.Pid)
				var stdout strings.Builder
				cmd := p.Client(context.Background(), bin, "bench", p.URL("/hello"), strconv.Itoa(n))
				cmd.Stdout = &stdout
				if err := p.ClientCG.Start(cmd); err != nil {
					b.Fatal(err)
				}
				if err := cmd.Wait(); err != nil {
					b.Fatal(err)
				}
				srvCPU = taskCPU(b, srv.Process.Pid) - srvCPU
				wall, err := strconv.ParseFloat(strings.TrimSpace(stdout.String()), 64)
				if err != nil {
					b.Fatalf("client printed %q", stdout.String())
				}
				cpu = float64((cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime() + srvCPU).Nanoseconds()) / float64(n)
				return wall, cpu
			}
			round(50) // warm up the server
			n := max(b.N/rounds, 1)
			var off, on [2][]float64 // wall, cpu
			var diffs [2][]float64
			var runs, runTime [4]uint64
			names := slices.Sorted(maps.Keys(progs))
			b.ResetTimer()
			for r := 0; r < rounds; r++ {
				w0, c0 := round(n)
				links, err := attachFile(pr, file)
				if err != nil {
					b.Fatal(err)
				}
				before := runStats(b, progs, names)
				w1, c1 := round(n)
				after := runStats(b, progs, names)
				closeLinks(links)
				for i := range names {
					runs[i] += after[i].RunCount - before[i].RunCount
					runTime[i] += uint64((after[i].Runtime - before[i].Runtime).Nanoseconds())
				}
				off[0], off[1] = append(off[0], w0), append(off[1], c0)
				on[0], on[1] = append(on[0], w1), append(on[1], c1)
				diffs[0], diffs[1] = append(diffs[0], w1-w0), append(diffs[1], c1-c0)
			}
			b.StopTimer()
			cancel()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			var hits uint64
			for i, name := range names {
				hits += runs[i]
				if runs[i] > 0 {
					b.ReportMetric(float64(runTime[i])/float64(runs[i]), "bpf-ns/run-"+name)
				}
			}
			perReq := float64(hits) / float64(n*rounds)
			b.ReportMetric(perReq, "hits/req")
			b.ReportMetric(testbed.Median(off[0]), "client-ns/req")
			b.ReportMetric(testbed.Median(on[0]), "+gotls-client-ns/req")
			b.ReportMetric(testbed.Median(off[1]), "cpu-ns/req")
			b.ReportMetric(testbed.Median(on[1]), "+gotls-cpu-ns/req")
			b.ReportMetric(testbed.Median(diffs[0])/perReq, "ns/hit")
			b.ReportMetric(testbed.Median(diffs[1])/perReq, "cpu-ns/hit")
			if ks, _ := tr.Stats(); ks.DataLost != 0 {
				b.Errorf("%d data events lost", ks.DataLost)
			}
		})
	}
}

func runStats(b *testing.B, progs map[string]*ebpf.Program, names []string) []*ebpf.ProgramStats {
	var out []*ebpf.ProgramStats
	for _, n := range names {
		st, err := progs[n].Stats()
		if err != nil {
			b.Fatal(fmt.Errorf("%s: %w", n, err))
		}
		out = append(out, st)
	}
	return out
}

// taskCPU is the CPU time all threads of process pid have run so far
// (/proc/<pid>/task/*/schedstat, in ns).
func taskCPU(b *testing.B, pid int) time.Duration {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		b.Fatal(err)
	}
	var sum time.Duration
	for _, task := range tasks {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, task.Name()))
		if err != nil {
			continue // gone
		}
		ns, err := strconv.ParseInt(strings.Fields(string(data))[0], 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		sum += time.Duration(ns)
	}
	return sum
}

// BenchmarkGoTLSAttach is the time to attach the uprobes to one Go binary
// (17 places in the demo: (*Conn).Write and Read, their starts and RETs)
// and to detach them, with uprobe_multi links (Linux 6.6+) and with one
// perf-event uprobe per place (older kernels). Detaching waits for the
// kernel's grace periods.
func BenchmarkGoTLSAttach(b *testing.B) {
	bin := gotlsdemo.Build(b, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	testbed.RequireRoot(b)
	tr, err := Open(Options{Mode: testMode()})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	file := openTLSFile(b, bin)
	for _, multi := range []bool{true, false} {
		b.Run(map[bool]string{true: "uprobe_multi", false: "perf-event"}[multi], func(b *testing.B) {
			p, err := newGoTLSProberLinks(tr, multi)
			if err != nil {
				b.Skip(err)
			}
			defer p.Close()
			var attach, detach time.Duration
			for b.Loop() {
				start := time.Now()
				links, err := attachFile(p, file)
				if err != nil {
					b.Fatal(err)
				}
				attach += time.Since(start)
				start = time.Now()
				closeLinks(links)
				detach += time.Since(start)
			}
			b.ReportMetric(float64(attach.Microseconds())/float64(b.N)/1000, "attach-ms")
			b.ReportMetric(float64(detach.Microseconds())/float64(b.N)/1000, "detach-ms")
		})
	}
}
