package probes

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/clovisor/clovisor/internal/testbed"
)

// countingProgram is the least a uprobe program can do and still show
// that it ran: add one to slot key of the per-CPU array runs, return 0.
func countingProgram(b *testing.B, runs *ebpf.Map, key int32) *ebpf.Program {
	b.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:       "floor_count",
		Type:       ebpf.Kprobe,
		AttachType: ebpf.AttachTraceUprobeMulti,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.R10, -4, int64(key), asm.Word),
			asm.Mov.Reg(asm.R2, asm.R10),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, runs.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
			asm.Add.Imm(asm.R1, 1),
			asm.StoreMem(asm.R0, 0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		b.Fatalf("loading the counting program: %v", err)
	}
	b.Cleanup(func() { prog.Close() })
	return prog
}

// BenchmarkOpenSSLFloorWrk: the least that uprobes on nginx's SSL calls
// can cost, whatever their programs do. The setup of
// sockets.BenchmarkOpenSSLOverheadWrk (wrk, 8 keep-alive connections,
// against nginx with TLS, one worker, a 1 KiB file by default), with no tracer at
// all: the traced runs only put programs that count their runs (and do
// nothing else) on the functions TLS tracing probes in nginx's processes
// (ssl_read_internal and ssl_write_internal, found as the prober finds
// them; per process, uprobe_multi), in three placements:
//
//   - entry+return: entry and return probes on both functions, as TLS
//     tracing places them (reads need their return: the plaintext is
//     there only then);
//   - read-ret: entry and return probes on the read, an entry probe only
//     on the write (whose plaintext is in its buffer at the entry): the
//     fewest traps any uprobe-based plaintext capture needs;
//   - entry: an entry probe only on each, which cannot capture a read's
//     plaintext: below any possible tracer, a bound.
//
// Runs alternate untraced and each placement in turn (5 s each after a
// 1 s warm-up); each placement's runs are compared with the mean of the
// untraced runs around them.
//
//	sudo go test -run='^$' -bench=OpenSSLFloorWrk -benchtime=1x ./probes/
func BenchmarkOpenSSLFloorWrk(b *testing.B) {
	p := testbed.NewTLSPair(b)
	p.WriteFile(b, "file.txt", []byte(strings.Repeat("k", testbed.WrkFileBytes(b))))
	url := p.URL("/file.txt")

	tf := systemLibssl(b)
	path := tf.Path
	v, _ := versionOf(tf)
	rd, wr, err := findOpenSSLInternal(tf.ELF, v)
	if err != nil {
		b.Fatalf("%s: %v", path, err)
	}
	exe, err := link.OpenExecutable(path)
	if err != nil {
		b.Fatal(err)
	}
	pids, err := p.ServerCG.Procs()
	if err != nil || len(pids) != 2 {
		b.Fatalf("nginx's processes: %v %v, want master and worker", pids, err)
	}
	runs, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer runs.Close()
	const entryKey, returnKey = 0, 1
	entryProg := countingProgram(b, runs, entryKey)
	returnProg := countingProgram(b, runs, returnKey)
	count := func(key uint32) uint64 {
		var per []uint64
		if err := runs.Lookup(key, &per); err != nil {
			b.Fatal(err)
		}
		var s uint64
		for _, n := range per {
			s += n
		}
		return s
	}

	type placement struct {
		name             string
		entries, returns []opensslInternal
	}
	both := []opensslInternal{rd, wr}
	placements := []placement{
		{"entry+return", both, both},
		{"read-ret", both, []opensslInternal{rd}},
		{"entry", both, nil},
	}
	attach := func(pl placement) []link.Link {
		var links []link.Link
		for _, pid := range pids {
			for _, way := range []struct {
				fns  []opensslInternal
				prog *ebpf.Program
				ret  bool
			}{{pl.returns, returnProg, true}, {pl.entries, entryProg, false}} {
				if len(way.fns) == 0 {
					continue
				}
				opts := &link.UprobeMultiOptions{PID: uint32(pid)}
				for _, f := range way.fns {
					opts.Addresses = append(opts.Addresses, f.off)
				}
				var l link.Link
				if way.ret {
					l, err = exe.UretprobeMulti(nil, way.prog, opts)
				} else {
					l, err = exe.UprobeMulti(nil, way.prog, opts)
				}
				if err != nil {
					closeLinks(links)
					b.Fatalf("%s: attaching to nginx %d: %v", pl.name, pid, err)
				}
				links = append(links, l)
			}
		}
		return links
	}

	p.Wrk(b, time.Second, url) // warm-up
	var untraced []float64
	rate := map[string][]float64{}
	ratio := map[string][]float64{}
	nginxUS := map[string][]float64{}
	perReq := map[string][2]float64{}
	run := func(name string) {
		cpu0 := p.ServerCG.CPU(b)
		e0, r0 := count(entryKey), count(returnKey)
		r := p.Wrk(b, 5*time.Second, url)
		us := float64((p.ServerCG.CPU(b) - cpu0).Microseconds()) / float64(r.Requests)
		nginxUS[name] = append(nginxUS[name], us)
		if name == "untraced" {
			untraced = append(untraced, r.PerSec)
			return
		}
		rate[name] = append(rate[name], r.PerSec)
		pr := perReq[name]
		pr[0] += float64(count(entryKey)-e0) / float64(r.Requests)
		pr[1] += float64(count(returnKey)-r0) / float64(r.Requests)
		perReq[name] = pr
	}
	const rounds = 3
	run("untraced")
	for i := 0; i < rounds; i++ {
		for _, pl := range placements {
			links := attach(pl)
			run(pl.name)
			if err := closeLinks(links); err != nil {
				b.Fatal(err)
			}
			run("untraced")
			n := len(untraced)
			last := rate[pl.name][len(rate[pl.name])-1]
			ratio[pl.name] = append(ratio[pl.name], 100*last/((untraced[n-2]+untraced[n-1])/2))
		}
	}
	mean := func(x []float64) float64 {
		var s float64
		for _, v := range x {
			s += v
		}
		return s / float64(len(x))
	}
	b.ReportMetric(mean(untraced), "req/s-untraced")
	b.ReportMetric(mean(nginxUS["untraced"]), "nginx-us/req-untraced")
	for _, pl := range placements {
		rs := ratio[pl.name]
		b.ReportMetric(mean(rs), "%-"+pl.name)
		b.ReportMetric(slices.Max(rs), "max-%-"+pl.name)
		b.ReportMetric(mean(nginxUS[pl.name]), "nginx-us/req-"+pl.name)
		pr := perReq[pl.name]
		b.ReportMetric(pr[0]/rounds, "entries/req-"+pl.name)
		b.ReportMetric(pr[1]/rounds, "returns/req-"+pl.name)
		// Every request is one read that returns it, one that finds
		// nothing more, and one write: a placement whose programs did
		// not run that often measured nothing.
		wantE, wantR := 3.0, 0.0
		for _, f := range pl.returns {
			if f == rd {
				wantR += 2
			} else {
				wantR++
			}
		}
		if pr[0]/rounds < wantE*0.9 || pr[1]/rounds < wantR*0.9 {
			b.Errorf("%s: %.2f entries and %.2f returns per request, want %.0f and %.0f", pl.name, pr[0]/rounds, pr[1]/rounds, wantE, wantR)
		}
		b.Logf("%s: %s of untraced per round; nginx %.1f µs per request (untraced %.1f)", pl.name,
			fmt.Sprintf("%.1f%%", rs), mean(nginxUS[pl.name]), mean(nginxUS["untraced"]))
	}
	b.Logf("untraced req/s: %.0f", untraced)
}
