// Command clovisor is Clovisor's node agent: it traces the network sessions
// of the processes on this host with eBPF and exports each request/response
// exchange as an OpenTelemetry span (OTLP), or prints it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/clovisor/clovisor/podmap"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/sockets"
	"github.com/clovisor/clovisor/spans"
	"github.com/clovisor/clovisor/tcsessions"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "clovisor:", err)
		os.Exit(1)
	}
}

// listFlag collects a repeatable, comma-separable flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

type options struct {
	probeMode    string
	cgroups      listFlag
	ports        listFlag
	payloadBytes int
	ringBytes    int
	output       string
	endpoint     string
	protocol     string
	maxConns     int
	idleTimeout  time.Duration
	statsEvery   time.Duration
	logLevel     string
	configFile   string
	wire         bool
	wirePods     listFlag
	wireNodes    listFlag
	wireAttach   string
	tls, tlsSet  bool
	tlsProbes    string          // --tls-probes (tls.go)
	kube         kubeOptions     // Kubernetes mode (kube.go)
	set          map[string]bool // flags given on the command line
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("clovisor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: clovisor [flags]\n\n"+
			"Traces the TCP sessions of this host's processes with eBPF and exports one\n"+
			"OpenTelemetry span per request/response. With no collector configured\n"+
			"(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or\n"+
			"--otlp-endpoint) each session is printed as a line. Needs root (or\n"+
			"CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE) and a kernel with BTF.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.probeMode, "probe-mode", probes.ModeAuto, "how to hook the kernel: auto, "+strings.Join(probes.Modes, ", "))
	fs.Var(&o.cgroups, "cgroup", "trace only these cgroups (v2 paths, absolute or below the cgroup2 mount; repeatable, comma-separated); default: all")
	fs.Var(&o.ports, "port", "trace only connections with one of these local or remote ports (repeatable, comma-separated); default: all")
	fs.IntVar(&o.payloadBytes, "payload-bytes", probes.DefaultPayload, fmt.Sprintf("payload prefix captured per send or receive call (at most %d)", probes.MaxPayload))
	fs.IntVar(&o.ringBytes, "ring-bytes", 8<<20, "size of the kernel ring buffer (a power of two)")
	fs.StringVar(&o.output, "output", "", "console, json or otlp (default: otlp when a collector is configured, console otherwise)")
	fs.StringVar(&o.endpoint, "otlp-endpoint", "", "OTLP collector URL, e.g. http://localhost:4318 (overrides OTEL_EXPORTER_OTLP_ENDPOINT)")
	fs.StringVar(&o.protocol, "otlp-protocol", "", "grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf)")
	fs.IntVar(&o.maxConns, "max-conns", 65536, "connections tracked at once")
	fs.DurationVar(&o.idleTimeout, "idle-timeout", 5*time.Minute, "forget connections idle for this long")
	fs.DurationVar(&o.statsEvery, "stats-interval", time.Minute, "log counters this often (0: only at exit)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.configFile, "config", "", "YAML configuration file (see cmd/clovisor/config.go); flags override it")
	fs.BoolVar(&o.wire, "wire", true, "also trace what crosses pod veths and node NICs (tc programs)")
	fs.Var(&o.wirePods, "wire-interfaces", "pod interfaces for wire tracing: names, patterns, @veth (default: @veth, the host side of every veth)")
	fs.Var(&o.wireNodes, "wire-node-interfaces", "node NICs for wire tracing: names, patterns, @default-route (default: @default-route)")
	fs.StringVar(&o.wireAttach, "wire-attach", "", "how to attach the tc programs: auto, tcx or clsact (default auto)")
	tlsFlags(fs, o)
	o.kube.register(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	o.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { o.set[f.Name] = true })
	o.tlsSet = o.set["tls"]
	if err := tlsCheck(o); err != nil {
		return nil, err
	}
	if err := o.kube.check(); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	switch o.output {
	case "", "console", "json", "otlp":
	default:
		return nil, fmt.Errorf("--output=%s: want console, json or otlp", o.output)
	}
	return o, nil
}

func run(args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	ports, err := parsePorts(o.ports)
	if err != nil {
		return err
	}
	fileCfg, err := loadConfig(o.configFile)
	if err != nil {
		return err
	}
	cgr, err := podmap.NewCgroupResolver()
	if err != nil {
		return fmt.Errorf("cgroup v2: %w", err)
	}
	defer cgr.Close()
	cgroupIDs, err := resolveCgroups(cgr.Mount(), o.cgroups)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ks, err := startKube(ctx, o, log, probes.MaxPayload)
	if err != nil {
		return err
	}
	var enricher spans.Enricher
	index := &podmap.Index{}
	if ks != nil {
		enricher = index
		ks.apply(o)
	}
	newExporter := func(endpoint, protocol string) (*spans.Exporter, error) {
		output := o.output
		if ks != nil && output == "" && endpoint != "" {
			output = spans.OutputOTLP // a collector named by the ConfigMap
		}
		return spans.New(ctx, spans.Config{Output: output, Endpoint: endpoint, Protocol: protocol, Writer: stdout, Enricher: enricher}, log)
	}
	first, err := newExporter(o.endpoint, o.protocol)
	if err != nil {
		return fmt.Errorf("span export: %w", err)
	}
	exp := &exportSwitch{cur: first, endpoint: o.endpoint, protocol: o.protocol}

	tr, err := probes.Open(probes.Options{
		Mode:          o.probeMode,
		PayloadBytes:  o.payloadBytes,
		RingBytes:     o.ringBytes,
		FilterCgroups: len(cgroupIDs) > 0 || ks != nil,
		Ports:         ports,
		Logger:        log,
	})
	if err != nil {
		_ = exp.Shutdown(context.Background())
		return err
	}
	for _, id := range cgroupIDs {
		if err := tr.AddCgroup(id); err != nil {
			tr.Close()
			_ = exp.Shutdown(context.Background())
			return fmt.Errorf("tracing cgroup %d: %w", id, err)
		}
	}

	analyzers := protocols.NewRegistry(http1.New())
	var wire *tcsessions.Tracer
	if o.wire {
		cfg := tcsessions.Config{}
		if fileCfg.Wire != nil {
			cfg = *fileCfg.Wire
		}
		if len(o.wirePods) > 0 {
			cfg.PodInterfaces = o.wirePods
		}
		if len(o.wireNodes) > 0 {
			cfg.NodeInterfaces = o.wireNodes
		}
		if o.wireAttach != "" {
			cfg.Attach = o.wireAttach
		}
		if ks != nil && len(o.wirePods) == 0 && (fileCfg.Wire == nil || fileCfg.Wire.PodInterfaces == nil) {
			cfg.PodInterfaces = []string{} // the pods' veths are attached as the pods come
		}
		if p := collectorPort(o.endpoint, o.protocol); p != 0 {
			cfg.IgnorePorts = append(cfg.IgnorePorts, p)
		}
		cfg.Logger = log
		if wire, err = tcsessions.Open(cfg); err != nil {
			tr.Close()
			_ = exp.Shutdown(context.Background())
			return fmt.Errorf("wire tracing (--wire=false to do without): %w", err)
		}
	}

	tlsTr, err := startTLS(ctx, o, fileCfg, tr, log)
	if err != nil {
		if wire != nil {
			wire.Close()
		}
		tr.Close()
		_ = exp.Shutdown(context.Background())
		return err
	}

	var hint func(netip.AddrPort) string
	if ks != nil {
		hint = index.Protocol // protocols named by Service ports
	}
	tk := sockets.NewTracker(sockets.Config{
		Analyzers:    analyzers,
		Sink:         exp.Export,
		MaxConns:     o.maxConns,
		IdleTimeout:  o.idleTimeout,
		CgroupPath:   cgr.Path,
		ProtocolHint: hint,
		Logger:       log,
	})
	var ka *kubeAgent
	kubeDone := make(chan struct{})
	if ks != nil {
		var wt wireTables
		netnsPath := ""
		if wire != nil {
			wt = wire
			if fileCfg.Wire != nil {
				netnsPath = fileCfg.Wire.Netns
			}
		}
		if ka, err = ks.agent(log, o, tr, wt, netnsPath, index, func(old, cur *podmap.LiveConfig) {
			livePayload(log, o, cur, tr)
			exp.reconfigure(log, o, old, cur, newExporter)
		}); err != nil {
			_ = stopTLS(tlsTr, log)
			tr.Close()
			if wire != nil {
				wire.Close()
			}
			_ = exp.Shutdown(context.Background())
			return err
		}
		go func() { defer close(kubeDone); ka.run(ctx) }()
	} else {
		close(kubeDone)
	}
	log.Info("tracing", "component", "agent", "cgroups", len(cgroupIDs), "ports", len(ports), "payload_bytes", o.payloadBytes,
		"kubernetes", ks != nil)

	statsDone := make(chan struct{})
	if o.statsEvery > 0 {
		go func() {
			defer close(statsDone)
			t := time.NewTicker(o.statsEvery)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					logKernelStats(log, tr)
				}
			}
		}()
	} else {
		close(statsDone)
	}

	wireDone := make(chan error, 1)
	if wire != nil {
		go func() {
			wireDone <- wire.Run(ctx, analyzers, func(ex *tcsessions.Exchange) {
				if ka == nil || ka.keepWire(ex) {
					exp.Export(ex.Session())
				}
			})
		}()
	} else {
		wireDone <- nil
	}
	runErr := sockets.Run(ctx, tr.Events, tk)
	stop()
	<-statsDone
	<-kubeDone
	if err := <-wireDone; err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("wire tracing: %w", err))
	}
	logKernelStats(log, tr)
	st := tk.Stats()
	log.Info("user-space counters", "component", "sockets", "events", st.Events, "bad_events", st.BadEvents,
		"sessions", st.Sessions, "conns_evicted", st.ConnsEvicted, "conns_expired", st.ConnsExpired,
		"unrecognized_conns", st.Unrecognized, "gap_bytes", st.GapBytes, "reordered", st.Reordered,
		"held_receives", st.HeldReceives, "held_timed_out", st.HeldTimedOut,
		"garbage_bytes", st.GarbageBytes, "tls_conns", st.TLSConns, "plaintext_events", st.PlaintextEvents,
		"duplicate_plaintext", st.DuplicatePlaintext)

	shutCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errs := []error{runErr, stopTLS(tlsTr, log)}
	if err := tr.Close(); err != nil {
		errs = append(errs, fmt.Errorf("detaching: %w", err))
	}
	if wire != nil {
		if err := wire.Close(); err != nil {
			errs = append(errs, fmt.Errorf("detaching the tc programs: %w", err))
		}
	}
	if err := exp.Shutdown(shutCtx); err != nil {
		errs = append(errs, fmt.Errorf("flushing spans: %w", err))
	}
	log.Info("stopped", "component", "agent")
	return errors.Join(errs...)
}

func logKernelStats(log *slog.Logger, tr *probes.Tracer) {
	ks, err := tr.Stats()
	if err != nil {
		log.Warn("reading kernel counters", "err", err)
		return
	}
	log.Info("kernel counters", "component", "probes", "mode", tr.Mode, "data_lost", ks.DataLost, "conn_lost", ks.ConnLost, "payload_faults", ks.PayloadFaults, "cipher_skipped", ks.CipherSkipped)
}

func parsePorts(list []string) ([]uint16, error) {
	var ports []uint16
	for _, s := range list {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("--port %q: want a port number 1-65535", s)
		}
		ports = append(ports, uint16(p))
	}
	return ports, nil
}

// resolveCgroups turns cgroup paths into cgroup v2 ids.
func resolveCgroups(mount string, paths []string) ([]uint64, error) {
	var ids []uint64
	for _, p := range paths {
		full := p
		if !strings.HasPrefix(p, mount+"/") && p != mount {
			full = filepath.Join(mount, p)
		}
		id, err := podmap.CgroupID(full)
		if err != nil {
			return nil, fmt.Errorf("--cgroup %s: %w", p, err)
		}
		ids = append(ids, id)
	}
	return ids, nil
}
