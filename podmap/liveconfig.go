package podmap

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// ConfigMap keys the agent reads from its own ConfigMap. The first three are
// the keys the original Clovisor kept in redis; the others are new.
const (
	// KeyLabels selects the pods to trace: a list (commas or new lines) of
	// "<namespace>" or "<namespace>:<label-key>=<label-value>"; "*" for
	// the namespace means every namespace. Default: "default".
	KeyLabels = "clovisor_labels"
	// KeyEgressMatch lists servers outside the node whose connections are
	// traced on the wire: "<IP-or-CIDR>:<port>[:<pod-prefix>]" (IPv6 in
	// brackets: "[fd00::/64]:443"; port 0 or * for any), optionally only for
	// pods whose name starts with pod-prefix.
	KeyEgressMatch = "clovisor_egress_match"
	// KeyExporterEndpoint is the OTLP collector's URL (e.g.
	// http://otel-collector.observability:4318). The original's
	// "clovisor_jaeger_server" is accepted as a synonym.
	KeyExporterEndpoint  = "clovisor_exporter_endpoint"
	KeyJaegerServer      = "clovisor_jaeger_server"
	KeyExporterProtocol  = "clovisor_exporter_protocol"
	KeyPayloadBytes      = "clovisor_payload_bytes"
	KeyProtocolOverrides = "clovisor_protocols"
)

var knownKeys = []string{KeyLabels, KeyEgressMatch, KeyExporterEndpoint, KeyJaegerServer, KeyExporterProtocol,
	KeyPayloadBytes, KeyProtocolOverrides}

// Selector selects pods by namespace ("*": any) and, when Key is set, by
// the label Key=Value.
type Selector struct {
	Namespace  string
	Key, Value string
}

func (s Selector) String() string {
	if s.Key == "" {
		return s.Namespace
	}
	return s.Namespace + ":" + s.Key + "=" + s.Value
}

// Selection is a list of selectors; a pod is selected when one matches.
type Selection []Selector

// DefaultSelection is the original's default: every pod of the "default"
// namespace.
var DefaultSelection = Selection{{Namespace: "default"}}

// Matches reports whether a pod of namespace ns with these labels is
// selected.
func (s Selection) Matches(ns string, labels map[string]string) bool {
	for _, sel := range s {
		if sel.Namespace != "*" && sel.Namespace != ns {
			continue
		}
		if sel.Key == "" {
			return true
		}
		if v, ok := labels[sel.Key]; ok && v == sel.Value {
			return true
		}
	}
	return false
}

func (s Selection) String() string {
	parts := make([]string, len(s))
	for i, x := range s {
		parts[i] = x.String()
	}
	return strings.Join(parts, ",")
}

// ParseSelection parses a clovisor_labels value.
func ParseSelection(v string) (Selection, error) {
	var out Selection
	for _, item := range splitList(v) {
		ns, label, hasLabel := strings.Cut(item, ":")
		ns = strings.TrimSpace(ns)
		if ns != "*" && !isDNSLabel(ns) {
			return nil, fmt.Errorf("%q: namespace %q is not a valid namespace name (or *)", item, ns)
		}
		sel := Selector{Namespace: ns}
		if hasLabel {
			k, val, ok := strings.Cut(strings.TrimSpace(label), "=")
			k, val = strings.TrimSpace(k), strings.TrimSpace(val)
			if !ok || k == "" {
				return nil, fmt.Errorf("%q: want <namespace>:<label-key>=<label-value>", item)
			}
			if !validLabelKey(k) || !validLabelValue(val) {
				return nil, fmt.Errorf("%q: %q=%q is not a valid label", item, k, val)
			}
			sel.Key, sel.Value = k, val
		}
		out = append(out, sel)
	}
	if len(out) == 0 {
		return nil, errors.New("no selector (want e.g. \"default\" or \"*:app=web\")")
	}
	return out, nil
}

// EgressRule is one clovisor_egress_match entry.
type EgressRule struct {
	Prefix netip.Prefix
	// Port is the server port, 0 for any.
	Port uint16
	// PodPrefix, when set, limits the rule to pods whose name starts with
	// it.
	PodPrefix string
}

func (r EgressRule) String() string {
	s := fmt.Sprintf("%s:%d", r.Prefix, r.Port)
	if r.Prefix.Addr().Is6() {
		s = fmt.Sprintf("[%s]:%d", r.Prefix, r.Port)
	}
	if r.PodPrefix != "" {
		s += ":" + r.PodPrefix
	}
	return s
}

