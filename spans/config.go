package spans

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// Output modes.
const (
	OutputOTLP    = "otlp"
	OutputConsole = "console"
	OutputJSON    = "json"
)

// OTLP protocols, as spelled by OTEL_EXPORTER_OTLP_PROTOCOL.
const (
	ProtocolGRPC         = "grpc"
	ProtocolHTTPProtobuf = "http/protobuf"
	ProtocolHTTPJSON     = "http/json"
)

// Defaults.
const (
	DefaultQueueSize     = 2048
	DefaultMaxResources  = 1024
	DefaultErrorInterval = 10 * time.Second
	clockRefresh         = 10 * time.Second
)

// Config configures an Exporter. The zero value is usable: console output to
// stdout when no collector is configured in the environment, OTLP otherwise.
type Config struct {
	// Output is "otlp", "console" or "json". Empty means "otlp" when
	// CollectorConfigured() and "console" otherwise.
	Output string

	// Protocol is the OTLP protocol: "grpc", "http/protobuf" or "http/json".
	// Empty means OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else
	// OTEL_EXPORTER_OTLP_PROTOCOL, else "http/protobuf" (the spec's default).
	Protocol string
	// Endpoint overrides OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT. It is a URL
	// such as "http://collector:4318" (scheme http means no TLS); like
	// OTEL_EXPORTER_OTLP_ENDPOINT, for HTTP "/v1/traces" is appended to its
	// path unless the path already ends so. A bare "host:port" is accepted
	// too, with TLS as the environment says (OTEL_EXPORTER_OTLP_INSECURE).
	// Headers, timeouts, compression and certificates always come from the
	// OTEL_EXPORTER_OTLP_* variables, read by the SDK exporters.
	Endpoint string

	// QueueSize bounds the spans waiting for the OTLP exporter (default
	// OTEL_BSP_MAX_QUEUE_SIZE, else 2048); spans beyond it are dropped and
	// counted. The batch size is OTEL_BSP_MAX_EXPORT_BATCH_SIZE, else 512
	// (at most QueueSize).
	QueueSize int
	// BatchTimeout is the batch processor's delay between exports; 0 means
	// the SDK's (OTEL_BSP_SCHEDULE_DELAY, else 5 s).
	BatchTimeout time.Duration
	// ExportTimeout bounds one export including its retries; 0 means the
	// SDK's (OTEL_BSP_EXPORT_TIMEOUT, else 30 s).
	ExportTimeout time.Duration

	// Writer receives console and json output (default os.Stdout).
	Writer io.Writer
	// Location is the time zone of console timestamps (default time.Local).
	Location *time.Location

	// MaxResources bounds the number of distinct resources (services) the
	// Exporter keeps for reuse (default 1024); the least recently used is
	// forgotten (and made again when its service comes back).
	MaxResources int

	// ErrorInterval is the least time between two logged OpenTelemetry
	// errors (default 10 s); the ones in between are counted and reported
	// with the next. The Exporter installs this handler with
	// otel.SetErrorHandler.
	ErrorInterval time.Duration

	// Link, when set, decides whether a session takes part in linking the
	// two ends of an exchange (see the package doc), e.g. only when its peer
	// is known to be traced. Nil means every session with Index >= 0.
	Link func(s *Session) bool

	// Enricher, when set, gives spans the Kubernetes identity of their
	// workload and peer (see spans/k8s.go).
	Enricher Enricher

	// Exporter, when set, replaces the OTLP exporter in "otlp" mode (tests,
	// embedding). It is shut down by Shutdown.
	Exporter sdktrace.SpanExporter

	// frozenOffset, when non-nil, fixes the monotonic-to-wall offset (ns)
	// instead of measuring it (tests).
	frozenOffset *int64
}

// CollectorConfigured reports whether the environment names an OTLP
// collector (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
// is set and not empty).
func CollectorConfigured() bool {
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" ||
		os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

func (c Config) output() (string, error) {
	switch o := strings.ToLower(strings.TrimSpace(c.Output)); o {
	case "":
		if CollectorConfigured() || c.Exporter != nil {
			return OutputOTLP, nil
		}
		return OutputConsole, nil
	case OutputOTLP, OutputConsole, OutputJSON:
		return o, nil
	default:
		return "", fmt.Errorf("spans: unknown output %q (want otlp, console or json)", c.Output)
	}
}

// protocol resolves the OTLP protocol per the OpenTelemetry specification.
func (c Config) protocol() (string, error) {
	p := c.Protocol
	if p == "" {
		p = os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	}
	if p == "" {
		p = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch p = strings.ToLower(strings.TrimSpace(p)); p {
	case "":
		return ProtocolHTTPProtobuf, nil
	case ProtocolGRPC, ProtocolHTTPProtobuf, ProtocolHTTPJSON:
		return p, nil
	default:
		return "", fmt.Errorf("spans: unsupported OTLP protocol %q (want grpc, http/protobuf or http/json)", p)
	}
}

// newOTLPExporter builds the SDK's OTLP exporter for protocol. The exporter
// reads the OTEL_EXPORTER_OTLP_* variables itself; only the explicit
// Config.Endpoint and Config.Protocol are passed as options, which take
// precedence over the environment.
func newOTLPExporter(ctx context.Context, c Config, protocol string) (sdktrace.SpanExporter, error) {
	switch protocol {
	case ProtocolGRPC:
		var opts []otlptracegrpc.Option
		if c.Endpoint != "" {
			if strings.Contains(c.Endpoint, "://") {
				if _, err := url.Parse(c.Endpoint); err != nil {
					return nil, fmt.Errorf("spans: endpoint: %w", err)
				}
				opts = append(opts, otlptracegrpc.WithEndpointURL(c.Endpoint))
			} else {
				opts = append(opts, otlptracegrpc.WithEndpoint(c.Endpoint))
			}
		}
		return otlptracegrpc.New(ctx, opts...)
	default:
		var opts []otlptracehttp.Option
		if c.Protocol != "" {
			enc := otlptracehttp.EncodingProtobuf
			if protocol == ProtocolHTTPJSON {
				enc = otlptracehttp.EncodingJSON
			}
			opts = append(opts, otlptracehttp.WithEncoding(enc))
		}
		if c.Endpoint != "" {
			if strings.Contains(c.Endpoint, "://") {
				u, err := url.Parse(c.Endpoint)
				if err != nil {
					return nil, fmt.Errorf("spans: endpoint: %w", err)
				}
				if !strings.HasSuffix(u.Path, "/v1/traces") {
					u.Path = strings.TrimSuffix(u.Path, "/") + "/v1/traces"
				}
				opts = append(opts, otlptracehttp.WithEndpointURL(u.String()))
			} else {
				opts = append(opts, otlptracehttp.WithEndpoint(c.Endpoint))
			}
		}
		return otlptracehttp.New(ctx, opts...)
	}
}
