package sockets_test

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
)

// BenchmarkKernelCost measures the eBPF time the socket programs spend per
// HTTP exchange, from the kernel's BPF statistics (BPF_ENABLE_STATS): b.N
// keep-alive GETs from a Go client to nginx, both traced (so each exchange
// is seen at both ends), and, for comparison, the same traffic from
// cgroups that are not traced (what the filter costs everyone else).
func BenchmarkKernelCost(b *testing.B) {
	for _, traced := range []bool{true, false} {
		b.Run(map[bool]string{true: "traced", false: "untraced"}[traced], func(b *testing.B) {
			p := testbed.NewHTTPPair(b)
			p.WriteFile(b, "item.json", []byte(`{"id":42,"ok":true}`+"\n"))
			stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
			if err != nil {
				b.Fatalf("enabling BPF statistics: %v", err)
			}
			defer stats.Close()
			cgroups := []uint64{p.ClientCG.ID(), p.ServerCG.ID()}
			if !traced {
				cgroups = []uint64{testbed.NewCgroup(b, "other").ID()}
			}
			tr, err := probes.Open(probes.Options{Mode: probes.ModeTracepoint, FilterCgroups: true, PayloadBytes: benchPayload()})
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			for _, id := range cgroups {
				if err := tr.AddCgroup(id); err != nil {
					b.Fatal(err)
				}
			}
			// Drain the ring so it never fills.
			stop := make(chan struct{})
			done := make(chan struct{})
			go drain(b, tr, stop, done)
			exe, _ := os.Executable()
			b.ResetTimer()
			start := time.Now()
			p.Client(b, []string{fmt.Sprintf("CLOVISOR_TEST_HTTP_CLIENT=repeat=%d %s", b.N, p.URL("/item.json"))}, exe)
			wall := time.Since(start)
			b.StopTimer()
			close(stop)
			<-done

			var total time.Duration
			var names []string
			for name := range tr.Programs() {
				names = append(names, name)
			}
			sort.Strings(names)
			for _, name := range names {
				st, err := tr.Programs()[name].Stats()
				if err != nil {
					b.Fatal(err)
				}
				rt, cnt := st.Runtime, st.RunCount
				total += rt
				if cnt > 0 {
					b.ReportMetric(float64(rt.Nanoseconds())/float64(cnt), "ns/run-"+name)
				}
				b.ReportMetric(float64(cnt)/float64(b.N), "runs/tx-"+name)
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "bpf-ns/tx")
			b.ReportMetric(float64(b.N)/wall.Seconds(), "tx/s")
			ks, _ := tr.Stats()
			if traced && ks.DataLost != 0 {
				b.Errorf("%d data events lost", ks.DataLost)
			}
		})
	}
}

func drain(b *testing.B, tr *probes.Tracer, stop, done chan struct{}) {
	defer close(done)
	rd, err := newReader(tr)
	if err != nil {
		b.Error(err)
		return
	}
	defer rd.Close()
	for {
		select {
		case <-stop:
			return
		default:
		}
		rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
		rd.Read()
	}
}

// benchPayload is the payload prefix for BenchmarkKernelCost
// (CLOVISOR_BENCH_PAYLOAD, default the agent's default).
func benchPayload() int {
	if n, err := strconv.Atoi(os.Getenv("CLOVISOR_BENCH_PAYLOAD")); err == nil {
		return n
	}
	return probes.DefaultPayload
}

// BenchmarkModeCost compares the attach modes the running kernel allows:
// b.N keep-alive GETs of the mode workload (Go client and server, two
// network namespaces, both traced), with the kernel's BPF statistics, per
// mode: eBPF ns per exchange (both ends) and per program run. The host
// allows only the tracepoint mode; BenchmarkKernelMatrixModeCost runs this
// inside the VM kernels, where all modes are measured in one run.
func BenchmarkModeCost(b *testing.B) {
	w := startModeWorkload(b)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()
	url := "http://" + w.serverAddr.String() + "/a"
	for _, mode := range probes.Modes {
		b.Run(mode, func(b *testing.B) {
			quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
			tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true, Logger: quiet})
			if errors.Is(err, probes.ErrUnsupported) {
				b.Skipf("not on this kernel: %v", err)
			}
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			for _, id := range []uint64{w.clientCG.ID(), w.serverCG.ID()} {
				if err := tr.AddCgroup(id); err != nil {
					b.Fatal(err)
				}
			}
			stop, done := make(chan struct{}), make(chan struct{})
			go drain(b, tr, stop, done)
			b.ResetTimer()
			out, err := w.client(fmt.Sprintf("repeat=%d %s", b.N, url))
			b.StopTimer()
			close(stop)
			<-done
			if err != nil {
				b.Fatalf("client: %v\n%s", err, out)
			}
			var total time.Duration
			for name, p := range tr.Programs() {
				st, err := p.Stats()
				if err != nil {
					b.Fatal(err)
				}
				total += st.Runtime
				if st.RunCount > 0 {
					b.ReportMetric(float64(st.Runtime.Nanoseconds())/float64(st.RunCount), "ns/run-"+name)
				}
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "bpf-ns/tx")
		})
	}
}
