package probes

import (
	"debug/elf"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
)

// BenchmarkOpenSSLProbeSites: what a probed SSL call costs, by where the
// probes are. testdata/ssl_calls.c calls the machine's libssl (SSL_write
// and SSL_read alternately, each returning WANT_READ on an SSL object with
// memory BIOs, no socket: no event is sent) 200,000 times per measurement
// and measures its mean wall time per call: unprobed, with the entry and
// return probes on the four API functions (ns/call-api), and on the two
// internal functions they wrap (ns/call-internal, x86-64), in its process
// only (links with its PID), in three rounds. The BPF
// statistics give the programs' own time per run (ns/run-*): the rest is
// the traps.
//
//	sudo go test -run='^$' -bench=OpenSSLProbeSites -benchtime=1x ./probes/
func BenchmarkOpenSSLProbeSites(b *testing.B) {
	testbed.RequireRoot(b)
	bin := buildSSLCalls(b)
	cg := testbed.NewCgroup(b, "probesites")
	proc := startSSLCalls(b, bin, cg)
	tr, err := Open(Options{Mode: ModeTracepoint, FilterCgroups: true})
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	if err := tr.AddCgroup(cg.ID()); err != nil {
		b.Fatal(err)
	}
	pr, err := newOpenSSLProber(tr)
	if err != nil {
		b.Fatal(err)
	}
	p := pr.(*opensslProber)
	defer p.Close()
	tf := systemLibssl(b)
	path, ef := tf.Path, tf.ELF
	internal, err := p.inspect(tf)
	if err != nil {
		b.Fatal(err)
	}
	if fns := internal.(*opensslTarget).fns; strings.Join(fns, ",") != "ssl_read_internal,ssl_write_internal" {
		b.Fatalf("the prober probes %v, want the internal functions", fns)
	}
	v, _ := versionOf(tf)
	l, _ := layoutFor(v)
	api := p.apiTarget(definedFuncs(ef, "SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"), l.cookie())
	exe, err := link.OpenExecutable(path)
	if err != nil {
		b.Fatal(err)
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enabling BPF statistics: %v", err)
	}
	defer stats.Close()

	const n = 200000
	calls := func() float64 {
		s := proc.calls(n)
		ns, err := strconv.ParseFloat(strings.TrimSuffix(s, " ns/call"), 64)
		if err != nil {
			b.Fatal(err)
		}
		return ns
	}
	sums := map[string]float64{}
	for round := 0; round < 3; round++ {
		sums["ns/call-unprobed"] += calls() / 3
		for _, c := range []struct {
			name   string
			target *opensslTarget
		}{{"api", api}, {"internal", internal.(*opensslTarget)}} {
			links, err := c.target.attach(exe, proc.pid)
			if err != nil {
				b.Fatal(err)
			}
			progs := p.programs()
			before := map[string]ebpf.ProgramStats{}
			for name, prog := range progs {
				st, _ := prog.Stats()
				before[name] = *st
			}
			sums["ns/call-"+c.name] += calls() / 3
			names := []string{"ssl_entry", "ssl_return"} // classic uprobes
			if len(links) == 2 {
				names = []string{"ssl_entry_multi", "ssl_return_multi"}
			}
			for _, name := range names {
				st, _ := progs[name].Stats()
				runs := st.RunCount - before[name].RunCount
				if runs != n {
					b.Errorf("%s: %s ran %d times for %d calls", c.name, name, runs, n)
				}
				if runs > 0 {
					sums["ns/run-"+name+"-"+c.name] += float64((st.Runtime - before[name].Runtime).Nanoseconds()) / float64(runs) / 3
				}
			}
			if err := closeLinks(links); err != nil {
				b.Fatal(err)
			}
		}
	}
	for unit, v := range sums {
		b.ReportMetric(v, unit)
	}
}

// systemLibssl opens the machine's libssl (SystemLibssl, its links
// followed) as the prober reads a file; the ELF is closed with the test.
func systemLibssl(tb testing.TB) *tlsFile {
	tb.Helper()
	path, err := filepath.EvalSymlinks(SystemLibssl)
	if err != nil {
		tb.Fatal(err)
	}
	ef, err := elf.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ef.Close() })
	return &tlsFile{Path: path, Name: path, Root: "/", ELF: ef}
}
