package tcsessions

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path"
	"sort"
	"strings"
	"time"
)

// Interface selectors with a meaning of their own, usable in
// Config.PodInterfaces and Config.NodeInterfaces next to names and patterns.
const (
	// SelectHostVeths selects every veth whose peer lives in another network
	// namespace: the host side of each pod's (or container's) veth pair,
	// including those that appear while the tracer runs.
	SelectHostVeths = "@veth"
	// SelectDefaultRoute selects the interfaces of the default routes
	// (IPv4 and IPv6) at the time the tracer starts.
	SelectDefaultRoute = "@default-route"
)

// Attach modes.
const (
	// AttachAuto uses tcx where the kernel has it (Linux 6.6+) and a
	// clsact qdisc with cls_bpf filters otherwise.
	AttachAuto = "auto"
	// AttachTCX uses tcx links only.
	AttachTCX = "tcx"
	// AttachClsact uses a clsact qdisc (made when missing) and cls_bpf
	// filters in direct-action mode.
	AttachClsact = "clsact"
)

// Defaults of Config.
const (
	DefaultPayloadBytes = 1024
	// DefaultResponsePayloadBytes is the default response prefix: an
	// HTTP parser needs the status line and the headers; the body's
	// bytes are stepped over.
	DefaultResponsePayloadBytes = 512
	DefaultRingBytes            = 4 << 20
	DefaultMaxSessions          = 32768
	// DefaultFilterPriority is the priority of the cls_bpf filters: 1, so
	// that they run before the filters of most tools (a tool whose filter
	// returns a verdict hides the packet from filters after it). When the
	// priority is taken by filters of another protocol, the kernel picks
	// one.
	DefaultFilterPriority = 1
	// DefaultStateDir holds the record of the clsact qdiscs Clovisor made.
	DefaultStateDir = "/run/clovisor"
	// DefaultIdleFlush is Config.IdleFlush's default.
	DefaultIdleFlush = 5 * time.Second
	// DefaultWorkloadRefresh is Config.WorkloadRefresh's default.
	DefaultWorkloadRefresh = 2 * time.Second
)

// MaxPayloadBytes is the largest payload prefix per exchange direction.
const MaxPayloadBytes = len(tcPayloadEvent{}.Data)