// ParseEgressMatch parses a clovisor_egress_match value.
func ParseEgressMatch(v string) ([]EgressRule, error) {
	var out []EgressRule
	for _, item := range splitList(v) {
		r, err := parseEgressRule(item)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", item, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func parseEgressRule(item string) (EgressRule, error) {
	var addr, rest string
	if strings.HasPrefix(item, "[") {
		end := strings.IndexByte(item, ']')
		if end < 0 {
			return EgressRule{}, errors.New("unclosed [")
		}
		addr, rest = item[1:end], item[end+1:]
		if !strings.HasPrefix(rest, ":") {
			return EgressRule{}, errors.New("want [IPv6-or-CIDR]:port[:pod-prefix]")
		}
		rest = rest[1:]
	} else {
		var ok bool
		addr, rest, ok = strings.Cut(item, ":")
		if !ok {
			return EgressRule{}, errors.New("want IP-or-CIDR:port[:pod-prefix]")
		}
	}
	var r EgressRule
	if strings.Contains(addr, "/") {
		p, err := netip.ParsePrefix(addr)
		if err != nil {
			return r, fmt.Errorf("prefix: %w", err)
		}
		r.Prefix = p.Masked()
	} else {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return r, fmt.Errorf("address: %w", err)
		}
		r.Prefix = netip.PrefixFrom(a, a.BitLen())
	}
	port, pod, _ := strings.Cut(rest, ":")
	if port != "*" {
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return r, fmt.Errorf("port %q: want 0-65535 or *", port)
		}
		r.Port = uint16(n)
	}
	if pod != "" && !isDNSSubdomainPrefix(pod) {
		return r, fmt.Errorf("pod prefix %q: not a possible start of a pod name", pod)
	}
	r.PodPrefix = pod
	return r, nil
}

// LiveConfig is what the agent's ConfigMap holds.
type LiveConfig struct {
	Labels Selection
	Egress []EgressRule
	// Endpoint and Protocol configure the OTLP exporter ("": as the
	// agent's flags and environment say).
	Endpoint, Protocol string
	// PayloadBytes is the payload prefix captured per call (0: the
	// agent's default).
	PayloadBytes int
	// Protocols override the protocol of server ports, whatever the
	// Service port names say.
	Protocols map[uint16]string
}

// DefaultLiveConfig is the configuration without a ConfigMap.
func DefaultLiveConfig() *LiveConfig {
	return &LiveConfig{Labels: DefaultSelection}
}

// ParseConfigMap checks and parses the data of the agent's ConfigMap.
// Unknown keys are errors (a misspelt key must not be silently ignored).
// maxPayload bounds clovisor_payload_bytes; known are the protocol names
// the tables accept.
func ParseConfigMap(data map[string]string, maxPayload int, known []string) (*LiveConfig, error) {
	c := DefaultLiveConfig()
	var errs []error
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := strings.TrimSpace(data[k])
		var err error
		switch k {
		case KeyLabels:
			if v != "" {
				c.Labels, err = ParseSelection(v)
			}
		case KeyEgressMatch:
			c.Egress, err = ParseEgressMatch(v)
		case KeyExporterEndpoint, KeyJaegerServer:
			if v != "" {
				if c.Endpoint != "" && c.Endpoint != v {
					err = fmt.Errorf("conflicts with the other endpoint key (%q)", c.Endpoint)
					break
				}
				if u, perr := url.Parse(v); perr != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
					err = fmt.Errorf("%q: want a URL such as http://collector:4318", v)
					break
				}
				c.Endpoint = v
			}
		case KeyExporterProtocol:
			switch v {
			case "", "grpc", "http/protobuf", "http/json":
				c.Protocol = v
			default:
				err = fmt.Errorf("%q: want grpc, http/protobuf or http/json", v)
			}
		case KeyPayloadBytes:
			if v != "" {
				n, perr := strconv.Atoi(v)
				if perr != nil || n < 0 || n > maxPayload {
					err = fmt.Errorf("%q: want a number of bytes from 0 to %d", v, maxPayload)
					break
				}
				c.PayloadBytes = n
			}
		case KeyProtocolOverrides:
			c.Protocols, err = parseProtocolOverrides(v, known)
		default:
			err = fmt.Errorf("unknown key (known: %s)", strings.Join(knownKeys, ", "))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k, err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// parseProtocolOverrides parses "8080=http,6379=redis".
func parseProtocolOverrides(v string, known []string) (map[uint16]string, error) {
	out := map[uint16]string{}
	for _, item := range splitList(v) {
		p, proto, ok := strings.Cut(item, "=")
		if !ok {
			return nil, fmt.Errorf("%q: want <port>=<protocol>", item)
		}
		n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q: port %q: want 1-65535", item, p)
		}
		proto = strings.ToLower(strings.TrimSpace(proto))
		if !contains(known, proto) {
			return nil, fmt.Errorf("%q: unknown protocol %q (known: %s)", item, proto, strings.Join(known, ", "))
		}
		out[uint16(n)] = proto
	}
	return out, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// splitList splits on commas, new lines and semicolons, trimming spaces
// and dropping empty items and # comments.
func splitList(v string) []string {
	var out []string
	for _, line := range strings.Split(v, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		for _, item := range strings.FieldsFunc(line, func(r rune) bool { return r == ',' || r == ';' }) {
			if item = strings.TrimSpace(item); item != "" {
				out = append(out, item)
			}
		}
	}
	return out
}

func isDNSLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(s)-1) {
			return false
		}
	}
	return true
}

func isDNSSubdomainPrefix(s string) bool {
	if len(s) > 253 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

func validLabelKey(k string) bool {
	name := k
	if i := strings.LastIndexByte(k, '/'); i >= 0 {
		if !isDNSSubdomainPrefix(k[:i]) || i == 0 {
			return false
		}
		name = k[i+1:]
	}
	return name != "" && len(name) <= 63 && validLabelValue(name)
}

func validLabelValue(v string) bool {
	if len(v) > 63 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && !((c == '-' || c == '_' || c == '.') && i > 0 && i < len(v)-1) {
			return false
		}
	}
	return true
}
