package probes

import (
	"context"
	"fmt"
	"os"
	"sort"
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
// traced Go program: b.N keep-alive HTTPS GETs of /hello (a 1231-byte
// body) from the Go client to the Go server (two pods), the client timing
// them. The socket tracer runs in every case; the cases differ in the
// uprobes and in whether the pods' cgroups are traced:
//
//	socket-only      pods traced, no uprobes
//	socket+gotls     pods traced, uprobes on both ends' (*Conn).Write/Read
//	none-traced      another cgroup traced, no uprobes
//	gotls-filtered   another cgroup traced, uprobes (they fire and return early)
//
// It reports the client's mean time per request (wall) and the CPU time
// of client and server per request (their threads' run time, which
// includes the uprobes' traps). With uprobes it also reports the BPF run time per program run and the
// runs per request (BPF_ENABLE_STATS), and the uprobe hits per request.
func BenchmarkGoTLSUprobeCost(b *testing.B) {
	bin := gotlsdemo.Build(b, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	for _, c := range []struct {
		name           string
		podsTraced, up bool
	}{
		{"socket-only", true, false},
		{"socket+gotls", true, true},
		{"none-traced", false, false},
		{"gotls-filtered", false, true},
	} {
		b.Run(c.name, func(b *testing.B) {
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
			if !c.podsTraced {
				cgroups = []uint64{testbed.NewCgroup(b, "other").ID()}
			}
			for _, id := range cgroups {
				if err := tr.AddCgroup(id); err != nil {
					b.Fatal(err)
				}
			}
			var progs map[string]*ebpf.Program
			if c.up {
				pr, err := newGoTLSProber(tr)
				if err != nil {
					b.Fatal(err)
				}
				defer pr.Close()
				links, err := pr.attach(openTLSFile(b, bin))
				if err != nil {
					b.Fatal(err)
				}
				defer func() {
					for _, l := range links {
						l.Close()
					}
				}()
				o := pr.(*goTLSProber).objs
				progs = map[string]*ebpf.Program{"wr_enter": o.GotlsWrEnter, "wr_ret": o.GotlsWrRet,
					"rd_enter": o.GotlsRdEnter, "rd_ret": o.GotlsRdRet}
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- ring.Read(ctx, tr.Events, func([]byte) {}, nil) }()
			// Warm up the connection path, then measure.
			p.RunClient(b, bin, "bench", p.URL("/hello"), "50")
			before := runStats(b, progs)
			srvCPU := taskCPU(b, srv.Process.Pid)
			b.ResetTimer()
			var stdout strings.Builder
			cmd := p.Client(context.Background(), bin, "bench", p.URL("/hello"), strconv.Itoa(b.N))
			cmd.Stdout = &stdout
			if err := p.ClientCG.Start(cmd); err != nil {
				b.Fatal(err)
			}
			if err := cmd.Wait(); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			srvCPU = taskCPU(b, srv.Process.Pid) - srvCPU
			cliCPU := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
			out := stdout.String()
			cancel()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			ns, err := strconv.ParseFloat(strings.TrimSpace(out), 64)
			if err != nil {
				b.Fatalf("client printed %q", out)
			}
			b.ReportMetric(ns, "client-ns/req")
			b.ReportMetric(float64((cliCPU+srvCPU).Nanoseconds())/float64(b.N), "cpu-ns/req")
			if c.up {
				after := runStats(b, progs)
				var names []string
				for n := range progs {
					names = append(names, n)
				}
				sort.Strings(names)
				var hits uint64
				var total time.Duration
				for _, n := range names {
					rt, cnt := after[n].Runtime-before[n].Runtime, after[n].RunCount-before[n].RunCount
					hits += cnt
					total += rt
					if cnt > 0 {
						b.ReportMetric(float64(rt.Nanoseconds())/float64(cnt), "ns/run-"+n)
					}
					b.ReportMetric(float64(cnt)/float64(b.N), "runs/req-"+n)
				}
				b.ReportMetric(float64(hits)/float64(b.N), "uprobe-hits/req")
				b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "bpf-ns/req")
			}
			if ks, _ := tr.Stats(); ks.DataLost != 0 {
				b.Errorf("%d data events lost", ks.DataLost)
			}
		})
	}
}

func runStats(b *testing.B, progs map[string]*ebpf.Program) map[string]*ebpf.ProgramStats {
	out := map[string]*ebpf.ProgramStats{}
	for n, p := range progs {
		st, err := p.Stats()
		if err != nil {
			b.Fatal(fmt.Errorf("%s: %w", n, err))
		}
		out[n] = st
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