// Config says where and what the tc programs trace. The zero value traces
// every TCP connection on every host-side veth and on the default-route
// interfaces. It is meant to be filled from flags or a YAML/JSON file (the
// field tags name the keys) until the Kubernetes integration fills it.
type Config struct {
	// PodInterfaces select the interfaces traced as pod veths (point
	// pod_veth): names, shell patterns (path.Match, e.g. "cali*") or
	// SelectHostVeths. nil means {SelectHostVeths}; an empty, non-nil
	// slice selects none.
	PodInterfaces []string `json:"podInterfaces" yaml:"podInterfaces"`
	// NodeInterfaces select the node's NICs (point node_nic), where
	// traffic is also counted per workload: names, patterns or
	// SelectDefaultRoute. nil means {SelectDefaultRoute}; an empty,
	// non-nil slice selects none. An interface selected by both lists is a
	// node interface.
	NodeInterfaces []string `json:"nodeInterfaces" yaml:"nodeInterfaces"`
	// Ports are the server ports to trace (the dports2proto table).
	Ports []Port `json:"ports" yaml:"ports"`
	// Egress are the servers outside the node to trace connections to
	// (the egress_lookup_table table).
	Egress []EgressMatch `json:"egress" yaml:"egress"`
	// IgnorePorts are server ports never traced, also when TrackAll
	// applies (e.g. the port of the OTLP collector).
	IgnorePorts []uint16 `json:"ignorePorts" yaml:"ignorePorts"`
	// TrackAll traces every TCP connection that no table matches (the
	// server is then the end that sent the SYN-ACK, or for connections
	// already open, the end with the lower port). It is implied when
	// Ports and Egress are both empty. Fixed at load time.
	TrackAll bool `json:"trackAll" yaml:"trackAll"`

	// Attach is AttachAuto (default), AttachTCX or AttachClsact.
	Attach string `json:"attach" yaml:"attach"`
	// PayloadBytes is the prefix of the first payload of each direction of
	// each exchange sent to user space (default DefaultPayloadBytes, at
	// most MaxPayloadBytes; -1 for none).
	PayloadBytes int `json:"payloadBytes" yaml:"payloadBytes"`
	// ResponsePayloadBytes is the prefix of the response direction's
	// payloads (default the smaller of DefaultResponsePayloadBytes and
	// PayloadBytes, at most MaxPayloadBytes; -1 for none). With
	// PayloadBytes the request direction's.
	ResponsePayloadBytes int `json:"responsePayloadBytes" yaml:"responsePayloadBytes"`
	// RingBytes is the ring buffer's size, a power of two multiple of the
	// page size (default DefaultRingBytes).
	RingBytes int `json:"ringBytes" yaml:"ringBytes"`
	// MaxSessions bounds the sessions table (an LRU: the least recently
	// used connection is forgotten, without its last record, when it is
	// full). Default DefaultMaxSessions.
	MaxSessions int `json:"maxSessions" yaml:"maxSessions"`
	// FilterPriority is the cls_bpf filters' priority (clsact mode;
	// default DefaultFilterPriority).
	FilterPriority uint16 `json:"filterPriority" yaml:"filterPriority"`
	// PinDir, when set, is a directory on a bpffs where the tcx links are
	// pinned (one per interface and hook), so that tracing goes on if the
	// agent dies. Links pinned there by an earlier instance are removed
	// at start. Empty: links are not pinned and vanish with the process.
	PinDir string `json:"pinDir" yaml:"pinDir"`
	// StateDir holds the record of the clsact qdiscs Clovisor made, so
	// that a later instance removes only those (default DefaultStateDir).
	StateDir string `json:"stateDir" yaml:"stateDir"`
	// Netns is the network namespace to work in, as a path such as
	// /run/netns/NAME or /proc/PID/ns/net; empty: the agent's own.
	Netns string `json:"netns" yaml:"netns"`
	// NoWatch disables following interfaces that appear or go while the
	// tracer runs.
	NoWatch bool `json:"noWatch" yaml:"noWatch"`
	// IdleFlush reports the last exchange of a keep-alive connection once
	// no new payload came for this long, without waiting for the next
	// request or the close (default DefaultIdleFlush; negative: never).
	IdleFlush time.Duration `json:"idleFlush" yaml:"idleFlush"`
	// WorkloadRefresh is how often the workloads at the other end of the
	// pod veths and their addresses are read again (see peers.go; they
	// are also read when a pod veth is attached). Default
	// DefaultWorkloadRefresh; negative: no workloads but those given with
	// SetWorkload.
	WorkloadRefresh time.Duration `json:"workloadRefresh" yaml:"workloadRefresh"`

	// Logger receives attach and clean-up decisions (default
	// slog.Default()).
	Logger *slog.Logger `json:"-" yaml:"-"`
}

// Port is a server port to trace, with its protocol.
type Port struct {
	Port uint16 `json:"port" yaml:"port"`
	// Protocol is one of Protocols ("" means "tcp": detect from the
	// bytes).
	Protocol string `json:"protocol" yaml:"protocol"`
	// Interface limits the port to one interface (by name); "" means
	// every traced interface.
	Interface string `json:"interface" yaml:"interface"`
}

// EgressMatch selects servers by address prefix and port.
type EgressMatch struct {
	// Prefix is the servers' address prefix (IPv4 or IPv6); a single
	// address is a /32 or /128.
	Prefix netip.Prefix `json:"prefix" yaml:"prefix"`
	// Port is the servers' port, 0 for any.
	Port     uint16 `json:"port" yaml:"port"`
	Protocol string `json:"protocol" yaml:"protocol"`
}

// Protocols are the protocol names of the tables, by id (the values the
// kernel stores). The names follow Istio's port-name convention.
var Protocols = []string{"tcp", "http", "http2", "https", "grpc", "grpc-web", "tls", "mongo", "mysql", "redis", "memcached"}

// ProtocolIgnore is the table value that means "never trace".
const ProtocolIgnore = 0xffff

// ProtocolID returns the kernel's id of a protocol name ("" is "tcp",
// "ignore" is ProtocolIgnore).
func ProtocolID(name string) (uint16, error) {
	if name == "" {
		return 0, nil
	}
	if strings.EqualFold(name, "ignore") {
		return ProtocolIgnore, nil
	}
	for i, p := range Protocols {
		if strings.EqualFold(p, name) {
			return uint16(i), nil
		}
	}
	return 0, fmt.Errorf("unknown protocol %q (known: %s)", name, strings.Join(Protocols, ", "))
}

