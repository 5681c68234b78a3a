package tcsessions

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
)

// BenchmarkProgram measures the programs' cost per packet with
// BPF_PROG_TEST_RUN (the kernel runs the program b.N times on one packet
// and reports the mean), for the paths a packet can take. The same packet
// is run again and again, so the data paths are those of a repeated
// (retransmitted) segment: a fresh segment additionally takes the exchange
// transition and, once per exchange direction, the payload capture.
func BenchmarkProgram(b *testing.B) {
	testbed.RequireRoot(b)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	syn := c.fromClient(fSYN, "")
	synack := c.fromServer(fSYN|fACK, "")
	ack := c.fromClient(fACK, "")
	data := c.fromClient(fPSH|fACK, strings.Repeat("x", 1400))
	other := newConv("10.1.0.1:40001", "10.1.0.2:9999")
	cases := []struct {
		name  string
		flags uint32
		frame []byte
	}{
		{"untraced-interface", 0, data.frame()},
		{"syn-untraced-port", ifaceSessions, other.fromClient(fSYN, "").frame()},
		{"data-untraced-port", ifaceSessions, other.fromClient(fPSH|fACK, "abc").frame()},
		{"ack-tracked", ifaceSessions, ack.frame()},
		{"data-tracked", ifaceSessions, data.frame()},
		{"data-tracked-ipv6", ifaceSessions, func() []byte {
			c6 := newConv("[fd00::1]:40000", "[fd00::2]:8080")
			return c6.fromClient(fPSH|fACK, strings.Repeat("x", 1400)).frame()
		}()},
		{"data-tracked-node-nic", ifaceSessions | ifaceWorkloads, data.frame()},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			cfg := httpPorts
			if err := cfg.normalize(); err != nil {
				b.Fatal(err)
			}
			o, err := loadObjects(&cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer o.Close()
			if err := o.setPort(0, 8080, 1); err != nil {
				b.Fatal(err)
			}
			if tc.flags != 0 {
				if err := o.setInterface(loIfindex, tc.flags); err != nil {
					b.Fatal(err)
				}
			}
			w := newWorkloads(o)
			if err := w.set("srv", netip.MustParseAddr("10.1.0.2")); err != nil {
				b.Fatal(err)
			}
			// Open the session first (when the interface traces).
			for _, s := range []seg{syn, synack, ack} {
				if _, err := o.Ingress.Run(&ebpf.RunOptions{Data: s.frame()}); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			ret, per, err := o.Ingress.Benchmark(tc.frame, b.N, nil)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			if int32(ret) != -1 {
				b.Fatalf("returned %d", int32(ret))
			}
			b.ReportMetric(float64(per.Nanoseconds()), "ns/packet")
		})
	}
}

