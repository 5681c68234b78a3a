package main

import (
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/clovisor/clovisor/tcsessions"
)

// fileConfig is the agent's YAML configuration file (--config). Flags given
// on the command line take precedence over it.
//
//	wire:                       # tc tracing of pod veths and node NICs
//	  podInterfaces: ["@veth"]  # names, patterns, @veth (host sides of veths)
//	  nodeInterfaces: ["@default-route"]
//	  ports:
//	    - {port: 8080, protocol: http}
//	  egress:                   # servers outside the node, by prefix and port
//	    - {prefix: 203.0.113.0/24, port: 80}
//	  attach: auto              # auto, tcx or clsact
//	tls:                        # uprobes on TLS libraries
//	  enabled: true             # --tls overrides it
//	  rescan: 30s
type fileConfig struct {
	Wire *tcsessions.Config `yaml:"wire"`
	TLS  *tlsConfig         `yaml:"tls"` // see tls.go
}

// loadConfig reads and strictly parses the YAML file: unknown keys are
// errors, so a misspelt setting is not silently ignored.
func loadConfig(path string) (*fileConfig, error) {
	c := &fileConfig{}
	if path == "" {
		return c, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && err.Error() != "EOF" {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	return c, nil
}

// collectorPort returns the port of the configured OTLP collector (flag,
// then OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT),
// so that the wire tracer does not trace the agent's own exports. 0 when
// none is configured.
func collectorPort(flagEndpoint, protocol string) uint16 {
	ep := flagEndpoint
	for _, v := range []string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"} {
		if ep == "" {
			ep = os.Getenv(v)
		}
	}
	if ep == "" {
		return 0
	}
	host := ep
	if u, err := url.Parse(ep); err == nil && u.Host != "" {
		host = u.Host
	}
	if _, p, err := net.SplitHostPort(host); err == nil {
		if n, err := strconv.ParseUint(p, 10, 16); err == nil {
			return uint16(n)
		}
	}
	if protocol == "" {
		protocol = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	if strings.HasPrefix(protocol, "grpc") {
		return 4317
	}
	return 4318
}