// ProtocolName returns the name of a protocol id.
func ProtocolName(id uint16) string {
	if int(id) < len(Protocols) {
		return Protocols[id]
	}
	if id == ProtocolIgnore {
		return "ignore"
	}
	return fmt.Sprintf("proto-%d", id)
}

// normalize fills in defaults and checks the values.
func (c *Config) normalize() error {
	if c.PodInterfaces == nil {
		c.PodInterfaces = []string{SelectHostVeths}
	}
	if c.NodeInterfaces == nil {
		c.NodeInterfaces = []string{SelectDefaultRoute}
	}
	for _, p := range append(append([]string(nil), c.PodInterfaces...), c.NodeInterfaces...) {
		if strings.HasPrefix(p, "@") && p != SelectHostVeths && p != SelectDefaultRoute {
			return fmt.Errorf("interface selector %q: want a name, a pattern, %s or %s", p, SelectHostVeths, SelectDefaultRoute)
		}
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("interface pattern %q: %w", p, err)
		}
	}
	for _, p := range c.Ports {
		if p.Port == 0 {
			return errors.New("port 0 in Ports")
		}
		if _, err := ProtocolID(p.Protocol); err != nil {
			return fmt.Errorf("port %d: %w", p.Port, err)
		}
	}
	for _, e := range c.Egress {
		if !e.Prefix.IsValid() {
			return errors.New("egress match without a valid prefix")
		}
		if _, err := ProtocolID(e.Protocol); err != nil {
			return fmt.Errorf("egress %s port %d: %w", e.Prefix, e.Port, err)
		}
	}
	if len(c.Ports) == 0 && len(c.Egress) == 0 {
		c.TrackAll = true
	}
	switch c.Attach {
	case "":
		c.Attach = AttachAuto
	case AttachAuto, AttachTCX, AttachClsact:
	default:
		return fmt.Errorf("attach mode %q: want %s, %s or %s", c.Attach, AttachAuto, AttachTCX, AttachClsact)
	}
	switch {
	case c.PayloadBytes == 0:
		c.PayloadBytes = DefaultPayloadBytes
	case c.PayloadBytes == -1:
		c.PayloadBytes = 0
	case c.PayloadBytes < 0 || c.PayloadBytes > MaxPayloadBytes:
		return fmt.Errorf("payload prefix %d bytes: must be between 0 and %d (-1 for none)", c.PayloadBytes, MaxPayloadBytes)
	}
	switch {
	case c.ResponsePayloadBytes == 0:
		c.ResponsePayloadBytes = min(DefaultResponsePayloadBytes, c.PayloadBytes)
	case c.ResponsePayloadBytes == -1:
		c.ResponsePayloadBytes = 0
	case c.ResponsePayloadBytes < 0 || c.ResponsePayloadBytes > MaxPayloadBytes:
		return fmt.Errorf("response payload prefix %d bytes: must be between 0 and %d (-1 for none)", c.ResponsePayloadBytes, MaxPayloadBytes)
	}
	if c.RingBytes == 0 {
		c.RingBytes = DefaultRingBytes
	}
	if page := os.Getpagesize(); c.RingBytes < page || c.RingBytes&(c.RingBytes-1) != 0 {
		return fmt.Errorf("ring buffer size %d bytes: must be a power of two and at least %d", c.RingBytes, page)
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	if c.MaxSessions < 0 {
		return fmt.Errorf("max sessions %d: must be positive", c.MaxSessions)
	}
	if c.FilterPriority == 0 {
		c.FilterPriority = DefaultFilterPriority
	}
	if c.IdleFlush == 0 {
		c.IdleFlush = DefaultIdleFlush
	}
	if c.WorkloadRefresh == 0 {
		c.WorkloadRefresh = DefaultWorkloadRefresh
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// selects reports whether an interface name matches one of the name
// patterns of sel (the "@" selectors are handled by the caller).
func selects(sel []string, name string) bool {
	for _, p := range sel {
		if strings.HasPrefix(p, "@") {
			continue
		}
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

func has(sel []string, s string) bool {
	for _, x := range sel {
		if x == s {
			return true
		}
	}
	return false
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