// BenchmarkWireCost measures what the programs cost on real traffic, from
// the kernel's BPF statistics (BPF_ENABLE_STATS): an iperf3 bulk transfer
// and keep-alive HTTP requests between two pods of a bridged node, traced
// on both veths and the NIC. It reports the mean time per program run (one
// run per skb per hook; GSO/GRO skbs carry many segments), per wire packet,
// and per exchange.
func BenchmarkWireCost(b *testing.B) {
	testbed.RequireRoot(b)
	for _, kind := range []string{"iperf3", "http"} {
		b.Run(kind, func(b *testing.B) {
			t := b
			node := testbed.NewNode(t, testbed.Bridged)
			cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
			root := b.TempDir()
			testbed.StartIperf3(t, srv.NS, srv.IP, 5201)
			testbed.StartNginx(t, srv.NS, 8080, root, srv.IP)
			if err := os.WriteFile(filepath.Join(root, "item.json"), []byte(`{"id":42,"ok":true}`+"\n"), 0o644); err != nil {
				b.Fatal(err)
			}
			stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
			if err != nil {
				b.Fatalf("enabling BPF statistics: %v", err)
			}
			defer stats.Close()
			log, _ := testLogger(b)
			tr, err := Open(Config{Netns: node.NS.Path(), StateDir: b.TempDir(), Logger: log,
				Ports: []Port{{Port: 5201}, {Port: 8080, Protocol: "http"}}})
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			if dir := os.Getenv("CLOVISOR_JIT_LINES"); dir != "" {
				if err := writeJitLines(dir, tr.Programs()); err != nil {
					b.Fatal(err)
				}
			}
			var exchanges, wirePackets uint64
			stop := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				ctx, cancel := contextWithCancel()
				go func() { <-stop; cancel() }()
				tr.Run(ctx, nil, func(x *Exchange) {
					if x.Interface == srv.HostVeth {
						exchanges++
						wirePackets += x.Request.Packets + x.Response.Packets
					}
				})
			}()
			b.ResetTimer()
			start := time.Now()
			var bytes uint64
			switch kind {
			case "iperf3":
				// Two seconds whatever b.N (run with -benchtime=1x).
				out := cli.NS.Exec(b, "iperf3", "-c", srv.IP.String(), "-p", "5201", "-t", "2", "-J")
				var r iperfResult
				if err := json.Unmarshal([]byte(out), &r); err != nil {
					b.Fatal(err)
				}
				bytes = r.End.SumSent.Bytes
			case "http":
				url := "http://" + netip.AddrPortFrom(srv.IP, 8080).String() + "/item.json"
				for left := b.N; left > 0; left -= 500 {
					n := min(left, 500)
					args := []string{"-sS", "--http1.1"}
					for range n {
						args = append(args, "-o", "/dev/null", url)
					}
					cli.NS.Exec(b, "curl", args...)
				}
			}
			wall := time.Since(start)
			b.StopTimer()
			time.Sleep(3 * PollInterval)
			close(stop)
			<-done
			var runs uint64
			var total time.Duration
			for name, p := range tr.Programs() {
				st, err := p.Stats()
				if err != nil {
					b.Fatal(err)
				}
				runs += st.RunCount
				total += st.Runtime
				if st.RunCount > 0 {
					b.ReportMetric(float64(st.Runtime.Nanoseconds())/float64(st.RunCount), "ns/run-"+name)
				}
			}
			if runs > 0 {
				b.ReportMetric(float64(total.Nanoseconds())/float64(runs), "ns/run")
			}
			if wirePackets > 0 {
				// Each wire packet between the pods runs two
				// programs: the client veth's ingress and the
				// server veth's egress (or the reverse).
				b.ReportMetric(float64(total.Nanoseconds())/float64(wirePackets), "bpf-ns/wire-packet")
			}
			if exchanges > 0 && kind == "http" {
				b.ReportMetric(float64(total.Nanoseconds())/float64(exchanges), "bpf-ns/exchange")
				b.ReportMetric(float64(exchanges)/wall.Seconds(), "exchanges/s")
			}
			if bytes > 0 {
				b.ReportMetric(float64(bytes)*8/wall.Seconds()/1e9, "Gbit/s")
				b.ReportMetric(float64(total.Nanoseconds())/float64(bytes)*1e6, "bpf-ns/MB")
			}
			if ks, err := tr.Stats(); err == nil && ks.ExchangesLost+ks.PayloadsLost > 0 {
				b.Logf("lost: %+v", ks)
			}
		})
	}
}

// BenchmarkAssembler measures the user-space cost of one HTTP exchange on
// the wire (a keep-alive GET of a 1 KiB file, as wrk makes against nginx):
// the request's and the response's payload events and the exchange's
// record, decoded, parsed and reported, on 8 connections in turn.
func BenchmarkAssembler(b *testing.B) {
	a := NewAssembler(AssemblerConfig{Analyzers: protocols.NewRegistry(http1.New())})
	req := "GET /small.html HTTP/1.1\r\nHost: 10.201.20.12:8080\r\n\r\n"
	hdr := "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 11:10:00 GMT\r\nContent-Type: text/html\r\n" +
		"Content-Length: 1024\r\nLast-Modified: Sat, 21 Nov 2026 11:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"1-400\"\r\n" +
		"Accept-Ranges: bytes\r\n\r\n"
	resp := hdr + strings.Repeat("x", 1024)
	const conns = 8
	type connEv struct {
		req, resp *stream
	}
	var cs [conns]connEv
	for i := range cs {
		tu := testTuple(fmt.Sprintf("10.201.20.11:%d", 40000+i), "10.201.20.12:8080", 4)
		cs[i] = connEv{&stream{t: nil, tu: tu, dir: dirRequest, seq: 1000}, &stream{tu: tu, dir: dirResponse, seq: 5000}}
	}
	// Events differ per connection and exchange index (sequence numbers,
	// counts): they are built ahead, a batch at a time, outside the
	// timed part. The response prefix is the agent's (512 bytes).
	const batch = 4096
	type exEvents [3][]byte
	evs := make([]exEvents, batch)
	build := func(from, n int) {
		for j := range n {
			i := from + j
			c := &cs[i%conns]
			r := &evs[j]
			r[0] = c.req.packetB(r[0][:0], req, len(req), 0, uint64(i))
			r[1] = c.resp.packetB(r[1][:0], resp[:min(len(resp), DefaultResponsePayloadBytes)], len(resp), uint64(len(req)), uint64(i))
			ev := ExchangeEvent{Kind: eventExchange, End: uint8(EndNextRequest), Phase: uint8(PhaseResponse), Proto: 1, Tuple: c.req.tu,
				FirstTs: 1, Index: c.req.index, ReqFirstTs: uint64(i), ReqLastTs: uint64(i), RespFirstTs: uint64(i), RespLastTs: uint64(i),
				EndTs: uint64(i)}
			ev.Dir = [2]tcDirCounters{c.req.counters(), c.resp.counters()}
			r[2] = append(r[2][:0], unsafe.Slice((*byte)(unsafe.Pointer(&ev)), exchangeSize)...)
			c.req.next()
			c.resp.next()
		}
	}
	var out []*Exchange
	b.ReportAllocs()
	b.ResetTimer()
	for from := 0; from < b.N; from += batch {
		n := min(batch, b.N-from)
		b.StopTimer()
		build(from, n)
		b.StartTimer()
		for j := range n {
			for _, raw := range evs[j] {
				var err error
				if out, err = a.Handle(raw, out[:0]); err != nil {
					b.Fatal(err)
				}
			}
			if len(out) != 1 || out[0].Tx == nil || out[0].Tx.StatusCode != 200 {
				b.Fatalf("exchange %d: %v", from+j, out)
			}
		}
	}
}

