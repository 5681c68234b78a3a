package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/clovisor/clovisor/probes"
)

// tlsConfig is the tls section of the YAML configuration file:
//
//	tls:
//	  enabled: true   # uprobes on TLS libraries (OpenSSL, Go crypto/tls); --tls overrides
//	  rescan: 30s     # how often all traced processes are looked at again
type tlsConfig struct {
	Enabled *bool         `yaml:"enabled"`
	Rescan  time.Duration `yaml:"rescan"`
}

// tlsFlags registers --tls.
func tlsFlags(fs *flag.FlagSet, o *options) {
	fs.BoolVar(&o.tls, "tls", true, "also trace the plaintext of TLS libraries in the traced processes (uprobes on OpenSSL, Go crypto/tls)")
}

// startTLS starts TLS tracing on the socket tracer, as the flag (when
// given) or the configuration file say. When it was not asked for
// explicitly, failing to start is a warning, not an error: the socket
// tracer runs on.
func startTLS(ctx context.Context, o *options, cfg *fileConfig, tr *probes.Tracer, log *slog.Logger) (*probes.TLSTracer, error) {
	enabled, explicit := o.tls, o.tlsSet
	var rescan time.Duration
	if cfg.TLS != nil {
		if cfg.TLS.Enabled != nil && !o.tlsSet {
			enabled, explicit = *cfg.TLS.Enabled, true
		}
		rescan = cfg.TLS.Rescan
	}
	if !enabled {
		return nil, nil
	}
	tt, err := tr.StartTLS(ctx, probes.TLSOptions{
		Logger: log,
		Rescan: rescan,
		OnAttach: func(a probes.TLSAttachment) {
			log.Info("TLS library probed", "component", "tls", "impl", a.Impl, "path", a.Path, "pid", a.PID)
		},
	})
	if err != nil {
		if explicit {
			return nil, fmt.Errorf("TLS tracing (--tls=false to do without): %w", err)
		}
		log.Warn("TLS tracing not started: TLS sessions show as TLS only", "component", "tls", "reason", err.Error())
		return nil, nil
	}
	log.Info("TLS tracing started", "component", "tls", "files", len(tt.Attached()))
	return tt, nil
}

// stopTLS logs the TLS counters and detaches everything.
func stopTLS(tt *probes.TLSTracer, log *slog.Logger) error {
	if tt == nil {
		return nil
	}
	if st, err := tt.Stats(); err == nil {
		log.Info("TLS counters", "component", "tls", "files_seen", st.Files, "files_probed", st.Attached, "scans", st.Scans,
			"openssl_calls", st.OpenSSL.Calls, "openssl_by_descriptor", st.OpenSSL.ByDescriptor, "openssl_by_io", st.OpenSSL.ByIO,
			"openssl_by_cache", st.OpenSSL.ByCache, "openssl_unbound", st.OpenSSL.Unbound)
	}
	if err := tt.Close(); err != nil {
		return fmt.Errorf("detaching TLS uprobes: %w", err)
	}
	return nil
}