// writeJitLines writes, for each program, dir/NAME.lines: one line per
// entry of the program's BTF line info, "JIT offset<TAB>source line<TAB>
// source text", the offset from the start of its JIT image. With it,
// scripts/bpf-lines.py puts the samples of a perf profile taken inside a
// program (bpf_prog_TAG_NAME+OFFSET) on source lines, which perf and
// bpftool cannot do when built without libbfd.
func writeJitLines(dir string, progs map[string]*ebpf.Program) error {
	for name, p := range progs {
		info, err := p.Info()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		ksyms, ok1 := info.JitedKsymAddrs()
		jited, ok2 := info.JitedLineInfos()
		lines, err := info.LineInfos()
		funcs, ferr := info.FuncInfos()
		if !ok1 || !ok2 || err != nil || ferr != nil || len(ksyms) == 0 || len(jited) != len(lines) ||
			len(funcs) != len(ksyms) {
			return fmt.Errorf("%s: no JIT line info (%d symbols, %d functions, %d JIT lines, %d lines, %v, %v)",
				name, len(ksyms), len(funcs), len(jited), len(lines), err, ferr)
		}
		// Each function (the program, then its subprograms) has an
		// image of its own, named in perf's samples by its BTF name;
		// a line's offset is from the start of its function's image.
		sorted := slices.Clone(ksyms)
		slices.Sort(sorted)
		fname := map[uintptr]string{}
		for i, f := range funcs {
			fname[ksyms[i]] = f.Func.Name
		}
		fname[ksyms[0]] = name
		out := map[string]*strings.Builder{}
		for i, l := range lines {
			j, found := slices.BinarySearch(sorted, uintptr(jited[i]))
			if !found {
				j--
			}
			if j < 0 {
				return fmt.Errorf("%s: JIT line at %#x before the first function", name, jited[i])
			}
			f := fname[sorted[j]]
			if out[f] == nil {
				out[f] = &strings.Builder{}
			}
			fmt.Fprintf(out[f], "%d\t%d\t%s\n", uintptr(jited[i])-sorted[j], l.Line.LineNumber(), strings.TrimSpace(l.Line.Line()))
		}
		for f, b := range out {
			if err := os.WriteFile(filepath.Join(dir, f+".lines"), []byte(b.String()), 0o644); err != nil {
				return err
			}
		}
		// The machine code too, for a disassembler (objdump -b binary
		// -m i386:x86-64 -D): the functions' images one after another,
		// as the kernel gives them, with their lengths in .funcs.
		if insns, ok := info.JitedInsns(); ok {
			lens, _ := info.JitedFuncLens()
			var fl strings.Builder
			for i, n := range lens {
				fmt.Fprintf(&fl, "%s\t%d\n", fname[ksyms[i]], n)
			}
			if err := os.WriteFile(filepath.Join(dir, name+".jit"), insns, 0o644); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dir, name+".funcs"), []byte(fl.String()), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}
